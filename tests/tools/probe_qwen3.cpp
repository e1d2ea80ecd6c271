// Oracle probe: loads a Qwen3ForCausalLM folder (config.json + model.safetensors or shards) and computes
// the FLUX.2-klein prompt embeddings from hidden-state taps.
//   probe_qwen3 [--dtype=bf16|fp32] MODEL_DIR INPUTS.safetensors OUT.safetensors TAP...
// INPUTS holds input_ids and attention_mask [B, L] (int64); OUT receives "prompt_embeds" and, to prove
// the registry covers the checkpoint, "tensor_count" (int64 scalar). Errors go to stderr, exit status 1.
#include <ATen/ATen.h>
#include <c10/core/InferenceMode.h>

#include <cstdio>
#include <string>
#include <vector>

#include "pipeline/models/model_loader.hpp"
#include "pipeline/models/qwen3.hpp"
#include "tests/tools/tensor_io.hpp"

int main(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  refit::models::placement where;
  bool usage_ok = true;
  if (!args.empty() && args[0].starts_with("--dtype=")) {
    const std::string d = args[0].substr(8);
    usage_ok = d == "bf16" || d == "fp32";
    where.float_dtype = refit::models::parse_float_dtype(d);
    args.erase(args.begin());
  }
  if (!usage_ok || args.size() < 4) {
    std::fprintf(stderr, "usage: probe_qwen3 [--dtype=bf16|fp32] MODEL_DIR INPUTS.safetensors OUT.safetensors TAP...\n");
    return 2;
  }
  try {
    const std::filesystem::path dir = args[0];
    std::vector<int> taps;
    for (size_t i = 3; i < args.size(); ++i) taps.push_back(std::stoi(args[i]));
    refit::models::qwen3_text_encoder model(refit::models::qwen3_config::from_file(dir / "config.json"));
    refit::models::load_into(model.registry(), refit::weights::open_module_dir("text_encoder", dir), where);
    auto in = refit::test::read_tensors(args[1]);
    c10::InferenceMode inference;
    at::Tensor out = model.hidden_state_taps(in.at("input_ids"), in.at("attention_mask"), taps);
    const auto count = static_cast<int64_t>(model.registry().slots().size());
    refit::test::write_tensors(args[2], {{"prompt_embeds", out}, {"tensor_count", at::scalar_tensor(count, at::kLong)}});
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 1;
  }
  return 0;
}
