// Oracle probe: loads a Flux2Transformer2DModel component folder and runs one forward pass.
//   probe_flux2 TRANSFORMER_DIR INPUTS.safetensors OUT.safetensors
// INPUTS holds hidden_states, encoder_hidden_states, timestep, img_ids, txt_ids (and optionally guidance);
// OUT receives "output". Load errors go to stderr with exit status 1.
#include <ATen/ATen.h>
#include <c10/core/InferenceMode.h>

#include <cstdio>

#include "pipeline/models/flux2_transformer.hpp"
#include "pipeline/models/model_loader.hpp"
#include "tests/tools/tensor_io.hpp"

int main(int argc, char** argv) {
  if (argc != 4) {
    std::fprintf(stderr, "usage: probe_flux2 TRANSFORMER_DIR INPUTS.safetensors OUT.safetensors\n");
    return 2;
  }
  try {
    const std::filesystem::path dir = argv[1];
    refit::models::flux2_transformer model(refit::models::flux2_config::from_file(dir / "config.json"));
    refit::models::load_into(model.registry(), refit::weights::open_module_dir("transformer", dir), {});
    auto in = refit::test::read_tensors(argv[2]);
    std::optional<at::Tensor> guidance;
    if (in.count("guidance")) guidance = in.at("guidance");
    c10::InferenceMode inference;
    at::Tensor out = model.forward(in.at("hidden_states"), in.at("encoder_hidden_states"), in.at("timestep"),
                                   in.at("img_ids"), in.at("txt_ids"), guidance);
    refit::test::write_tensors(argv[3], {{"output", out}});
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 1;
  }
  return 0;
}
