#include "pipeline/models/flux2_transformer.hpp"

#include <ATen/ATen.h>
#include <nlohmann/json.hpp>

#include "pipeline/models/config_json.hpp"
#include "pipeline/models/layer_offload.hpp"

#include <algorithm>
#include <cmath>
#include <limits>

namespace refit::models {

using json = nlohmann::json;

flux2_config flux2_config::from_file(const std::filesystem::path& path) {
  const json j = read_config_json(path);
  flux2_config c;
  auto get = [&](const char* key, auto& field) {
    if (auto it = j.find(key); it != j.end() && !it->is_null()) field = it->get<std::decay_t<decltype(field)>>();
  };
  get("patch_size", c.patch_size);
  get("in_channels", c.in_channels);
  c.out_channels = c.in_channels;
  get("out_channels", c.out_channels);
  get("num_layers", c.num_layers);
  get("num_single_layers", c.num_single_layers);
  get("attention_head_dim", c.attention_head_dim);
  get("num_attention_heads", c.num_attention_heads);
  get("joint_attention_dim", c.joint_attention_dim);
  get("timestep_guidance_channels", c.timestep_guidance_channels);
  get("mlp_ratio", c.mlp_ratio);
  get("axes_dims_rope", c.axes_dims_rope);
  get("rope_theta", c.rope_theta);
  get("eps", c.eps);
  get("guidance_embeds", c.guidance_embeds);
  int64_t rope_sum = 0;
  for (auto d : c.axes_dims_rope) {
    if (d <= 0 || d % 2) throw std::runtime_error(path.string() + ": every axes_dims_rope entry must be positive and even");
    rope_sum += d;
  }
  if (rope_sum != c.attention_head_dim)
    throw std::runtime_error(path.string() + ": axes_dims_rope must sum to attention_head_dim (" + std::to_string(rope_sum) +
                             " != " + std::to_string(c.attention_head_dim) + ")");
  return c;
}

flux2_transformer::flux2_transformer(const flux2_config& c) : config_(c) {
  const int64_t D = c.inner_dim(), M = c.mlp_hidden_dim(), hd = c.attention_head_dim;
  registry_scope root(registry_);
  auto bind = [](linear& l, int64_t in, int64_t out, const registry_scope& s) {
    l = linear(in, out, false);
    l.bind(s);
  };
  registry_scope tge = root.sub("time_guidance_embed");
  bind(time_linear_1, c.timestep_guidance_channels, D, tge.sub("timestep_embedder").sub("linear_1"));
  bind(time_linear_2, D, D, tge.sub("timestep_embedder").sub("linear_2"));
  if (c.guidance_embeds) {
    bind(guidance_linear_1, c.timestep_guidance_channels, D, tge.sub("guidance_embedder").sub("linear_1"));
    bind(guidance_linear_2, D, D, tge.sub("guidance_embedder").sub("linear_2"));
  }
  bind(mod_img, D, 6 * D, root.sub("double_stream_modulation_img").sub("linear"));
  bind(mod_txt, D, 6 * D, root.sub("double_stream_modulation_txt").sub("linear"));
  bind(mod_single, D, 3 * D, root.sub("single_stream_modulation").sub("linear"));
  bind(x_embedder, c.in_channels, D, root.sub("x_embedder"));
  bind(context_embedder, c.joint_attention_dim, D, root.sub("context_embedder"));

  blocks_.resize(static_cast<size_t>(c.num_layers));
  for (size_t i = 0; i < blocks_.size(); ++i) {
    auto& b = blocks_[i];
    registry_scope s = root.sub("transformer_blocks").sub(i);
    registry_scope a = s.sub("attn");
    bind(b.to_q, D, D, a.sub("to_q"));
    bind(b.to_k, D, D, a.sub("to_k"));
    bind(b.to_v, D, D, a.sub("to_v"));
    bind(b.to_out_0, D, D, a.sub("to_out").sub("0"));
    bind(b.add_q_proj, D, D, a.sub("add_q_proj"));
    bind(b.add_k_proj, D, D, a.sub("add_k_proj"));
    bind(b.add_v_proj, D, D, a.sub("add_v_proj"));
    bind(b.to_add_out, D, D, a.sub("to_add_out"));
    a.sub("norm_q").param("weight", b.norm_q, {hd});
    a.sub("norm_k").param("weight", b.norm_k, {hd});
    a.sub("norm_added_q").param("weight", b.norm_added_q, {hd});
    a.sub("norm_added_k").param("weight", b.norm_added_k, {hd});
    bind(b.ff.linear_in, D, 2 * M, s.sub("ff").sub("linear_in"));
    bind(b.ff.linear_out, M, D, s.sub("ff").sub("linear_out"));
    bind(b.ff_context.linear_in, D, 2 * M, s.sub("ff_context").sub("linear_in"));
    bind(b.ff_context.linear_out, M, D, s.sub("ff_context").sub("linear_out"));
  }
  single_blocks_.resize(static_cast<size_t>(c.num_single_layers));
  for (size_t i = 0; i < single_blocks_.size(); ++i) {
    auto& b = single_blocks_[i];
    registry_scope a = root.sub("single_transformer_blocks").sub(i).sub("attn");
    bind(b.to_qkv_mlp_proj, D, 3 * D + 2 * M, a.sub("to_qkv_mlp_proj"));
    bind(b.to_out, D + M, D, a.sub("to_out"));
    a.sub("norm_q").param("weight", b.norm_q, {hd});
    a.sub("norm_k").param("weight", b.norm_k, {hd});
  }
  bind(norm_out_linear, D, 2 * D, root.sub("norm_out").sub("linear"));
  bind(proj_out, D, c.patch_size * c.patch_size * c.out_channels, root.sub("proj_out"));
}

namespace {

// SwiGLU with the gate in the first half.
at::Tensor swiglu(const at::Tensor& x) {
  const int64_t half = x.size(-1) / 2;
  return at::silu(x.narrow(-1, 0, half)) * x.narrow(-1, half, half);
}

at::Tensor rms(const at::Tensor& x, const at::Tensor& weight, double eps) {
  return at::rms_norm(x, {x.size(-1)}, weight, eps);
}

// x [B, S, H, D], rotary [S, D / 2] complex: each interleaved pair (x0, x1) times (cos, sin) as one complex
// product, in float32: the same values as diffusers' real form (x * cos + rotate(x) * sin), in three kernels
// instead of eight.
at::Tensor apply_rope(const at::Tensor& x, const at::Tensor& rotary) {
  auto pairs = x.sizes().vec();
  pairs.back() /= 2;
  pairs.push_back(2);
  const at::Tensor xc = at::view_as_complex(x.to(at::kFloat).reshape(pairs));
  return at::view_as_real(xc * rotary.unsqueeze(0).unsqueeze(2)).flatten(3).to(x.scalar_type());
}

// The (cos, sin) tables of rope(), each value repeated for both members of a pair, as [S, D / 2] complex.
at::Tensor complex_rotary(const std::pair<at::Tensor, at::Tensor>& tables) {
  const int64_t d = tables.first.size(-1);
  return at::complex(tables.first.slice(-1, 0, d, 2), tables.second.slice(-1, 0, d, 2));
}

std::vector<at::Tensor> split_modulation(const at::Tensor& mod, int64_t sets) {
  return (mod.dim() == 2 ? mod.unsqueeze(1) : mod).chunk(3 * sets, -1);
}

// (1 + scale) * normed + shift, and the gated residuals x + gate * y, each one kernel over the activations.
at::Tensor modulate(const at::Tensor& normed, const at::Tensor& shift, const at::Tensor& scale) {
  return at::addcmul(shift, normed, 1 + scale);
}

}  // namespace

std::vector<std::string> flux2_transformer::block_prefixes() const {
  std::vector<std::string> out;
  for (size_t i = 0; i < blocks_.size(); ++i) out.push_back("transformer_blocks." + std::to_string(i) + ".");
  for (size_t i = 0; i < single_blocks_.size(); ++i) out.push_back("single_transformer_blocks." + std::to_string(i) + ".");
  return out;
}

at::Tensor flux2_transformer::feed_forward::operator()(const at::Tensor& x) const { return linear_out(swiglu(linear_in(x))); }

at::Tensor flux2_transformer::time_embedding(const at::Tensor& t, const linear& l1, const linear& l2) const {
  // diffusers Timesteps(flip_sin_to_cos=True, downscale_freq_shift=0) then TimestepEmbedding (SiLU).
  const int64_t half = config_.timestep_guidance_channels / 2;
  at::Tensor exponent = at::arange(0, half, at::TensorOptions().dtype(at::kFloat).device(t.device())) * (-std::log(10000.0));
  exponent = exponent / static_cast<double>(half);
  at::Tensor emb = t.unsqueeze(1).to(at::kFloat) * at::exp(exponent).unsqueeze(0);
  emb = at::cat({at::cos(emb), at::sin(emb)}, -1).to(t.scalar_type());
  return l2(at::silu(l1(emb)));
}

std::pair<at::Tensor, at::Tensor> flux2_transformer::rope(const at::Tensor& ids) const {
  const at::Tensor pos = ids.to(at::kFloat);
  std::vector<at::Tensor> cos_parts, sin_parts;
  for (size_t i = 0; i < config_.axes_dims_rope.size(); ++i) {
    const int64_t d = config_.axes_dims_rope[i];
    auto f64 = at::TensorOptions().dtype(at::kDouble).device(ids.device());
    // Frequencies and angles in float64, as diffusers computes them for FLUX.
    at::Tensor freqs = 1.0 / at::pow(config_.rope_theta, at::arange(0, d, 2, f64) / static_cast<double>(d));
    at::Tensor angles = at::outer(pos.select(-1, static_cast<int64_t>(i)).to(at::kDouble), freqs);
    cos_parts.push_back(angles.cos().repeat_interleave(2, 1).to(at::kFloat));
    sin_parts.push_back(angles.sin().repeat_interleave(2, 1).to(at::kFloat));
  }
  return {at::cat(cos_parts, -1), at::cat(sin_parts, -1)};
}

at::Tensor flux2_transformer::attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                        const at::Tensor& rotary) const {
  // [B, S, H, D] in and out; SDPA works on [B, H, S, D].
  at::Tensor qr = apply_rope(q, rotary), kr = apply_rope(k, rotary);
  at::Tensor out = at::scaled_dot_product_attention(qr.transpose(1, 2), kr.transpose(1, 2), v.transpose(1, 2));
  return out.transpose(1, 2).flatten(2, 3).to(q.scalar_type());
}

