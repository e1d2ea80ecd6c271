#include "pipeline/models/vae_flux2.hpp"

#include <ATen/ATen.h>
#include <nlohmann/json.hpp>

#include "pipeline/models/config_json.hpp"

#include <stdexcept>

namespace refit::models {

using json = nlohmann::json;

namespace {

std::string shape_str(at::IntArrayRef s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) {
    if (i) out += ", ";
    out += std::to_string(s[i]);
  }
  return out + "]";
}

// Fails unless x is [B, channels, h, w].
void expect_nchw(const at::Tensor& x, int64_t channels, const char* what) {
  if (x.dim() != 4 || x.size(1) != channels)
    throw std::invalid_argument(std::string("vae_flux2: ") + what + " must be [B, " + std::to_string(channels) +
                                ", H, W], got " + shape_str(x.sizes()));
}

}  // namespace

vae_flux2_config vae_flux2_config::from_file(const std::filesystem::path& path) {
  const json j = read_config_json(path);
  const std::string where = path.string() + ": ";
  vae_flux2_config c;
  auto get = [&](const char* key, auto& field) {
    auto it = j.find(key);
    if (it == j.end() || it->is_null()) return;
    try {
      field = it->get<std::decay_t<decltype(field)>>();
    } catch (const json::exception&) {
      throw std::runtime_error(where + "'" + key + "' has the wrong type (" + it->dump() + ")");
    }
  };
  get("in_channels", c.in_channels);
  get("out_channels", c.out_channels);
  get("latent_channels", c.latent_channels);
  get("block_out_channels", c.block_out_channels);
  get("decoder_block_out_channels", c.decoder_block_out_channels);
  get("down_block_types", c.down_block_types);
  get("up_block_types", c.up_block_types);
  get("layers_per_block", c.layers_per_block);
  get("norm_num_groups", c.norm_num_groups);
  get("act_fn", c.act_fn);
  get("mid_block_add_attention", c.mid_block_add_attention);
  get("use_quant_conv", c.use_quant_conv);
  get("use_post_quant_conv", c.use_post_quant_conv);
  get("force_upcast", c.force_upcast);
  get("batch_norm_eps", c.batch_norm_eps);
  get("patch_size", c.patch_size);

  // diffusers maps both names to nn.SiLU.
  if (c.act_fn != "silu" && c.act_fn != "swish")
    throw std::runtime_error(where + "act_fn '" + c.act_fn + "' is not supported (only 'silu')");
  for (const auto& t : c.down_block_types)
    if (t != "DownEncoderBlock2D")
      throw std::runtime_error(where + "down_block_types entry '" + t + "' is not supported (only 'DownEncoderBlock2D')");
  for (const auto& t : c.up_block_types)
    if (t != "UpDecoderBlock2D")
      throw std::runtime_error(where + "up_block_types entry '" + t + "' is not supported (only 'UpDecoderBlock2D')");
  if (c.block_out_channels.empty() || c.down_block_types.size() != c.block_out_channels.size())
    throw std::runtime_error(where + "down_block_types needs one entry per block_out_channels entry (" +
                             std::to_string(c.down_block_types.size()) + " vs " + std::to_string(c.block_out_channels.size()) + ")");
  if (c.up_block_types.size() != c.decoder_channels().size())
    throw std::runtime_error(where + "up_block_types needs one entry per decoder block (" + std::to_string(c.up_block_types.size()) +
                             " vs " + std::to_string(c.decoder_channels().size()) + ")");
  if (c.layers_per_block < 1) throw std::runtime_error(where + "layers_per_block must be at least 1");
  if (c.patch_size.size() != 2 || c.patch_size[0] < 1 || c.patch_size[1] < 1)
    throw std::runtime_error(where + "patch_size must be two positive integers");
  for (int64_t v : {c.in_channels, c.out_channels, c.latent_channels, c.norm_num_groups})
    if (v < 1) throw std::runtime_error(where + "channel and group counts must be positive");
  auto check_groups = [&](const std::vector<int64_t>& channels, const char* key) {
    for (int64_t ch : channels)
      if (ch < 1 || ch % c.norm_num_groups)
        throw std::runtime_error(where + key + " entry " + std::to_string(ch) + " is not a positive multiple of norm_num_groups " +
                                 std::to_string(c.norm_num_groups));
  };
  check_groups(c.block_out_channels, "block_out_channels");
  check_groups(c.decoder_channels(), "decoder_block_out_channels");
  return c;
}

