#include "actors/cache_actor.hpp"

#include <spdlog/spdlog.h>

namespace refit::actors {

namespace {
struct cache_state {
  int32_t worker = 0;
  uint64_t resets = 0;
  static inline const char* name = "refit.cache";
};
}  // namespace

msg::cache_actor spawn_cache_actor(caf::actor_system& sys, int32_t worker) {
  return sys.spawn([worker](msg::cache_actor::stateful_pointer<cache_state> self) -> msg::cache_actor::behavior_type {
    self->state.worker = worker;
    return {
        [self](msg::reset_atom) -> uint64_t {
          ++self->state.resets;
          spdlog::info("cache (worker {}): reset after a weight update", self->state.worker);
          return self->state.resets;
        },
        [self](msg::stats_atom) -> uint64_t { return self->state.resets; },
    };
  });
}

}  // namespace refit::actors