void flux2_transformer::run_double(const double_block& b, at::Tensor& x, at::Tensor& c,
                                   const std::vector<at::Tensor>& m, const std::vector<at::Tensor>& cm,
                                   const at::Tensor& rotary) const {
  // m, cm: shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp (image, text)
  const double eps = config_.eps;
  const int64_t hd = config_.attention_head_dim;
  at::Tensor nx = modulate(layer_norm_no_affine(x, eps), m[0], m[1]);
  at::Tensor nc = modulate(layer_norm_no_affine(c, eps), cm[0], cm[1]);
  auto heads = [hd](const at::Tensor& t) { return t.unflatten(-1, {-1, hd}); };
  at::Tensor q = rms(heads(b.to_q(nx)), b.norm_q, eps), k = rms(heads(b.to_k(nx)), b.norm_k, eps), v = heads(b.to_v(nx));
  at::Tensor cq = rms(heads(b.add_q_proj(nc)), b.norm_added_q, eps), ck = rms(heads(b.add_k_proj(nc)), b.norm_added_k, eps),
             cv = heads(b.add_v_proj(nc));
  at::Tensor joint = attention(at::cat({cq, q}, 1), at::cat({ck, k}, 1), at::cat({cv, v}, 1), rotary);
  const int64_t s_txt = c.size(1);
  at::Tensor attn_txt = b.to_add_out(joint.narrow(1, 0, s_txt));
  at::Tensor attn_img = b.to_out_0(joint.narrow(1, s_txt, joint.size(1) - s_txt));

  x = at::addcmul(x, m[2], attn_img);
  x = at::addcmul(x, m[5], b.ff(modulate(layer_norm_no_affine(x, eps), m[3], m[4])));
  c = at::addcmul(c, cm[2], attn_txt);
  c = at::addcmul(c, cm[5], b.ff_context(modulate(layer_norm_no_affine(c, eps), cm[3], cm[4])));
  if (c.scalar_type() == at::kHalf) c = c.clip(-65504, 65504);
}

