// The interfaces of one worker's actors (module actors, transfer actor, cache, offload managers, the worker
// and its module supervisor): what the scheduler and update transactions send them, in this process or,
// for a joined worker, over the actor port (cluster.hpp). Never reachable by clients.
#pragma once

#include <caf/replies_to.hpp>
#include <caf/typed_actor.hpp>

#include "messages/atoms.hpp"
#include "messages/types.hpp"

namespace refit::msg {

// One weight-bearing module of one worker: owns the lifecycle of that module's parameters and buffers.
using module_actor = caf::typed_actor<
    // From metadata alone (a checkpoint: its headers): the source provides every tensor it announces with
    // the right shape and a convertible dtype. Nothing is read or written.
    caf::replies_to<validate_atom, weight_source>::with<module_report>,
    // Staged: read the new weights into shadow buffers. In place: only prepare (nothing is read yet).
    caf::replies_to<stage_atom, weight_source, update_mode>::with<module_report>,
    // Make the new weights live (swap, or undo snapshot + in-place read); keeps the undo record.
    caf::replies_to<commit_atom>::with<module_report>,
    // Restore the weights held before commit; frees undo and shadows.
    caf::replies_to<rollback_atom>::with<module_report>,
    // The update succeeded: drop undo and shadows, remember the new source.
    caf::replies_to<finalize_atom>::with<module_report>,
    // The update stopped before commit: free shadows (and finish undoing anything half done).
    caf::replies_to<discard_atom>::with<module_report>,
    caf::replies_to<checksum_atom, checksum_format>::with<std::string>,
    // SGLang's per-tensor hashes of the named tensors the module holds (absent names are left out).
    caf::replies_to<tensor_hashes_atom, std::vector<std::string>>::with<std::map<std::string, std::string>>,
    caf::replies_to<info_atom>::with<module_info>,
    // Move the module's device weights to pinned host memory (the slots point there) and back; the report's
    // bytes are what moved.
    caf::replies_to<release_memory_atom>::with<module_report>,
    caf::replies_to<resume_memory_atom>::with<module_report>,
    caf::replies_to<fault_atom, fault_spec>::with<bool>>;

// One worker's transfers from trainers: the torch.distributed groups it joined, and what it received for
// updates in progress (its module actors read those through a shared table). It blocks while it joins
// or receives, which is why it is not the worker (generation goes on meanwhile).
using transfer_actor = caf::typed_actor<
    caf::replies_to<join_group_atom, group_request, int32_t /*rank*/>::with<group_result>,
    caf::replies_to<leave_group_atom, std::string /*group_name*/>::with<group_result>,
    // Checks the announcement against the modules, then receives it (a refused announcement is received
    // and dropped, so that the trainer's broadcasts complete). A failed transfer leaves the group.
    caf::replies_to<receive_atom, receive_request>::with<receive_report>,
    // The update ended: drop what was received for it (adopted tensors live on as weights); optionally
    // return the allocator's cached device memory.
    caf::replies_to<release_atom, uint64_t /*update*/, bool /*empty cache*/>::with<bool>>;

// TeaCache of one worker. The per-step state lives with each request (one per CFG branch), so no
// request can read state computed with other weights; this actor keeps the worker's counters.
using cache_actor = caf::typed_actor<
    caf::replies_to<reset_atom>::with<uint64_t /*resets so far*/>,
    caf::replies_to<stats_atom>::with<teacache_counters>,
    // From the worker after a TeaCache request: DiT calls computed and skipped.
    caf::reacts_to<teacache_atom, uint64_t /*computed*/, uint64_t /*skipped*/>>;

// A worker's layerwise offload of one module, when on. The block copies themselves are calls on the
// worker's compute thread (a message per block per step would stall it) and the module actor writes the
// host store directly; this actor reports their state.
using offload_manager_actor = caf::typed_actor<caf::replies_to<info_atom>::with<offload_info>>;

// One device's pipeline; generation runs on the worker's own thread.
using worker_actor = caf::typed_actor<caf::replies_to<generate_atom, generation_request>::with<generation_result>,
                                      caf::replies_to<rollout_atom, rollout_request>::with<rollout_result>>;

// Supervises one worker's module actors (and answers while the worker is busy generating): one that
// dies is respawned on the same module state, and the replacement's start-up settles whatever update
// its predecessor left (see update::module_updater::on_actor_start).
using module_supervisor_actor = caf::typed_actor<
    caf::replies_to<modules_atom>::with<std::map<std::string, module_actor>>,
    // The module's actor after it settled: the same one if it is alive, else its replacement once that
    // has started (and undone any unfinished commit of its predecessor).
    caf::replies_to<recover_atom, std::string /*module*/>::with<module_actor>,
    // Every participant of the update committed: the module's last commit stands even if its actor dies
    // before it finalizes (a replacement keeps it instead of undoing it).
    caf::replies_to<decide_atom, std::string /*module*/>::with<bool>,
    // The connection to the server was lost (a joined worker): every module actor is replaced, so each
    // module keeps a decided update and undoes an undecided one, as after a crash; replies how many.
    caf::replies_to<abandon_atom>::with<uint64_t>>;

}  // namespace refit::msg
