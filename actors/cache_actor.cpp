#include "actors/cache_actor.hpp"

#include <spdlog/spdlog.h>

namespace refit::actors {

namespace {
struct cache_state {
  int32_t worker = 0;
  msg::teacache_counters counters;
  static inline const char* name = "refit.cache";
};
}  // namespace

msg::cache_actor spawn_cache_actor(caf::actor_system& sys, int32_t worker) {
  return sys.spawn([worker](msg::cache_actor::stateful_pointer<cache_state> self) -> msg::cache_actor::behavior_type {
    self->state.worker = worker;
    return {
        [self](msg::reset_atom) -> uint64_t {
          // Requests own their TeaCache state and updates drain requests before commit, so nothing
          // computed with the old weights survives; the reset marks the boundary in the counters.
          auto& c = self->state.counters;
          ++c.resets;
          spdlog::info("cache (worker {}): reset after a weight update ({} TeaCache steps computed, {} skipped so far)",
                       self->state.worker, c.steps_computed, c.steps_skipped);
          return c.resets;
        },
        [self](msg::stats_atom) -> msg::teacache_counters { return self->state.counters; },
        [self](msg::teacache_atom, uint64_t computed, uint64_t skipped) {
          auto& c = self->state.counters;
          ++c.requests;
          c.steps_computed += computed;
          c.steps_skipped += skipped;
        },
    };
  });
}

}  // namespace refit::actors
