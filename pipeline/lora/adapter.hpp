// LoRA adapters: low-rank deltas for a module's linear weights, as PEFT and Diffusers save them.
//
// A layer of an adapter targets one 2-D weight W [out, in] of a module with A [r, in] and B [out, r];
// merged at strength s it adds s · scaling · (B @ A), scaling = alpha / r (rsLoRA: alpha / sqrt(r)), PEFT's
// definition. Files refit reads (README.md, "LoRA adapters"):
//   * PEFT: a folder with adapter_config.json and adapter_model.safetensors (keys
//     "base_model.model.<layer>.lora_A.weight", or without the prefix);
//   * Diffusers' save_lora_weights: pytorch_lora_weights.safetensors, keys "<module>.<layer>.lora_A.weight",
//     the LoRA config in the safetensors metadata ("lora_adapter_metadata");
//   * a .safetensors file of either, its config (if any) in an adapter_config.json beside it;
//   * per-layer "<layer>.alpha" scalars (kohya-style network alphas) override the config's alpha.
// Everything else (DoRA, LoRA biases, fan_in_fan_out, modules_to_save, down/up names) is refused by name.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "pipeline/weights/beneath.hpp"

namespace refit::models {
class tensor_registry;
}

namespace refit::lora {

struct lora_layer {
  std::string weight;  // the base weight it targets, e.g. "transformer_blocks.0.attn.to_q.weight"
  at::Tensor a, b;     // fp32 on the host: A [r, in], B [out, r]
  double scaling = 1;  // alpha / r (or alpha / sqrt(r))
  int64_t rank() const { return a.size(0); }
};

struct adapter {
  std::string nickname, path;           // path: where it was read from ("" for tensors a trainer sent)
  std::string module;                   // the module it targets
  std::vector<lora_layer> layers;       // ascending by weight name
  uint64_t bytes() const;
};

// Reads an adapter for `module` from `path` (a folder or a .safetensors file). `alpha`: the caller's
// override of the training alpha (SGLang's lora_alpha); per-layer alphas in the file still win. Throws
// std::invalid_argument naming the file and tensor for anything it cannot read exactly. Every file and
// folder is opened through `scope` (beneath the allowed model roots when restricted; weights::weight_error
// outside_root when one leads out of them).
std::shared_ptr<const adapter> read_adapter(const std::string& nickname, const std::filesystem::path& path, const std::string& module,
                                            std::optional<double> alpha, const weights::file_scope& scope = {});

// An adapter from named tensors (a trainer's "<layer>.lora_A.weight" / ".lora_B.weight"), alpha = the given
// one or r. Throws std::invalid_argument for a name that is not an A/B weight or an unpaired one.
std::shared_ptr<const adapter> adapter_from_tensors(const std::string& nickname, const std::string& module,
                                                    const std::map<std::string, at::Tensor>& tensors, std::optional<double> alpha);

// The prefix every name of an adapter shares and refit strips: PEFT's "base_model.model.", then Diffusers'
// "<module>.", then ComfyUI's "diffusion_model." (each only when every name has it); "" when none.
std::string shared_prefix(const std::vector<std::string>& names, const std::string& module);

// The base weight a trainer's LoRA tensor name targets ("x.lora_A.weight" -> "x.weight"), and whether it
// is an A (true) or B weight; throws std::invalid_argument for any other name.
std::pair<std::string, bool> lora_target(const std::string& name);

// Before any byte moves: `name` (an A or B weight of a trainer's announcement) targets a 2-D weight of the
// module and `shape` fits it (A: [r, in], B: [out, r]). Throws std::invalid_argument naming it.
void check_announced(const models::tensor_registry& registry, const std::string& module, const std::string& name,
                     const std::vector<int64_t>& shape);

// Every layer targets a 2-D floating weight of the module with matching dimensions. Throws
// std::invalid_argument naming the adapter tensor.
void check_fits(const adapter& a, const models::tensor_registry& registry);

// The adapters this process has loaded, by nickname (one store per server, shared by its workers). What an
// update loads is pending until the update ends: kept when it committed, dropped when it failed, so a
// failed set_lora leaves the store as it was.
class adapter_store {
 public:
  // Reads the adapter at `path` once per update (`update`: the transaction's number; every worker of that
  // update shares one read), pending under `nickname`.
  std::shared_ptr<const adapter> load(const std::string& nickname, const std::string& path, const std::string& module,
                                      std::optional<double> alpha, uint64_t update, const weights::file_scope& scope = {});
  // Keeps `a` (e.g. built from a trainer's tensors) pending for this update.
  void put(std::shared_ptr<const adapter> a, uint64_t update);
  // The adapter pending under `nickname` for this update, or null.
  std::shared_ptr<const adapter> pending(const std::string& nickname, uint64_t update) const;
  // The adapter kept under `nickname` (by an update that committed), or null.
  std::shared_ptr<const adapter> find(const std::string& nickname) const;
  // The update ended: keep what it loaded (replacing adapters of the same nicknames), or drop it.
  void end_update(uint64_t update, bool committed);
  // nickname -> path of the kept adapters, in the order they were first kept.
  std::vector<std::pair<std::string, std::string>> list() const;

 private:
  struct entry {
    std::string nickname;
    std::shared_ptr<const adapter> a;
    std::optional<double> alpha;
  };
  mutable std::mutex mutex_;
  std::vector<entry> kept_;
  std::map<uint64_t, std::vector<entry>> pending_;
};

}  // namespace refit::lora
