// Local stand-ins for the actors of a worker on another host. CAF 0.17 answers nothing when a remote
// node's connection goes: requests in flight to it simply never get a reply (its proxies only send down
// messages). A relay is a local actor with the remote actor's interface that forwards every request and
// remembers it until answered; when the remote actor goes down (its process died, the connection closed,
// or the actor itself exited) the relay fails everything in flight with that reason and exits with it, so
// the scheduler and the update transaction see a lost remote participant the way they see a dead local one.
// Module actors handed out by a remote supervisor are wrapped in relays too (one per remote actor).
#pragma once

#include <caf/all.hpp>

#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>

#include "messages/protocol.hpp"

namespace refit::actors {

// What the relays of one joined worker share: its name for messages and the relays of its module actors.
class relay_link : public std::enable_shared_from_this<relay_link> {
 public:
  relay_link(caf::actor_system& sys, std::string label) : sys_(sys), label_(std::move(label)) {}
  const std::string& label() const { return label_; }  // e.g. "worker 2 (host-b, cuda:0)"
  caf::actor_system& system() { return sys_; }

  // A replied value as the scheduler must see it: remote module actors become their relays.
  msg::module_actor wrap(msg::module_actor remote);
  std::map<std::string, msg::module_actor> wrap(std::map<std::string, msg::module_actor> remote);
  template <class T> T wrap(T value) { return value; }
  // The server stops: the module actors' relays exit, so no proxy of the joined process's actors outlives it (the
  // joined process's middleman keeps its actors alive while a peer holds proxies of them).
  void close();

 private:
  caf::actor_system& sys_;
  std::string label_;
  std::mutex mutex_;
  std::map<caf::actor_addr, msg::module_actor> modules_;
};

namespace relay_detail {

// Requests in flight through one relay, each failed once if the remote actor goes.
struct in_flight {
  uint64_t next = 0;
  std::map<uint64_t, std::function<void(const caf::error&)>> fail;
};

template <class Sig> struct relay_case;

// A request with a reply.
template <class... In, class Out>
struct relay_case<caf::typed_mpi<caf::detail::type_list<In...>, caf::output_tuple<Out>>> {
  template <class Self, class Remote>
  static auto make(Self* self, Remote remote, std::shared_ptr<relay_link> link, std::shared_ptr<in_flight> flight) {
    return [self, remote, link, flight](In... xs) -> caf::result<Out> {
      auto promise = self->template make_response_promise<Out>();
      const uint64_t id = flight->next++;
      flight->fail[id] = [promise](const caf::error& e) mutable {
        if (promise.pending()) promise.deliver(e);
      };
      self->request(remote, caf::infinite, std::move(xs)...)
          .then(
              [promise, link, flight, id](Out& out) mutable {
                flight->fail.erase(id);
                if (promise.pending()) promise.deliver(link->wrap(std::move(out)));
              },
              [promise, flight, id](caf::error& e) mutable {
                flight->fail.erase(id);
                if (promise.pending()) promise.deliver(std::move(e));
              });
      return promise;
    };
  }
};

// A one-way message.
template <class... In>
struct relay_case<caf::typed_mpi<caf::detail::type_list<In...>, caf::output_tuple<void>>> {
  template <class Self, class Remote>
  static auto make(Self* self, Remote remote, std::shared_ptr<relay_link>, std::shared_ptr<in_flight>) {
    return [self, remote](In... xs) { self->send(remote, std::move(xs)...); };
  }
};

// The error a relay's requests fail with when its remote actor goes down for `reason`.
caf::error lost(relay_link& link, const caf::error& reason);

}  // namespace relay_detail

// A relay for `remote` (an actor of a joined worker), with the same interface.
template <class... Sigs>
caf::typed_actor<Sigs...> spawn_relay(const std::shared_ptr<relay_link>& link, caf::typed_actor<Sigs...> remote) {
  using handle = caf::typed_actor<Sigs...>;
  return link->system().spawn([link, remote](typename handle::pointer self) -> typename handle::behavior_type {
    auto flight = std::make_shared<relay_detail::in_flight>();
    self->monitor(remote);
    self->set_down_handler([self, link, flight](caf::down_msg& dm) {
      const caf::error why = relay_detail::lost(*link, dm.reason);
      auto pending = std::move(flight->fail);
      flight->fail.clear();
      for (auto& [id, fail] : pending) fail(why);
      self->quit(why);
    });
    return {relay_detail::relay_case<Sigs>::make(self, remote, link, flight)...};
  });
}

}  // namespace refit::actors
