// The message structs of refit's protocol. Each has an inspect overload and is registered in
// msg::add_types, so it can cross a CAF remote connection; enums cross as their underlying value and
// are range-checked when a message is read (a peer cannot make an out-of-range mode).
#pragma once

#include <caf/error.hpp>
#include <caf/meta/load_callback.hpp>
#include <caf/meta/type_name.hpp>
#include <caf/sec.hpp>

#include <cstdint>
#include <iosfwd>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "messages/load_enum.hpp"
#include "messages/post_training_types.hpp"

namespace refit::msg {

// ---------------------------------------------------------------------------------------------
// Vocabulary

// How a request wants the new weights written: staged into shadow buffers (swapped at commit), in
// place after an undo snapshot, or staged when the shadows fit in free memory.
enum class update_mode : uint8_t { auto_select, staged, in_place };
// How a module's weights were written or restored: the path a report describes. in_place_reread_undo:
// in place without room for an undo snapshot (a rollback re-reads the previous source); reread: a
// rollback that did so; mixed: modules of one update took different paths.
enum class write_path : uint8_t { none, staged, in_place, in_place_reread_undo, reread, mixed };
// What kind of weight source an update reads. New sources add a kind here and a planner and a
// module source under actors/ and pipeline/; the transaction's phases do not change. distributed: a
// trainer broadcasts the tensors over a torch.distributed group the workers joined; each worker receives
// them first, then its modules update from what it received. lora: adapters merged into the base (read
// from disk, kept from an earlier merge, or received from a trainer); none: the base values back. tensor:
// a colocated trainer shares its tensors (shared memory, CUDA IPC); each worker opens them first.
enum class source_kind : uint8_t { checkpoint, distributed, lora, tensor };

// Whether an update refuses new values that are not finite (NaN, +-Inf) before they are committed: the
// server's default (refit serve --check-finite, on unless --no-check-finite), or the request's choice.
enum class finite_check : uint8_t { server_default, on, off };

// How generated images are encoded for the client.
enum class image_format : uint8_t { png, jpeg, webp };

// The transition of a rollout's stochastic steps (SGLang's rollout_sde_type).
enum class rollout_sde : uint8_t { sde, cps, ode };

// The module checksum's definition (DESIGN.md section 4): SGLang's (the default) or refit's.
enum class checksum_format : uint8_t { sglang, refit };

std::string to_string(update_mode m);   // auto, staged, in_place
std::string to_string(write_path p);    // "", staged, in_place, in_place(reread-undo), reread, mixed
std::string to_string(source_kind k);   // checkpoint, distributed, lora
std::string to_string(checksum_format f);  // sglang, refit
std::string to_string(image_format f);     // png, jpeg, webp
std::string to_string(rollout_sde t);      // sde, cps, ode
std::optional<update_mode> parse_update_mode(std::string_view text);
std::optional<checksum_format> parse_checksum_format(std::string_view text);
std::ostream& operator<<(std::ostream& os, update_mode m);
std::ostream& operator<<(std::ostream& os, write_path p);
std::ostream& operator<<(std::ostream& os, checksum_format f);
std::ostream& operator<<(std::ostream& os, image_format f);

// ---------------------------------------------------------------------------------------------
// Weight updates

// Where one module's new weights come from, as its module actor is told (plan turns a request into one
// per participating module).
struct weight_source {
  source_kind kind = source_kind::checkpoint;
  std::string location;  // checkpoint: the module's folder; distributed: the group, for messages
  uint64_t update = 0;   // distributed (and received adapters): the update whose tensors the module's worker received
  std::vector<lora_entry> adapters;  // lora: merged in this order into the base; empty: the base back
  // The folders (canonical) every file of this source must resolve beneath, checked on the descriptor
  // opened (openat2 RESOLVE_BENEATH); empty: any path (the operator's own start model).
  std::vector<std::string> roots;
  bool check_finite = false;  // staging fails when a new value is NaN or infinite
  // A checkpoint read once per host: the worker of this process whose staged copy of the same module holds these
  // values (a device-to-device copy instead of reading the files again); -1: read the files.
  int32_t copy_from = -1;
  // The workers of this process that will copy this stage (it also writes replicas on their GPUs while it reads).
  std::vector<int32_t> copy_to{};
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, weight_source& x) {
  auto kind = static_cast<uint8_t>(x.kind);
  return f(caf::meta::type_name("weight_source"), kind, x.location, x.update, x.adapters, x.roots, x.check_finite, x.copy_from, x.copy_to,
           caf::meta::load_callback([&] { return load_enum(x.kind, kind, source_kind::lora, "source kind"); }));
}

// One tensor a trainer announces, as SGLang's update_weights_from_distributed names it: its name (the
// module's own name; with several target modules, prefixed "module."), torch's dtype name, its shape.
struct announced_tensor {
  std::string name;
  std::string dtype;  // "bfloat16", "float32", ...
  std::vector<int64_t> shape;
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, announced_tensor& x) {
  return f(caf::meta::type_name("announced_tensor"), x.name, x.dtype, x.shape);
}

struct update_request {
  source_kind source = source_kind::checkpoint;
  std::string model_path;                   // checkpoint: the Diffusers folder
  std::vector<std::string> target_modules;  // empty: every weight-bearing module (distributed: the denoiser)
  bool flush_cache = true;
  bool abort_all_requests = false;
  std::string weight_version;               // empty: one is derived from the update count
  update_mode mode = update_mode::auto_select;
  // distributed: the group the workers joined, and what rank 0 broadcasts, in order (one broadcast per
  // tensor, or one uint8 broadcast of them all back to back)
  std::string group_name;
  std::vector<announced_tensor> tensors;
  bool flattened_bucket = false;
  bool empty_cache = false;  // after the update, return the allocator's cached device memory (torch_empty_cache)
  std::string refused;       // distributed: why the request is refused (its broadcast is still taken and dropped)
  // lora: the adapters to merge (replacing what is merged on the targets); empty: unmerge.
  std::vector<lora_entry> adapters;
  // distributed: the tensors are a LoRA adapter's A/B weights to merge (weight_update_mode "lora_merge")
  bool lora_merge = false;
  int32_t lora_alpha = 0;
  int32_t lora_rank = 0;
  // tensor: what the trainer shares, one payload for every worker or one per worker (or per GPU UUID)
  std::vector<shared_payload> payloads;
  finite_check check_finite = finite_check::server_default;  // refuse NaN/Inf in the new values
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, update_request& x) {
  auto source = static_cast<uint8_t>(x.source), mode = static_cast<uint8_t>(x.mode), finite = static_cast<uint8_t>(x.check_finite);
  return f(caf::meta::type_name("update_request"), source, x.model_path, x.target_modules, x.flush_cache, x.abort_all_requests,
           x.weight_version, mode, x.group_name, x.tensors, x.flattened_bucket, x.empty_cache, x.refused, x.adapters, x.lora_merge,
           x.lora_alpha, x.lora_rank, x.payloads, finite, caf::meta::load_callback([&]() -> caf::error {
             if (auto e = load_enum(x.source, source, source_kind::tensor, "source kind")) return e;
             if (auto e = load_enum(x.check_finite, finite, finite_check::off, "check_finite")) return e;
             return load_enum(x.mode, mode, update_mode::in_place, "update mode");
           }));
}

// Joining a trainer's torch.distributed group (SGLang's init_weights_update_group): the trainer is rank 0
// and hosts the store at master_address:master_port; worker i joins as rank rank_offset + i.
struct group_request {
  std::string master_address;
  int32_t master_port = 0;
  int32_t rank_offset = 1;
  int32_t world_size = 2;
  std::string group_name = "weight_update_group";
  std::string backend = "nccl";  // nccl or gloo
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, group_request& x) {
  return f(caf::meta::type_name("group_request"), x.master_address, x.master_port, x.rank_offset, x.world_size, x.group_name,
           x.backend);
}

// The reply to joining or leaving a group, SGLang's shape.
struct group_result {
  bool success = false;
  std::string message;
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, group_result& x) {
  return f(caf::meta::type_name("group_result"), x.success, x.message);
}

// What a worker receives for one update: the announced tensors routed to their modules.
struct routed_tensor {
  std::string module;
  std::string name;       // in the module
  std::string wire_name;  // as announced
  std::string dtype;
  std::vector<int64_t> shape;
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, routed_tensor& x) {
  return f(caf::meta::type_name("routed_tensor"), x.module, x.name, x.wire_name, x.dtype, x.shape);
}

struct receive_request {
  uint64_t update = 0;
  std::string group_name;
  std::vector<routed_tensor> tensors;
  bool flattened_bucket = false;
  bool lora = false;  // the tensors are LoRA A/B weights for the modules' 2-D weights, not the weights
  // tensor updates: the payloads the trainer shares (the worker opens the one for its GPU); no group
  std::vector<shared_payload> shared;

