// Oracle probe for AutoencoderKLFlux2.
//   probe_vae VAE_DIR INPUTS.safetensors OUT.safetensors
//     loads the component folder and runs what INPUTS asks for:
//       image   [B, 3, H, W]   -> mean (encode_mean), encoded_packed (encode_packed)
//       latents [B, C, h, w]   -> decoded (decode), patchified (patchify_latents)
//       packed  [B, 4C, h, w]  -> decoded_packed (decode_packed), unpatchified (unpatchify_latents)
//   probe_vae --names CONFIG.json
//     prints the registry (name, shape, fixed dtype) that config builds, one tensor a line, then its numel.
// Config and load errors go to stderr with exit status 1.
#include <ATen/ATen.h>
#include <c10/core/InferenceMode.h>

#include <cstdio>
#include <cstring>

#include "pipeline/models/model_loader.hpp"
#include "pipeline/models/vae_flux2.hpp"
#include "tests/tools/tensor_io.hpp"

namespace {

void print_registry(const refit::models::tensor_registry& registry) {
  for (const auto& s : registry.slots()) {
    std::string shape;
    for (size_t i = 0; i < s.shape.size(); ++i) {
      if (i) shape += ',';
      shape += std::to_string(s.shape[i]);
    }
    std::printf("%s\t[%s]\t%s\n", s.name.c_str(), shape.c_str(), s.fixed_dtype ? c10::toString(*s.fixed_dtype) : "float");
  }
  std::printf("numel\t%llu\n", static_cast<unsigned long long>(registry.numel()));
}

}  // namespace

int main(int argc, char** argv) {
  using refit::models::vae_flux2;
  try {
    if (argc == 3 && std::strcmp(argv[1], "--names") == 0) {
      vae_flux2 vae(refit::models::vae_flux2_config::from_file(argv[2]));
      print_registry(vae.registry());
      return 0;
    }
    if (argc != 4) {
      std::fprintf(stderr, "usage: probe_vae VAE_DIR INPUTS.safetensors OUT.safetensors | probe_vae --names CONFIG.json\n");
      return 2;
    }
    const std::filesystem::path dir = argv[1];
    vae_flux2 vae(refit::models::vae_flux2_config::from_file(dir / "config.json"));
    refit::models::load_into(vae.registry(), refit::weights::open_module_dir("vae", dir), {});
    const auto in = refit::test::read_tensors(argv[2]);
    c10::InferenceMode inference;
    std::map<std::string, at::Tensor> out;
    if (in.count("image")) {
      out["mean"] = vae.encode_mean(in.at("image"));
      out["encoded_packed"] = vae.encode_packed(in.at("image"));
    }
    if (in.count("latents")) {
      out["decoded"] = vae.decode(in.at("latents"));
      out["patchified"] = vae_flux2::patchify_latents(in.at("latents"));
    }
    if (in.count("packed")) {
      out["decoded_packed"] = vae.decode_packed(in.at("packed"));
      out["unpatchified"] = vae_flux2::unpatchify_latents(in.at("packed"));
    }
    refit::test::write_tensors(argv[3], out);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 1;
  }
  return 0;
}
