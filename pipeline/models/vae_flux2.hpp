// AutoencoderKLFlux2 (the FLUX.2 VAE), mirroring diffusers' autoencoder_kl_flux2.py with vae.py's Encoder and
// Decoder: ResnetBlock2D down/up blocks, a single-head attention mid block, optional quant convs, and the
// BatchNorm statistics that the Klein pipeline uses to normalise its patchified latents. Member and parameter
// names are the checkpoint's.
#pragma once

#include <ATen/core/Tensor.h>

#include <filesystem>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "pipeline/models/layers.hpp"
#include "pipeline/models/tensor_registry.hpp"

namespace refit::models {

struct vae_flux2_config {
  int64_t in_channels = 3;
  int64_t out_channels = 3;
  int64_t latent_channels = 32;
  std::vector<int64_t> block_out_channels{128, 256, 512, 512};
  std::vector<int64_t> decoder_block_out_channels;  // empty: the decoder mirrors block_out_channels
  std::vector<std::string> down_block_types = std::vector<std::string>(4, "DownEncoderBlock2D");
  std::vector<std::string> up_block_types = std::vector<std::string>(4, "UpDecoderBlock2D");
  int64_t layers_per_block = 2;
  int64_t norm_num_groups = 32;
  std::string act_fn = "silu";
  bool mid_block_add_attention = true;
  bool use_quant_conv = true;
  bool use_post_quant_conv = true;
  bool force_upcast = true;  // a hint that the VAE should run in fp32; the model itself ignores it
  double batch_norm_eps = 1e-4;
  std::vector<int64_t> patch_size{2, 2};

  // Reads vae/config.json; keys it lacks take the class defaults, like diffusers. Anything this
  // implementation does not compute exactly (other block types or activations) is refused by name.
  static vae_flux2_config from_file(const std::filesystem::path& config_json);
  const std::vector<int64_t>& decoder_channels() const {
    return decoder_block_out_channels.empty() ? block_out_channels : decoder_block_out_channels;
  }
  int64_t bn_channels() const { return patch_size[0] * patch_size[1] * latent_channels; }
};

class vae_flux2 {
 public:
  explicit vae_flux2(const vae_flux2_config& config);
  vae_flux2(const vae_flux2&) = delete;
  vae_flux2& operator=(const vae_flux2&) = delete;

  const vae_flux2_config& config() const { return config_; }
  tensor_registry& registry() { return registry_; }
  const tensor_registry& registry() const { return registry_; }

  // image [B, in_channels, H, W] in [-1, 1] -> posterior mean [B, latent_channels, H/f, W/f]
  // (f = 2^(levels-1)), as `vae.encode(x).latent_dist.mode()`.
  at::Tensor encode_mean(const at::Tensor& image) const;
  // latents [B, latent_channels, h, w] -> image [B, out_channels, h·f, w·f], as `vae.decode(z).sample`.
  at::Tensor decode(const at::Tensor& latents) const;

  // The Klein pipeline's 2x2 space-to-channel packing: [B, C, h, w] <-> [B, 4C, h/2, w/2].
  static at::Tensor patchify_latents(const at::Tensor& latents);
  static at::Tensor unpatchify_latents(const at::Tensor& latents);
  // (x - running_mean) / sqrt(running_var + eps) and its inverse, per channel of patchified latents.
  at::Tensor bn_normalize(const at::Tensor& packed) const;
  at::Tensor bn_denormalize(const at::Tensor& packed) const;
  // Normalised patchified latents [B, 4C, h, w] -> image in [-1, 1] [B, out_channels, 2h·f, 2w·f]:
  // denormalise, unpatchify, decode, as Flux2KleinPipeline does before postprocessing.
  at::Tensor decode_packed(const at::Tensor& packed) const;
  // The pipeline's image-conditioning path: encode_mean, patchify, normalise.
  at::Tensor encode_packed(const at::Tensor& image) const;

 private:
  struct resnet_block {
    group_norm norm1, norm2;
    conv2d conv1, conv2;
    std::optional<conv2d> conv_shortcut;  // present when in != out channels
    at::Tensor operator()(const at::Tensor& x) const;
  };
  // diffusers' Attention(_from_deprecated_attn_block) over the H·W positions: one head of all channels, since
  // vae.py sets attention_head_dim to the channel count.
  struct mid_attention {
    group_norm norm;
    linear to_q, to_k, to_v, to_out_0;
    at::Tensor operator()(const at::Tensor& x) const;
  };
  struct mid_block {
    resnet_block resnet_0, resnet_1;
    std::optional<mid_attention> attention;
    at::Tensor operator()(const at::Tensor& x) const;
  };
  struct level {
    std::vector<resnet_block> resnets;
    std::optional<conv2d> resample;  // downsamplers.0.conv (encoder) or upsamplers.0.conv (decoder)
  };
  struct encoder {
    conv2d conv_in, conv_out;
    std::vector<level> down_blocks;
    mid_block mid;
    group_norm conv_norm_out;
  };
  struct decoder {
    conv2d conv_in, conv_out;
    mid_block mid;
    std::vector<level> up_blocks;
    group_norm conv_norm_out;
  };

  void bind_resnet(resnet_block& r, int64_t in, int64_t out, const registry_scope& s) const;
  void bind_mid(mid_block& m, int64_t channels, const registry_scope& s) const;
  std::pair<at::Tensor, at::Tensor> bn_mean_std(const at::Tensor& like) const;
  void require_klein_patches() const;

  vae_flux2_config config_;
  tensor_registry registry_;
  encoder encoder_;
  decoder decoder_;
  std::optional<conv2d> quant_conv_, post_quant_conv_;
  at::Tensor bn_running_mean_, bn_running_var_, bn_num_batches_tracked_;
};

}  // namespace refit::models
