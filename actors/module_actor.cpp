#include "actors/module_actor.hpp"

#include <spdlog/spdlog.h>

#include <chrono>
#include <thread>

#include "actors/weight_sources.hpp"
#include "pipeline/update/memory.hpp"
#include "pipeline/update/module_updater.hpp"

namespace refit::actors {

using msg::refit_errc;

std::shared_ptr<module_state> make_module_state(std::shared_ptr<update::module_updater> core,
                                                std::shared_ptr<const transfer::received_table> received,
                                                std::shared_ptr<lora::adapter_store> adapters) {
  auto s = std::make_shared<module_state>();
  s->core = std::move(core);
  s->received = std::move(received);
  s->adapters = std::move(adapters);
  return s;
}

bool fault_injection_compiled() {
#ifdef REFIT_FAULT_INJECTION
  return true;
#else
  return false;
#endif
}

namespace {

msg::write_path to_msg(update::write_path p) {
  switch (p) {
    case update::write_path::none: return msg::write_path::none;
    case update::write_path::staged: return msg::write_path::staged;
    case update::write_path::in_place: return msg::write_path::in_place;
    case update::write_path::in_place_reread_undo: return msg::write_path::in_place_reread_undo;
    case update::write_path::reread: return msg::write_path::reread;
  }
  return msg::write_path::none;
}

update::requested_path from_msg(msg::update_mode m) {
  switch (m) {
    case msg::update_mode::auto_select: return update::requested_path::auto_select;
    case msg::update_mode::staged: return update::requested_path::staged;
    case msg::update_mode::in_place: return update::requested_path::in_place;
  }
  throw std::invalid_argument("mode must be auto, staged or in_place, got '" + msg::to_string(m) + "'");
}

msg::module_report to_report(const update::module_updater& core, const update::phase_report& r) {
  msg::module_report out;
  out.module = core.module();
  out.worker = core.worker();
  out.tensors = r.tensors;
  out.bytes = r.bytes;
  out.seconds = r.seconds;
  out.path = to_msg(r.path);
  out.source = r.source;
  return out;
}

// Test builds: fail the phase as the fault says (once).
caf::error maybe_fault(module_state& st, const char* phase, caf::scheduled_actor* self) {
#ifdef REFIT_FAULT_INJECTION
  if (!self || st.fault.phase != phase) return {};
  const std::string kind = st.fault.kind;
  st.fault = {};
  const std::string what = "injected fault (" + kind + ") in module '" + st.core->module() + "' phase '" + phase + "'";
  if (kind == "throw") throw std::runtime_error(what);
  if (kind == "die") {
    // The reply goes out before the actor's down message: widen that window as a loaded machine may,
    // so that nothing can rely on the down message arriving first.
    self->attach_functor([](const caf::error&) { std::this_thread::sleep_for(std::chrono::milliseconds(30)); });
    self->quit(msg::make_error(refit_errc::phase_failed, what));
  }
  return msg::make_error(refit_errc::phase_failed, what);
#else
  (void)st, (void)phase, (void)self;
  return {};
#endif
}

// Runs a phase: the fault check, then the core's call; exceptions become error replies that name
// module and phase.
template <class F>
caf::result<msg::module_report> phase(module_state& st, const char* name, caf::scheduled_actor* self, F&& body) {
  try {
    if (auto err = maybe_fault(st, name, self)) return err;
    return to_report(*st.core, body());
  } catch (const std::exception& e) {
    return msg::make_error(refit_errc::phase_failed, "module '" + st.core->module() + "' (worker " + std::to_string(st.core->worker()) +
                                                         ") phase '" + name + "': " + e.what());
  }
}

}  // namespace

msg::module_actor spawn_module_actor(caf::actor_system& sys, std::shared_ptr<module_state> state) {
  return sys.spawn<caf::detached>([state](msg::module_actor::pointer self) -> msg::module_actor::behavior_type {
    update::module_updater& core = *state->core;
    const bool kept_decided = core.on_actor_start();  // reported by info
    return {
        [self, state](msg::validate_atom, const msg::weight_source& source) {
          return phase(*state, "validate", self, [&] { return state->core->validate(*open_source(source, *state)); });
        },
        [self, state](msg::stage_atom, const msg::weight_source& source, msg::update_mode mode) {
          return phase(*state, "stage", self, [&] { return state->core->stage(open_source(source, *state), from_msg(mode), source.check_finite); });
        },
        [self, state](msg::commit_atom) { return phase(*state, "commit", self, [&] { return state->core->commit(); }); },
        [self, state](msg::rollback_atom) {
          state->core->rollback_requested();
          return phase(*state, "rollback", self, [&] { return state->core->rollback(); });
        },
        [self, state](msg::finalize_atom) { return phase(*state, "finalize", self, [&] { return state->core->finalize(); }); },
        // No fault point: discard is how a failed update cleans up.
        [state](msg::discard_atom) { return phase(*state, "discard", nullptr, [&] { return state->core->discard(); }); },
        [state](msg::checksum_atom, msg::checksum_format format) -> caf::result<std::string> {
          try {
            if (static_cast<uint8_t>(format) > static_cast<uint8_t>(msg::checksum_format::refit))
              return msg::make_error(refit_errc::invalid_request, "unknown checksum format");
            return state->core->checksum(format == msg::checksum_format::sglang ? weights::checksum_format::sglang
                                                                                : weights::checksum_format::refit);
          } catch (const std::exception& e) {
            return msg::make_error(refit_errc::phase_failed, "module '" + state->core->module() + "' checksum: " + e.what());
          }
        },
        [state](msg::release_memory_atom) {
          return phase(*state, "release memory", nullptr, [&] {
            auto r = state->core->release_memory();
            update::release_cached_device_memory(state->core->device());
            return r;
          });
        },
        [state](msg::resume_memory_atom) {
          return phase(*state, "resume memory", nullptr, [&] { return state->core->resume_memory(); });
        },
        [state](msg::tensor_hashes_atom, const std::vector<std::string>& names) -> caf::result<std::map<std::string, std::string>> {
          try {
            return state->core->tensor_sha256(names);
          } catch (const std::exception& e) {
            return msg::make_error(refit_errc::phase_failed, "module '" + state->core->module() + "' tensor hashes: " + e.what());
          }
        },
        [state, kept_decided](msg::info_atom) {
          const update::module_status s = state->core->status();
          msg::module_info i;
          i.name = s.module;
          i.class_name = s.class_name;
          i.dtype = s.dtype;
          i.device = s.device;
          i.worker = s.worker;
          i.tensors = s.tensors;
          i.bytes = s.bytes;
          i.source = s.source;
          i.undo_bytes = s.undo_bytes;
          i.shadow_bytes = s.shadow_bytes;
          i.problem = s.problem;
          i.kept_decided = kept_decided;
          for (const auto& a : s.adapters) i.adapters.push_back({a.nickname, a.path, a.strength, 0, false});
          i.adapter_tensors = s.adapter_tensors;
          return i;
        },
        [state](msg::fault_atom, const msg::fault_spec& f) -> caf::result<bool> {
          if (!fault_injection_compiled())
            return msg::make_error(refit_errc::fault_injection_unavailable, "this build does not inject faults");
          if (f.phase == "snapshot") state->core->simulate_no_room_for_undo(f.kind == "nomem");
          else if (f.phase == "decide") state->core->lose_next_decision(f.kind == "lost");
          else state->fault = f;
          return true;
        },
    };
  });
}

}  // namespace refit::actors
