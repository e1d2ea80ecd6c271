#include "actors/node_agent.hpp"

#include <spdlog/spdlog.h>

#include "actors/fan_out.hpp"

namespace refit::actors {

namespace {

// The agent's own tick (connect or join again), on top of what the server may send it.
using agent_actor = msg::node_agent_actor::extend<caf::reacts_to<msg::join_worker_atom>>;

struct agent_state {
  worker_set set;
  node_config config;
  msg::cluster_api_actor server;   // invalid while not connected
  std::vector<int32_t> index;      // per worker: its index on the server; not_joined, or offered (reply pending)
  bool settling = false;           // modules are being settled after the connection went
  bool tick_pending = false;
  uint64_t attempts = 0;
  static inline const char* name = "refit.node_agent";
};

using self_ptr = agent_actor::stateful_pointer<agent_state>;

constexpr int32_t not_joined = -1, offered = -2;

void tick_later(self_ptr self) {
  if (self->state.tick_pending) return;
  self->state.tick_pending = true;
  self->delayed_send(self, self->state.config.retry, msg::join_worker_atom::value);
}

// Replaces worker w's module actors and waits until each replacement has settled its module.
void settle(self_ptr self, size_t w, std::function<void()> done) {
  auto supervisor = self->state.set.workers[w].supervisor;
  self->request(supervisor, std::chrono::seconds(600), msg::abandon_atom::value)
      .then(
          [self, supervisor, done](uint64_t) {
            fan_out<msg::module_actor>(
                indices(self->state.set.modules.size()),
                [self, supervisor](size_t m) {
                  return self->request(supervisor, std::chrono::seconds(600), msg::recover_atom::value, self->state.set.modules[m]);
                },
                [self, done](fan_in<msg::module_actor>& in) {
                  for (auto& [m, e] : in.errors)
                    spdlog::error("node: module {} could not be settled: {}", self->state.set.modules[m], msg::describe(e));
                  done();
                });
          },
          [done](caf::error& e) {
            spdlog::error("node: could not settle a worker: {}", msg::describe(e));
            done();
          });
}

msg::worker_offer offer_of(self_ptr self, size_t w) {
  const auto& st = self->state;
  const auto& a = st.set.workers[w];
  msg::worker_offer o;
  o.secret = st.config.secret;
  o.host = st.config.name;
  o.local_index = static_cast<int32_t>(w);
  o.device = a.device;
  o.class_name = st.set.class_name;
  o.modules = st.set.modules;
  o.worker = a.worker;
  o.supervisor = a.supervisor;
  o.cache = a.cache;
  o.transfer = a.transfer;
  o.agent = caf::actor_cast<msg::node_agent_actor>(self);
  return o;
}

// Offers worker w to the connected server.
void offer(self_ptr self, size_t w) {
  auto& st = self->state;
  st.index[w] = offered;
  self->request(st.server, std::chrono::seconds(60), msg::join_worker_atom::value, offer_of(self, w))
      .then(
          [self, w](msg::join_reply& r) {
            auto& st = self->state;
            if (r.accepted) {
              st.index[w] = r.index;
              spdlog::info("node: worker {} ({}) joined the server as worker {}; the server now gives it its weights", w,
                           st.set.workers[w].device, r.index);
              return;
            }
            st.index[w] = not_joined;
            spdlog::error("node: the server refused worker {}: {}", w, r.message);
            if (r.permanent && st.config.refused) return st.config.refused(r.message);
            tick_later(self);
          },
          [self, w](caf::error& e) {
            self->state.index[w] = not_joined;
            spdlog::warn("node: offering worker {} failed: {}", w, msg::describe(e));
            tick_later(self);
          });
}

// Connects when not connected; offers every worker that is not joined.
void tick(self_ptr self) {
  auto& st = self->state;
  if (st.settling) return tick_later(self);
  if (!st.server) {
    auto server = st.config.connect();
    if (!server) {
      if (st.attempts++ % 15 == 0) spdlog::warn("node: cannot reach the server: {}; retrying", self->system().render(server.error()));
      return tick_later(self);
    }
    st.attempts = 0;
    st.server = *server;
    self->monitor(st.server);
    spdlog::info("node: connected to the server");
  }
  for (size_t w = 0; w < st.set.workers.size(); ++w)
    if (st.index[w] == not_joined) offer(self, w);
}

// The connection went: no worker is joined any more; each settles before the next join.
void connection_lost(self_ptr self, const caf::error& why) {
  auto& st = self->state;
  spdlog::warn("node: the connection to the server was lost ({}); settling every module, then joining again",
               self->system().render(why));
  st.server = nullptr;
  st.settling = true;
  auto left = std::make_shared<size_t>(st.set.workers.size());
  for (size_t w = 0; w < st.set.workers.size(); ++w) {
    st.index[w] = not_joined;
    settle(self, w, [self, left] {
      if (--*left > 0) return;
      self->state.settling = false;
      spdlog::info("node: every module is settled");
      tick(self);
    });
  }
}

}  // namespace

msg::node_agent_actor spawn_node_agent(caf::actor_system& sys, worker_set workers, node_config config) {
  auto agent = sys.spawn<caf::detached>([workers = std::move(workers), config = std::move(config)](self_ptr self) mutable
                                        -> agent_actor::behavior_type {
    auto& st = self->state;
    st.set = std::move(workers);
    st.config = std::move(config);
    st.index.assign(st.set.workers.size(), not_joined);
    self->set_down_handler([self](caf::down_msg& dm) {
      if (self->state.server && dm.source == self->state.server.address()) connection_lost(self, dm.reason);
    });
    self->send(self, msg::join_worker_atom::value);
    return {
        [self](msg::cancel_atom, int32_t w, bool on) -> caf::result<bool> {
          auto& st = self->state;
          if (w < 0 || static_cast<size_t>(w) >= st.set.workers.size())
            return msg::make_error(msg::refit_errc::invalid_request, "no worker " + std::to_string(w));
          st.set.workers[w].cancel->store(on);
          return true;
        },
        [self](msg::abandon_atom, int32_t w, const std::string& why) {
          auto& st = self->state;
          if (w < 0 || static_cast<size_t>(w) >= st.set.workers.size()) return;
          spdlog::warn("node: the server let worker {} go ({}); settling it, then joining again", w, why);
          st.index[w] = offered;  // not offered again before it is settled
          settle(self, static_cast<size_t>(w), [self, w] {
            self->state.index[w] = not_joined;
            tick_later(self);
          });
        },
        [self](msg::join_worker_atom) {
          self->state.tick_pending = false;
          tick(self);
        },
    };
  });
  return caf::actor_cast<msg::node_agent_actor>(agent);
}

}  // namespace refit::actors
