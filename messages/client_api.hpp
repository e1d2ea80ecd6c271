// What a client may ask a refit server: generate, roll out, update weights, read checksums, model info
// and counters. The HTTP bridge speaks only this, and it is all that the actor port publishes (through a
// gateway actor that forwards these messages and nothing else), so no client can pause generation or
// inject faults.
#pragma once

#include <caf/replies_to.hpp>
#include <caf/typed_actor.hpp>

#include "messages/atoms.hpp"
#include "messages/types.hpp"

namespace refit::msg {

using client_api_actor = caf::typed_actor<
    caf::replies_to<generate_atom, generation_request>::with<generation_result>,
    // A generation that records the sampler's trajectory and log-probabilities, for RL trainers.
    caf::replies_to<rollout_atom, rollout_request>::with<rollout_result>,
    // A weight update as one transaction across modules and workers; the result says what changed.
    caf::replies_to<update_atom, update_request>::with<update_result>,
    // SGLang's LoRA operations, each one update transaction (a merge, a switch of adapters, an unmerge).
    caf::replies_to<lora_atom, lora_request>::with<update_result>,
    caf::replies_to<list_loras_atom>::with<lora_status>,
    // Join (every worker, as ranks rank_offset + i) or leave a trainer's torch.distributed group, which
    // distributed updates then receive over.
    caf::replies_to<join_group_atom, group_request>::with<group_result>,
    caf::replies_to<leave_group_atom, std::string /*group_name*/>::with<group_result>,
    // module -> hex checksum, "not_found" for a module the pipeline lacks, "error: ..." when it failed.
    caf::replies_to<checksum_atom, checksum_request>::with<std::map<std::string, std::string>>,
    // Worker 0's per-tensor hashes (SGLang's update_weights_from_tensor_checker) of a module's named tensors.
    caf::replies_to<tensor_hashes_atom, std::string /*module*/, std::vector<std::string>>::with<std::map<std::string, std::string>>,
    caf::replies_to<info_atom>::with<model_info>,
    // Give the device memory back (weights to pinned host memory; generation refused until resume), and take
    // it again: each across every worker at once, idempotent.
    caf::replies_to<release_memory_atom>::with<memory_result>,
    caf::replies_to<resume_memory_atom>::with<memory_result>,
    caf::replies_to<stats_atom>::with<scheduler_stats>>;

}  // namespace refit::msg