void flux2_transformer::run_single(const single_block& b, at::Tensor& h, const std::vector<at::Tensor>& m,
                                   const at::Tensor& rotary) const {
  const double eps = config_.eps;
  const int64_t D = config_.inner_dim(), hd = config_.attention_head_dim;
  at::Tensor n = modulate(layer_norm_no_affine(h, eps), m[0], m[1]);
  at::Tensor p = b.to_qkv_mlp_proj(n);
  at::Tensor qkv = p.narrow(-1, 0, 3 * D), mlp = p.narrow(-1, 3 * D, p.size(-1) - 3 * D);
  auto parts = qkv.chunk(3, -1);
  auto heads = [hd](const at::Tensor& t) { return t.unflatten(-1, {-1, hd}); };
  at::Tensor attn = attention(rms(heads(parts[0]), b.norm_q, eps), rms(heads(parts[1]), b.norm_k, eps), heads(parts[2]), rotary);
  h = at::addcmul(h, m[2], b.to_out(at::cat({attn, swiglu(mlp)}, -1)));
  if (h.scalar_type() == at::kHalf) h = h.clip(-65504, 65504);
}

at::Tensor flux2_transformer::forward(const at::Tensor& hidden_states, const at::Tensor& encoder_hidden_states,
                                      const at::Tensor& timestep, const at::Tensor& img_ids, const at::Tensor& txt_ids,
                                      const std::optional<at::Tensor>& guidance, sampling::teacache_state* cache) const {
  const auto dt = hidden_states.scalar_type();
  at::Tensor temb = time_embedding(timestep.to(dt) * 1000, time_linear_1, time_linear_2);
  if (guidance && config_.guidance_embeds)
    temb = temb + time_embedding(guidance->to(dt) * 1000, guidance_linear_1, guidance_linear_2);

  const at::Tensor act = at::silu(temb);
  const auto m_img = split_modulation(mod_img(act), 2);
  const auto m_txt = split_modulation(mod_txt(act), 2);
  const auto m_single = split_modulation(mod_single(act), 1);

  at::Tensor x = x_embedder(hidden_states);
  at::Tensor c = context_embedder(encoder_hidden_states);
  const at::Tensor img = img_ids.dim() == 3 ? img_ids[0] : img_ids;
  const at::Tensor txt = txt_ids.dim() == 3 ? txt_ids[0] : txt_ids;
  auto img_rope = rope(img), txt_rope = rope(txt);
  const at::Tensor rotary = complex_rotary({at::cat({txt_rope.first, img_rope.first}, 0), at::cat({txt_rope.second, img_rope.second}, 0)});

  // TeaCache4FLUX's rule on block 0's modulated image input (the first thing the blocks see that
  // depends on the timestep).
  const bool skip = cache && cache->skip_step(modulate(layer_norm_no_affine(x, config_.eps), m_img[0], m_img[1]));

  at::Tensor h;
  if (skip) {
    h = x + cache->previous_residual;
  } else {
    const at::Tensor x_in = x;
    // With layerwise offload each block is fetched before it runs and handed back after; an exception
    // inside a block leaves the offload to start over (recover), not with a block marked in use.
    int64_t layer = 0;
    auto run = [&](auto&& body) {
      if (!offload_) return body();
      offload_->acquire(layer);
      try {
        body();
      } catch (...) {
        offload_->recover();
        throw;
      }
      offload_->release(layer++);
    };
    for (const auto& b : blocks_) run([&] { run_double(b, x, c, m_img, m_txt, rotary); });
    const int64_t s_txt = c.size(1);
    h = at::cat({c, x}, 1);
    for (const auto& b : single_blocks_) run([&] { run_single(b, h, m_single, rotary); });
    h = h.narrow(1, s_txt, h.size(1) - s_txt);
    if (cache) cache->previous_residual = h - x_in;
  }

  // norm_out chunks are (scale, shift): the reverse of the block modulation.
  auto so = norm_out_linear(at::silu(temb).to(h.scalar_type())).chunk(2, 1);
  h = layer_norm_no_affine(h, config_.eps) * (1 + so[0]).unsqueeze(1) + so[1].unsqueeze(1);
  return proj_out(h);
}

}  // namespace refit::models
