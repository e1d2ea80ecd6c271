#include "actors/module_supervisor.hpp"

#include <spdlog/spdlog.h>

#include "actors/module_actor.hpp"
#include "pipeline/update/module_updater.hpp"

namespace refit::actors {

using msg::refit_errc;

namespace {

// Shared by the supervisor's handlers and its exit hook (which runs after a stateful actor's state is gone).
struct supervisor_state {
  int32_t worker = 0;
  std::map<std::string, std::shared_ptr<module_state>> states;
  std::map<std::string, msg::module_actor> actors;
};

using self_ptr = msg::module_supervisor_actor::pointer;
using shared = std::shared_ptr<supervisor_state>;

constexpr auto settle_timeout = std::chrono::seconds(600);

void respawn(self_ptr self, const shared& st, const std::string& module) {
  auto& handle = st->actors[module];
  handle = spawn_module_actor(self->system(), st->states[module]);
  self->monitor(handle);
}

// The module's actor once it is settled: the same one if it answers, else, when it is dead, a
// replacement (spawned here if the down message has not arrived yet) after it has answered, i.e. after
// its start-up has settled whatever update its predecessor left unfinished.
caf::result<msg::module_actor> recover(self_ptr self, const shared& st, const std::string& module) {
  auto it = st->actors.find(module);
  if (it == st->actors.end()) return msg::make_error(refit_errc::module_not_found, "no module '" + module + "'");
  auto promise = self->make_response_promise<msg::module_actor>();
  const msg::module_actor old = it->second;
  self->request(old, settle_timeout, msg::info_atom::value)
      .then([promise, old](msg::module_info&) mutable { promise.deliver(old); },
            [self, st, module, old, promise](caf::error& e) mutable {
              // A live actor that does not answer may still be running on the module's state; a second
              // actor on that state would race it. Only a dead one is replaced.
              if (e == caf::sec::request_timeout) {
                promise.deliver(msg::make_error(refit_errc::phase_failed, "module actor " + module + " of worker " +
                                                                              std::to_string(st->worker) +
                                                                              " does not answer; it is not replaced while it may still run"));
                return;
              }
              if (st->actors[module] == old) {
                spdlog::warn("worker {}: module actor {} is gone; respawning it", st->worker, module);
                respawn(self, st, module);
              }
              const msg::module_actor fresh = st->actors[module];
              self->request(fresh, settle_timeout, msg::info_atom::value)
                  .then(
                      [promise, fresh](msg::module_info& i) mutable {
                        if (i.problem.empty()) promise.deliver(fresh);
                        else promise.deliver(msg::make_error(refit_errc::phase_failed, i.problem));
                      },
                      [promise](caf::error& e) mutable { promise.deliver(std::move(e)); });
            });
  return promise;
}

}  // namespace

msg::module_supervisor_actor spawn_module_supervisor(caf::actor_system& sys, int32_t worker,
                                                     std::map<std::string, std::shared_ptr<module_state>> modules) {
  auto st = std::make_shared<supervisor_state>();
  st->worker = worker;
  st->states = std::move(modules);
  return sys.spawn([st](self_ptr self) -> msg::module_supervisor_actor::behavior_type {
    for (const auto& [name, state] : st->states) respawn(self, st, name);
    self->set_down_handler([self, st](caf::down_msg& dm) {
      for (auto& [name, handle] : st->actors) {
        if (handle.address() != dm.source) continue;
        spdlog::warn("worker {}: module actor {} died ({}); respawning it", st->worker, name, caf::to_string(dm.reason));
        respawn(self, st, name);
      }
    });
    self->attach_functor([st](const caf::error&) {
      for (auto& [name, handle] : st->actors) caf::anon_send_exit(handle, caf::exit_reason::user_shutdown);
    });
    return {
        [st](msg::modules_atom) { return st->actors; },
        [st](msg::decide_atom, const std::string& module) -> caf::result<bool> {
          auto it = st->states.find(module);
          if (it == st->states.end()) return msg::make_error(refit_errc::module_not_found, "no module '" + module + "'");
          it->second->core->mark_decided();
          return true;
        },
        [self, st](msg::recover_atom, const std::string& module) { return recover(self, st, module); },
        // The server is gone: every module actor exits; recover_atom then yields each one's replacement once
        // its start-up has settled the update its predecessor was in (kept if decided, else undone).
        [self, st](msg::abandon_atom) {
          for (auto& [name, handle] : st->actors) self->send_exit(handle, caf::exit_reason::kill);
          return static_cast<uint64_t>(st->actors.size());
        },
    };
  });
}

}  // namespace refit::actors
