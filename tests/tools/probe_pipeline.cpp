// Oracle probe for the whole FLUX.2-klein pipeline.
//   probe_pipeline MODEL_DIR IN.safetensors OUT.safetensors PROMPT STEPS GUIDANCE
// IN holds "noise" [B, C, h, w]; OUT receives "image" ([B, 3, H, W] in [0, 1]), "prompt_embeds"
// and "noise_from_seed" (refit's own initial noise for seed 0, to check it equals torch.randn's).
#include <ATen/ATen.h>
#include <c10/core/InferenceMode.h>

#include <cstdio>

#include "pipeline/flux2_klein.hpp"
#include "tests/tools/tensor_io.hpp"

int main(int argc, char** argv) {
  if (argc != 7) {
    std::fprintf(stderr, "usage: probe_pipeline MODEL_DIR IN.safetensors OUT.safetensors PROMPT STEPS GUIDANCE\n");
    return 2;
  }
  try {
    c10::InferenceMode inference;
    refit::pipeline::flux2_klein_pipeline pipe(argv[1], {});
    pipe.load_weights();
    const auto in = refit::test::read_tensors(argv[2]);
    const at::Tensor noise = in.at("noise");
    const std::vector<std::string> prompts(static_cast<size_t>(noise.size(0)), argv[4]);
    const double guidance = std::stod(argv[6]);
    at::Tensor embeds = pipe.encode_prompts(prompts);
    std::optional<at::Tensor> negative;
    if (!pipe.is_distilled() && guidance > 1.0) negative = pipe.encode_prompts(std::vector<std::string>(prompts.size(), ""));
    at::Tensor image = pipe.sample(noise, embeds, negative, std::stoll(argv[5]), guidance);
    const int64_t h = noise.size(2) * 2 * pipe.vae_scale_factor(), w = noise.size(3) * 2 * pipe.vae_scale_factor();
    refit::test::write_tensors(argv[3], {{"image", image}, {"prompt_embeds", embeds},
                                         {"noise_from_seed", pipe.initial_noise(noise.size(0), h, w, 0)}});
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 1;
  }
  return 0;
}