  // Non-empty: the update is refused for this reason; the worker takes the broadcast and drops it (or,
  // when its size cannot be known, leaves the group) and fails with it.
  std::string refused;
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, receive_request& x) {
  return f(caf::meta::type_name("receive_request"), x.update, x.group_name, x.tensors, x.flattened_bucket, x.lora, x.shared, x.refused);
}

struct receive_report {
  int32_t worker = 0;
  uint64_t tensors = 0;
  uint64_t bytes = 0;
  double seconds = 0;
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, receive_report& x) {
  return f(caf::meta::type_name("receive_report"), x.worker, x.tensors, x.bytes, x.seconds);
}

// What one module actor did in one phase.
struct module_report {
  std::string module;
  int32_t worker = 0;
  uint64_t tensors = 0;
  uint64_t bytes = 0;
  double seconds = 0;
  write_path path = write_path::none;
  std::string source;  // where its weights came from (a checkpoint: the module's folder)
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, module_report& x) {
  auto path = static_cast<uint8_t>(x.path);
  return f(caf::meta::type_name("module_report"), x.module, x.worker, x.tensors, x.bytes, x.seconds, path, x.source,
           caf::meta::load_callback([&] { return load_enum(x.path, path, write_path::mixed, "write path"); }));
}

struct update_result {
  bool success = false;
  std::string message;
  std::string weight_version;
  std::vector<module_report> modules;      // one per module per worker
  std::map<std::string, double> timings;   // phase -> seconds (plan, validate, stage, drain, pause, commit, finish, total)
  write_path mode = write_path::none;      // the path that ran: staged, in_place or mixed
  std::string mode_reason;
  bool cache_flushed = false;
  uint64_t aborted_requests = 0;
  // Committed: what each module now holds (the scheduler gives a joining worker the same).
  std::map<std::string, weight_source> applied;
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, update_result& x) {
  auto mode = static_cast<uint8_t>(x.mode);
  return f(caf::meta::type_name("update_result"), x.success, x.message, x.weight_version, x.modules, x.timings, mode, x.mode_reason,
           x.cache_flushed, x.aborted_requests, x.applied,
           caf::meta::load_callback([&] { return load_enum(x.mode, mode, write_path::mixed, "write path"); }));
}

// Checksums of what a worker holds.
struct checksum_request {
  std::vector<std::string> modules;  // empty: every module
  int32_t worker = 0;
  checksum_format format = checksum_format::sglang;
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, checksum_request& x) {
  auto format = static_cast<uint8_t>(x.format);
  return f(caf::meta::type_name("checksum_request"), x.modules, x.worker, format,
           caf::meta::load_callback([&] { return load_enum(x.format, format, checksum_format::refit, "checksum format"); }));
}

// ---------------------------------------------------------------------------------------------
// Generation

struct generation_request {
  std::vector<std::string> prompts;
  std::string negative_prompt;
  int64_t width = 0, height = 0;  // 0: the model's default
  int64_t steps = 0;              // 0: the model's default
  double guidance_scale = 4.0;
  uint64_t seed = 0;              // image i (prompt-major) is drawn with seed + i ...
  std::vector<uint64_t> seeds;    // ... unless this gives one seed per image
  int64_t images_per_prompt = 1;
  bool enable_teacache = false;
  double teacache_threshold = -1;  // >= 0: this request's TeaCache threshold (turns TeaCache on); < 0: the model's
  image_format format = image_format::png;
  int32_t compression = -1;        // 0-100 (JPEG/WebP quality; PNG zlib level), < 0: the format's default
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, generation_request& x) {
  auto format = static_cast<uint8_t>(x.format);
  return f(caf::meta::type_name("generation_request"), x.prompts, x.negative_prompt, x.width, x.height, x.steps,
           x.guidance_scale, x.seed, x.seeds, x.images_per_prompt, x.enable_teacache, x.teacache_threshold, format, x.compression,
           caf::meta::load_callback([&] { return load_enum(x.format, format, image_format::webp, "image format"); }));
}

struct generation_result {
  std::vector<std::vector<uint8_t>> images;  // encoded as `format`
  image_format format = image_format::png;
  std::string weight_version;
  double inference_time_s = 0;
  int32_t worker = 0;
  // With enable_teacache: DiT calls (steps x CFG branches) and how many of them skipped the blocks.
  uint64_t teacache_calls = 0, teacache_skipped = 0;
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, generation_result& x) {
  auto format = static_cast<uint8_t>(x.format);
  return f(caf::meta::type_name("generation_result"), x.images, format, x.weight_version, x.inference_time_s, x.worker,
           x.teacache_calls, x.teacache_skipped,
           caf::meta::load_callback([&] { return load_enum(x.format, format, image_format::webp, "image format"); }));
}

// ---------------------------------------------------------------------------------------------
// RL rollouts (POST /rollout/generate, SGLang's RolloutRequest / RolloutResponse)

// A tensor as SGLang's rollout responses carry it: the safetensors bytes of {"t": tensor}, its shape, and
// torch's name of its dtype ("torch.float32").
struct encoded_tensor {
  std::vector<uint8_t> safetensors;
  std::vector<int64_t> shape;
  std::string dtype;
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, encoded_tensor& x) {
  return f(caf::meta::type_name("encoded_tensor"), x.safetensors, x.shape, x.dtype);
}

struct rollout_request {
  generation_request generation;  // prompts (one), negative_prompt, size, steps, guidance, seed, images_per_prompt
  std::string request_id;
  bool rollout = true;
  rollout_sde sde_type = rollout_sde::sde;
  double noise_level = 0.7;
  bool log_prob_no_const = false;
  bool debug = true;
  bool return_denoising_env = false;
  bool return_dit_trajectory = false;
  bool sde_steps_given = false;      // else every step is stochastic
  std::vector<int64_t> sde_step_indices;
  bool return_steps_given = false;   // else every step's latents are kept
  std::vector<int64_t> return_step_indices;
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, rollout_request& x) {
  auto sde = static_cast<uint8_t>(x.sde_type);
  return f(caf::meta::type_name("rollout_request"), x.generation, x.request_id, x.rollout, sde, x.noise_level, x.log_prob_no_const,
           x.debug, x.return_denoising_env, x.return_dit_trajectory, x.sde_steps_given, x.sde_step_indices, x.return_steps_given,
           x.return_step_indices, caf::meta::load_callback([&] { return load_enum(x.sde_type, sde, rollout_sde::ode, "rollout sde type"); }));
}

// One sample of a rollout; empty lists and maps are the response's nil.
struct rollout_sample_result {
  encoded_tensor generated_output;
  std::vector<encoded_tensor> log_probs;                                                    // [T], with rollout
  std::map<std::string, encoded_tensor> debug_tensors;                                      // with rollout_debug_mode
  std::map<std::string, std::map<std::string, std::vector<encoded_tensor>>> denoising_env;  // with rollout_return_denoising_env
  std::map<std::string, encoded_tensor> dit_trajectory;                                     // latents, timesteps, sigmas
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, rollout_sample_result& x) {
  return f(caf::meta::type_name("rollout_sample_result"), x.generated_output, x.log_probs, x.debug_tensors, x.denoising_env,
           x.dit_trajectory);
}

struct rollout_result {
  std::string request_id, prompt;
  uint64_t seed = 0;  // the request's; sample i was drawn with seed + i
  std::vector<rollout_sample_result> samples;
  double inference_time_s = 0;
  double peak_memory_mb = 0;  // 0: not measured (CPU)
  std::string weight_version;  // the weights every step of every sample was computed with
  int32_t worker = 0;
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, rollout_result& x) {
  return f(caf::meta::type_name("rollout_result"), x.request_id, x.prompt, x.seed, x.samples, x.inference_time_s, x.peak_memory_mb,
           x.weight_version, x.worker);
}

// One worker's TeaCache counters since start.
struct teacache_counters {
  uint64_t requests = 0;        // generations with enable_teacache
  uint64_t steps_computed = 0;  // DiT calls that ran the blocks
  uint64_t steps_skipped = 0;   // DiT calls that reused the branch's residual
  uint64_t resets = 0;          // weight updates with flush_cache
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, teacache_counters& x) {
  return f(caf::meta::type_name("teacache_counters"), x.requests, x.steps_computed, x.steps_skipped, x.resets);
}

// ---------------------------------------------------------------------------------------------
// Model identity

struct module_info {
  std::string name;
  std::string class_name;
  std::string dtype;
  std::string device;
  int32_t worker = 0;
  uint64_t tensors = 0;
  uint64_t bytes = 0;
  std::string source;         // where the weights it holds came from
  uint64_t undo_bytes = 0;    // held only during an update; 0 otherwise
  uint64_t shadow_bytes = 0;  // likewise
  std::string problem;        // empty, or why the weights this module holds are not known
  bool kept_decided = false;  // this actor replaced a dead one and kept its decided, unfinalized commit
  std::vector<lora_entry> adapters;  // LoRA adapters merged into the weights, in the order applied
  uint64_t adapter_tensors = 0;      // weights that hold merged values
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, module_info& x) {
  return f(caf::meta::type_name("module_info"), x.name, x.class_name, x.dtype, x.device, x.worker, x.tensors, x.bytes,
           x.source, x.undo_bytes, x.shadow_bytes, x.problem, x.kept_decided, x.adapters, x.adapter_tensors);
}

// One worker's layerwise offload of a module's blocks (refit serve --dit-layerwise-offload).
struct offload_info {
  int32_t worker = 0;
  std::string module;                    // the module whose blocks are offloaded
  int64_t blocks = 0;
  int64_t prefetch_size = 0;
  std::vector<int64_t> resident_blocks;  // in a device slot now
  uint64_t host_bytes = 0;               // the live host store
  uint64_t spare_host_bytes = 0;         // the second host store staged updates write (0 until the first)
  uint64_t device_bytes = 0;             // the device slots (prefetch_size + 1 of the largest block)
  uint64_t prefetches = 0;               // block copies to the device for compute since start
  uint64_t prefetched_bytes = 0;         // their bytes
  uint64_t refreshes = 0;                // resident blocks rewritten by weight updates since start
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, offload_info& x) {
  return f(caf::meta::type_name("offload_info"), x.worker, x.module, x.blocks, x.prefetch_size, x.resident_blocks, x.host_bytes,
           x.spare_host_bytes, x.device_bytes, x.prefetches, x.prefetched_bytes, x.refreshes);
}

// One worker of the server: local (host empty) or joined from another process (refit worker --join).
struct worker_info {
  int32_t index = 0;
  std::string device;
  std::string host;    // the joined process's name; empty: this process
  std::string status;  // serving; catching_up (a joined worker being given the served weights); lost
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, worker_info& x) {
  return f(caf::meta::type_name("worker_info"), x.index, x.device, x.host, x.status);
}

struct model_info {
  std::string model_path;
  std::string weight_version;
  std::vector<module_info> modules;   // every module on every serving worker
  std::vector<offload_info> offload;  // one per worker and offloaded module; empty when offload is off
  bool sleeping = false;              // the device memory was released (release_memory_occupation)
  std::vector<worker_info> workers;   // every worker the server has had, lost ones included
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, model_info& x) {
  return f(caf::meta::type_name("model_info"), x.model_path, x.weight_version, x.modules, x.offload, x.sleeping, x.workers);
}


// Counters for /metrics and tests.
struct scheduler_stats {
  uint64_t generations_ok = 0, generations_failed = 0, generations_cancelled = 0;
  uint64_t updates_ok = 0, updates_failed = 0;
  uint64_t in_flight = 0, queued = 0;
  double last_pause_s = 0;               // generation pause of the last update
  std::map<std::string, double> last_timings;
  uint64_t last_update_bytes = 0;
  // Generation latency histogram since start: counts per bucket of latency_bucket_bounds_s (the last
  // count is for latencies above every bound), their sum and count. Bounded, however long the server runs.
  std::vector<uint64_t> latency_bucket_counts;
  double latency_sum_s = 0;
  uint64_t latency_count = 0;
  std::vector<teacache_counters> teacache;  // per worker (index = worker)
  std::vector<offload_info> offload;        // per worker with layerwise offload
};

// Upper bounds of the generation-latency histogram buckets, in seconds: from a tiny CPU model (tens of
// milliseconds) to a large model's multi-minute CPU run.
inline const std::vector<double>& latency_bucket_bounds_s() {
  static const std::vector<double> bounds{0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600};
  return bounds;
}

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, scheduler_stats& x) {
  return f(caf::meta::type_name("scheduler_stats"), x.generations_ok, x.generations_failed, x.generations_cancelled,
           x.updates_ok, x.updates_failed, x.in_flight, x.queued, x.last_pause_s, x.last_timings, x.last_update_bytes,
           x.latency_bucket_counts, x.latency_sum_s, x.latency_count, x.teacache, x.offload);
}

// Fault injection (honoured only by test builds; internal control, never published): make a module
// fail in a phase. phase: validate, stage, commit, rollback, finalize; kind: error (error reply), throw
// (exception), die (actor exits). Phase "snapshot" with kind "nomem": in-place commits find no room for
// the undo snapshot (rollback re-reads). Phase "decide" with kind "lost": the next decision does not
// reach the module.
struct fault_spec {
  std::string phase;
  std::string kind;
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, fault_spec& x) {
  return f(caf::meta::type_name("fault_spec"), x.phase, x.kind);
}

}  // namespace refit::msg
