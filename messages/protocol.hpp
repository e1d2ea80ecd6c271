// refit's protocol: every message, error code and typed actor interface, in one place.
// Messages carry commands and small metadata (paths, names, checksums, encoded images), never bulk
// tensor bytes; every type has an inspect overload and is registered in refit::msg::add_types, so
// each message can cross a CAF remote connection.
#pragma once

#include <caf/all.hpp>

#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace refit::msg {

// ---------------------------------------------------------------------------------------------
// Atoms (at most 10 characters)
using generate_atom = caf::atom_constant<caf::atom("generate")>;
using update_atom = caf::atom_constant<caf::atom("update")>;
using checksum_atom = caf::atom_constant<caf::atom("checksum")>;
using info_atom = caf::atom_constant<caf::atom("info")>;
using stats_atom = caf::atom_constant<caf::atom("stats")>;
using validate_atom = caf::atom_constant<caf::atom("validate")>;
using stage_atom = caf::atom_constant<caf::atom("stage")>;
using commit_atom = caf::atom_constant<caf::atom("commit")>;
using rollback_atom = caf::atom_constant<caf::atom("rollback")>;
using finalize_atom = caf::atom_constant<caf::atom("finalize")>;
using discard_atom = caf::atom_constant<caf::atom("discard")>;
using pause_atom = caf::atom_constant<caf::atom("pause")>;
using resume_atom = caf::atom_constant<caf::atom("resume")>;
using reset_atom = caf::atom_constant<caf::atom("reset")>;
using fault_atom = caf::atom_constant<caf::atom("fault")>;
using done_atom = caf::atom_constant<caf::atom("done")>;
using modules_atom = caf::atom_constant<caf::atom("modules")>;
using recover_atom = caf::atom_constant<caf::atom("recover")>;
using decide_atom = caf::atom_constant<caf::atom("decide")>;
using teacache_atom = caf::atom_constant<caf::atom("teacache")>;

// ---------------------------------------------------------------------------------------------
// Errors: caf::error values of category "refit", with a message naming module, phase and cause.
enum class refit_errc : uint8_t {
  invalid_request = 1,  // malformed or unsupported request fields
  module_not_found,     // a target module the pipeline does not have
  checkpoint_invalid,   // plan/validate: the checkpoint cannot provide the weights
  phase_failed,         // a participant failed a phase (its reply or its death)
  cancelled,            // generation aborted by an update with abort_all_requests
  generation_failed,
  fault_injection_unavailable,
};
std::string to_string(refit_errc code);
caf::error make_error(refit_errc code, std::string message);
// The text of a refit error (or CAF's rendering of any other).
std::string describe(const caf::error& err);

// ---------------------------------------------------------------------------------------------
// Weight updates

// mode: "auto" (staged when memory allows, else in place), "staged", "in_place".
struct update_request {
  std::string model_path;
  std::vector<std::string> target_modules;  // empty: every weight-bearing module
  bool flush_cache = true;
  bool abort_all_requests = false;
  std::string weight_version;               // empty: one is derived from the update count
  std::string mode = "auto";
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, update_request& x) {
  return f(caf::meta::type_name("update_request"), x.model_path, x.target_modules, x.flush_cache,
           x.abort_all_requests, x.weight_version, x.mode);
}

// What one module actor did in one phase.
struct module_report {
  std::string module;
  int32_t worker = 0;
  uint64_t tensors = 0;
  uint64_t bytes = 0;
  double seconds = 0;
  std::string path;        // staged, in_place, reread (rollback by re-reading the old checkpoint)
  std::string source_dir;  // where its weights came from
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, module_report& x) {
  return f(caf::meta::type_name("module_report"), x.module, x.worker, x.tensors, x.bytes, x.seconds, x.path,
           x.source_dir);
}