void vae_flux2::bind_resnet(resnet_block& r, int64_t in, int64_t out, const registry_scope& s) const {
  const int64_t g = config_.norm_num_groups;
  r.norm1 = group_norm(g, in, 1e-6);
  r.conv1 = conv2d(in, out, 3, 1, 1);
  r.norm2 = group_norm(g, out, 1e-6);
  r.conv2 = conv2d(out, out, 3, 1, 1);
  r.norm1.bind(s.sub("norm1"));
  r.conv1.bind(s.sub("conv1"));
  r.norm2.bind(s.sub("norm2"));
  r.conv2.bind(s.sub("conv2"));
  if (in != out) r.conv_shortcut.emplace(in, out, 1, 1, 0).bind(s.sub("conv_shortcut"));
}

void vae_flux2::bind_mid(mid_block& m, int64_t channels, const registry_scope& s) const {
  bind_resnet(m.resnet_0, channels, channels, s.sub("resnets").sub(size_t{0}));
  if (config_.mid_block_add_attention) {
    mid_attention& a = m.attention.emplace();
    const registry_scope as = s.sub("attentions").sub(size_t{0});
    a.norm = group_norm(config_.norm_num_groups, channels, 1e-6);
    a.norm.bind(as.sub("group_norm"));
    const std::pair<linear*, const char*> projections[] = {
        {&a.to_q, "to_q"}, {&a.to_k, "to_k"}, {&a.to_v, "to_v"}, {&a.to_out_0, "to_out.0"}};
    for (auto [l, name] : projections) {
      *l = linear(channels, channels, true);
      l->bind(as.sub(name));
    }
  }
  bind_resnet(m.resnet_1, channels, channels, s.sub("resnets").sub(size_t{1}));
}