struct update_result {
  bool success = false;
  std::string message;
  std::string weight_version;
  std::vector<module_report> modules;      // one per module per worker
  std::map<std::string, double> timings;   // phase -> seconds (plan, validate, stage, pause, commit, finish, total)
  std::string mode;                        // the path that ran: staged or in_place
  std::string mode_reason;
  bool cache_flushed = false;
  uint64_t aborted_requests = 0;
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, update_result& x) {
  return f(caf::meta::type_name("update_result"), x.success, x.message, x.weight_version, x.modules, x.timings,
           x.mode, x.mode_reason, x.cache_flushed, x.aborted_requests);
}

// ---------------------------------------------------------------------------------------------
// Generation

struct generation_request {
  std::vector<std::string> prompts;
  std::string negative_prompt;
  int64_t width = 0, height = 0;  // 0: the model's default
  int64_t steps = 0;              // 0: the model's default
  double guidance_scale = 4.0;
  uint64_t seed = 0;
  int64_t images_per_prompt = 1;
  bool enable_teacache = false;
  double teacache_threshold = -1;  // >= 0: this request's TeaCache threshold (turns TeaCache on); < 0: the model's
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, generation_request& x) {
  return f(caf::meta::type_name("generation_request"), x.prompts, x.negative_prompt, x.width, x.height, x.steps,
           x.guidance_scale, x.seed, x.images_per_prompt, x.enable_teacache, x.teacache_threshold);
}

struct generation_result {
  std::vector<std::vector<uint8_t>> png_images;
  std::string weight_version;
  double inference_time_s = 0;
  int32_t worker = 0;
  // With enable_teacache: transformer calls (steps x CFG branches) and how many of them skipped the blocks.
  uint64_t teacache_calls = 0, teacache_skipped = 0;
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, generation_result& x) {
  return f(caf::meta::type_name("generation_result"), x.png_images, x.weight_version, x.inference_time_s, x.worker,
           x.teacache_calls, x.teacache_skipped);
}

// One worker's TeaCache counters since start.
struct teacache_counters {
  uint64_t requests = 0;        // generations with enable_teacache
  uint64_t steps_computed = 0;  // transformer calls that ran the blocks
  uint64_t steps_skipped = 0;   // transformer calls that reused the branch's residual
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
  std::string source_dir;
  uint64_t undo_bytes = 0;    // held only during an update; 0 otherwise
  uint64_t shadow_bytes = 0;  // likewise
  std::string problem;        // empty, or why the weights this module holds are not known (see module_actor)
  bool kept_decided = false;  // this actor replaced a dead one and kept its decided, unfinalized commit
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, module_info& x) {
  return f(caf::meta::type_name("module_info"), x.name, x.class_name, x.dtype, x.device, x.worker, x.tensors, x.bytes,
           x.source_dir, x.undo_bytes, x.shadow_bytes, x.problem, x.kept_decided);
}

// One worker's layerwise offload of the transformer's blocks (refit serve --dit-layerwise-offload).
struct offload_info {
  int32_t worker = 0;
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
  return f(caf::meta::type_name("offload_info"), x.worker, x.blocks, x.prefetch_size, x.resident_blocks, x.host_bytes,
           x.spare_host_bytes, x.device_bytes, x.prefetches, x.prefetched_bytes, x.refreshes);
}

struct model_info {
  std::string model_path;
  std::string weight_version;
  std::vector<module_info> modules;  // every module on every worker
  std::vector<offload_info> offload;  // one per worker with layerwise offload; empty when it is off
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, model_info& x) {
  return f(caf::meta::type_name("model_info"), x.model_path, x.weight_version, x.modules, x.offload);
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

// Fault injection (honoured only by test builds): make a module fail in a phase.
// phase: validate, stage, commit, rollback; kind: error (error reply), throw (exception), die (actor exits).
// phase "snapshot" with kind "nomem" makes in-place commits skip the undo snapshot (rollback re-reads).
struct fault_spec {
  std::string phase;
  std::string kind;
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, fault_spec& x) {
  return f(caf::meta::type_name("fault_spec"), x.phase, x.kind);
}

// ---------------------------------------------------------------------------------------------
// Typed interfaces

// One weight-bearing module of one worker: owns the lifecycle of that module's parameters and buffers.
using module_actor = caf::typed_actor<
    // From headers alone: the folder provides every tensor with the right shape and a convertible dtype.
    caf::replies_to<validate_atom, std::string /*module_dir*/>::with<module_report>,
    // Staged: read the new weights into shadow buffers. In place: only prepare (nothing is read yet).
    caf::replies_to<stage_atom, std::string /*module_dir*/, std::string /*path*/>::with<module_report>,
    // Make the new weights live (swap, or undo snapshot + in-place read); keeps the undo record.
    caf::replies_to<commit_atom>::with<module_report>,
    // Restore the weights held before commit; frees undo and shadows.
    caf::replies_to<rollback_atom>::with<module_report>,
    // The update succeeded: drop undo and shadows, remember the new source folder.
    caf::replies_to<finalize_atom>::with<module_report>,
    // The update stopped before commit: free shadows.
    caf::replies_to<discard_atom>::with<module_report>,
    caf::replies_to<checksum_atom>::with<std::string>,
    caf::replies_to<info_atom>::with<module_info>,
    caf::replies_to<fault_atom, fault_spec>::with<bool>>;

// TeaCache of one worker. The per-step state lives with each request (one per CFG branch), so no
// request can read state computed with other weights; this actor keeps the worker's counters.
using cache_actor = caf::typed_actor<
    caf::replies_to<reset_atom>::with<uint64_t /*resets so far*/>,
    caf::replies_to<stats_atom>::with<teacache_counters>,
    // From the worker after a TeaCache request: transformer calls computed and skipped.
    caf::reacts_to<teacache_atom, uint64_t /*computed*/, uint64_t /*skipped*/>>;

// A worker's layerwise offload, when on. The block copies themselves are calls on the worker's compute
// thread (a message per block per step would stall it) and the module actor writes the host store
// directly; this actor reports their state.
using offload_manager_actor = caf::typed_actor<caf::replies_to<info_atom>::with<offload_info>>;

// One device's pipeline; generation runs on the worker's own thread.
using worker_actor = caf::typed_actor<caf::replies_to<generate_atom, generation_request>::with<generation_result>>;

// Supervises one worker's module actors (and answers while the worker is busy generating): one that
// dies is respawned on the same module state and first undoes any change it inherits that was not decided.
using module_supervisor_actor = caf::typed_actor<
    caf::replies_to<modules_atom>::with<std::map<std::string, module_actor>>,
    // The module's actor after it settled: the same one if it is alive, else its replacement once that
    // has started (and undone any unfinished commit of its predecessor).
    caf::replies_to<recover_atom, std::string /*module*/>::with<module_actor>,
    // Every participant of the update committed: the module's last commit stands even if its actor dies
    // before it finalizes (a replacement keeps it instead of undoing it).
    caf::replies_to<decide_atom, std::string /*module*/>::with<bool>>;

// The server's entry point (published remotely with --actor-port).
using scheduler_actor = caf::typed_actor<
    caf::replies_to<generate_atom, generation_request>::with<generation_result>,
    caf::replies_to<update_atom, update_request>::with<update_result>,
    caf::replies_to<checksum_atom, std::vector<std::string> /*modules; empty: all*/, int32_t /*worker*/>::with<
        std::map<std::string, std::string>>,
    caf::replies_to<info_atom>::with<model_info>,
    caf::replies_to<stats_atom>::with<scheduler_stats>,
    // Used by update transactions: stop dispatching and drain (or cancel) in-flight work; then resume.
    caf::replies_to<pause_atom, bool /*abort in flight*/>::with<uint64_t /*cancelled*/>,
    // committed: the update's weights are live, so the served identity changes before anything generates.
    caf::replies_to<resume_atom, bool /*committed*/>::with<std::string /*weight_version now served*/>,
    // Test builds: a fault for module M of worker W.
    caf::replies_to<fault_atom, std::string /*module*/, int32_t /*worker*/, fault_spec>::with<bool>>;

// Registers every message type and the error category on a CAF config (client and server alike).
void add_types(caf::actor_system_config& cfg);

}  // namespace refit::msg