vae_flux2::vae_flux2(const vae_flux2_config& c) : config_(c) {
  registry_scope root(registry_);
  const auto& enc_ch = c.block_out_channels;
  const auto& dec_ch = c.decoder_channels();
  const size_t enc_levels = enc_ch.size(), dec_levels = dec_ch.size();

  registry_scope es = root.sub("encoder");
  encoder_.conv_in = conv2d(c.in_channels, enc_ch[0], 3, 1, 1);
  encoder_.conv_in.bind(es.sub("conv_in"));
  encoder_.down_blocks.resize(enc_levels);  // sized before binding: the registry points into these
  for (size_t i = 0; i < enc_levels; ++i) {
    level& b = encoder_.down_blocks[i];
    const registry_scope bs = es.sub("down_blocks").sub(i);
    b.resnets.resize(static_cast<size_t>(c.layers_per_block));
    for (size_t j = 0; j < b.resnets.size(); ++j)
      bind_resnet(b.resnets[j], j == 0 ? enc_ch[i == 0 ? 0 : i - 1] : enc_ch[i], enc_ch[i], bs.sub("resnets").sub(j));
    // Downsample2D(padding=0): the asymmetric pad happens in forward.
    if (i + 1 < enc_levels) b.resample.emplace(enc_ch[i], enc_ch[i], 3, 2, 0).bind(bs.sub("downsamplers").sub(size_t{0}).sub("conv"));
  }
  bind_mid(encoder_.mid, enc_ch.back(), es.sub("mid_block"));
  encoder_.conv_norm_out = group_norm(c.norm_num_groups, enc_ch.back(), 1e-6);
  encoder_.conv_norm_out.bind(es.sub("conv_norm_out"));
  encoder_.conv_out = conv2d(enc_ch.back(), 2 * c.latent_channels, 3, 1, 1);  // mean and logvar
  encoder_.conv_out.bind(es.sub("conv_out"));

  registry_scope ds = root.sub("decoder");
  decoder_.conv_in = conv2d(c.latent_channels, dec_ch.back(), 3, 1, 1);
  decoder_.conv_in.bind(ds.sub("conv_in"));
  bind_mid(decoder_.mid, dec_ch.back(), ds.sub("mid_block"));
  decoder_.up_blocks.resize(dec_levels);
  for (size_t i = 0; i < dec_levels; ++i) {
    level& b = decoder_.up_blocks[i];
    const registry_scope bs = ds.sub("up_blocks").sub(i);
    const int64_t out = dec_ch[dec_levels - 1 - i], prev = dec_ch[dec_levels - (i == 0 ? 1 : i)];
    b.resnets.resize(static_cast<size_t>(c.layers_per_block + 1));
    for (size_t j = 0; j < b.resnets.size(); ++j) bind_resnet(b.resnets[j], j == 0 ? prev : out, out, bs.sub("resnets").sub(j));
    if (i + 1 < dec_levels) b.resample.emplace(out, out, 3, 1, 1).bind(bs.sub("upsamplers").sub(size_t{0}).sub("conv"));
  }
  decoder_.conv_norm_out = group_norm(c.norm_num_groups, dec_ch[0], 1e-6);
  decoder_.conv_norm_out.bind(ds.sub("conv_norm_out"));
  decoder_.conv_out = conv2d(dec_ch[0], c.out_channels, 3, 1, 1);
  decoder_.conv_out.bind(ds.sub("conv_out"));

  if (c.use_quant_conv) quant_conv_.emplace(2 * c.latent_channels, 2 * c.latent_channels, 1, 1, 0).bind(root.sub("quant_conv"));
  if (c.use_post_quant_conv) post_quant_conv_.emplace(c.latent_channels, c.latent_channels, 1, 1, 0).bind(root.sub("post_quant_conv"));

  // BatchNorm2d(affine=False): only running statistics, plus the int64 step counter torch saves with them.
  const registry_scope bn = root.sub("bn");
  bn.buffer("running_mean", bn_running_mean_, {c.bn_channels()});
  bn.buffer("running_var", bn_running_var_, {c.bn_channels()});
  bn.buffer("num_batches_tracked", bn_num_batches_tracked_, {}, at::kLong);
}

at::Tensor vae_flux2::resnet_block::operator()(const at::Tensor& x) const {
  at::Tensor h = conv1(at::silu(norm1(x)));
  h = conv2(at::silu(norm2(h)));  // dropout 0, no time embedding
  const at::Tensor shortcut = conv_shortcut ? (*conv_shortcut)(x) : x;
  return shortcut + h;  // output_scale_factor is 1 in the VAE
}

at::Tensor vae_flux2::mid_attention::operator()(const at::Tensor& x) const {
  // Same op order and views as AttnProcessor2_0, so SDPA sees the same layouts.
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  at::Tensor h = norm(x.reshape({B, C, H * W})).transpose(1, 2);  // [B, HW, C]
  auto heads = [&](const at::Tensor& t) { return t.view({B, -1, 1, C}).transpose(1, 2); };  // [B, 1, HW, C]
  at::Tensor o = at::scaled_dot_product_attention(heads(to_q(h)), heads(to_k(h)), heads(to_v(h)));
  o = to_out_0(o.transpose(1, 2).reshape({B, -1, C}));
  // Residual connection; rescale_output_factor is 1 for the Encoder and Decoder mid blocks.
  return o.transpose(-1, -2).reshape({B, C, H, W}) + x;
}

at::Tensor vae_flux2::mid_block::operator()(const at::Tensor& x) const {
  at::Tensor h = resnet_0(x);
  if (attention) h = (*attention)(h);
  return resnet_1(h);
}

at::Tensor vae_flux2::encode_mean(const at::Tensor& image) const {
  expect_nchw(image, config_.in_channels, "encode_mean image");
  const at::Tensor& w = encoder_.conv_in.weight;
  at::Tensor h = encoder_.conv_in(image.to(w.device(), w.scalar_type()));
  for (const level& b : encoder_.down_blocks) {
    for (const resnet_block& r : b.resnets) h = r(h);
    if (b.resample) h = (*b.resample)(at::constant_pad_nd(h, {0, 1, 0, 1}, 0));
  }
  h = encoder_.mid(h);
  h = encoder_.conv_out(at::silu(encoder_.conv_norm_out(h)));
  if (quant_conv_) h = (*quant_conv_)(h);
  return h.narrow(1, 0, config_.latent_channels);  // the posterior's mean (= mode); logvar is the other half
}

at::Tensor vae_flux2::decode(const at::Tensor& latents) const {
  expect_nchw(latents, config_.latent_channels, "decode latents");
  const at::Tensor& w = decoder_.conv_in.weight;
  at::Tensor z = latents.to(w.device(), w.scalar_type());
  if (post_quant_conv_) z = (*post_quant_conv_)(z);
  at::Tensor h = decoder_.mid(decoder_.conv_in(z));
  for (const level& b : decoder_.up_blocks) {
    for (const resnet_block& r : b.resnets) h = r(h);
    if (b.resample) {
      const double scale = 2.0;  // F.interpolate(scale_factor=2.0, mode="nearest")
      h = (*b.resample)(at::upsample_nearest2d(h, {2 * h.size(2), 2 * h.size(3)}, scale, scale));
    }
  }
  return decoder_.conv_out(at::silu(decoder_.conv_norm_out(h)));
}

at::Tensor vae_flux2::patchify_latents(const at::Tensor& latents) {
  if (latents.dim() != 4 || latents.size(2) % 2 || latents.size(3) % 2)
    throw std::invalid_argument("vae_flux2: cannot patchify latents " + shape_str(latents.sizes()) + " (need [B, C, even h, even w])");
  const int64_t B = latents.size(0), C = latents.size(1), h = latents.size(2), w = latents.size(3);
  return latents.reshape({B, C, h / 2, 2, w / 2, 2}).permute({0, 1, 3, 5, 2, 4}).reshape({B, C * 4, h / 2, w / 2});
}

at::Tensor vae_flux2::unpatchify_latents(const at::Tensor& latents) {
  if (latents.dim() != 4 || latents.size(1) % 4)
    throw std::invalid_argument("vae_flux2: cannot unpatchify latents " + shape_str(latents.sizes()) + " (need [B, 4C, h, w])");
  const int64_t B = latents.size(0), C = latents.size(1), h = latents.size(2), w = latents.size(3);
  return latents.reshape({B, C / 4, 2, 2, h, w}).permute({0, 1, 4, 2, 5, 3}).reshape({B, C / 4, h * 2, w * 2});
}

std::pair<at::Tensor, at::Tensor> vae_flux2::bn_mean_std(const at::Tensor& like) const {
  // As the pipeline: statistics in the VAE's dtype, std = sqrt(var + eps), then cast to the latents'.
  const auto opts = like.options();
  at::Tensor mean = bn_running_mean_.view({1, -1, 1, 1}).to(opts);
  at::Tensor std = at::sqrt(bn_running_var_.view({1, -1, 1, 1}) + config_.batch_norm_eps).to(opts);
  return {mean, std};
}

at::Tensor vae_flux2::bn_normalize(const at::Tensor& packed) const {
  expect_nchw(packed, config_.bn_channels(), "bn_normalize latents");
  auto [mean, std] = bn_mean_std(packed);
  return (packed - mean) / std;
}

at::Tensor vae_flux2::bn_denormalize(const at::Tensor& packed) const {
  expect_nchw(packed, config_.bn_channels(), "bn_denormalize latents");
  auto [mean, std] = bn_mean_std(packed);
  return packed * std + mean;
}

void vae_flux2::require_klein_patches() const {
  if (config_.patch_size != std::vector<int64_t>{2, 2})
    throw std::invalid_argument("vae_flux2: the Klein pipeline packs latents 2x2, this VAE's patch_size is " +
                                shape_str(config_.patch_size));
}

at::Tensor vae_flux2::decode_packed(const at::Tensor& packed) const {
  require_klein_patches();
  return decode(unpatchify_latents(bn_denormalize(packed)));
}

at::Tensor vae_flux2::encode_packed(const at::Tensor& image) const {
  require_klein_patches();
  return bn_normalize(patchify_latents(encode_mean(image)));
}

}  // namespace refit::models
