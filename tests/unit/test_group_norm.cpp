// models::group_norm (its own reductions, for the GPU's sake) against PyTorch's at::group_norm: fp32 with groups
// whose mean is large against their spread (no cancellation), bf16, and the 3-D input of the VAE's attention.
#define BOOST_TEST_MODULE group_norm
#include <boost/test/unit_test.hpp>

#include <ATen/ATen.h>

#include "pipeline/models/layers.hpp"

using refit::models::group_norm;

namespace {

group_norm with_params(int64_t groups, int64_t channels, at::ScalarType dtype) {
  group_norm g(groups, channels, 1e-6);
  g.weight = (at::rand({channels}) + 0.5).to(dtype);
  g.bias = at::randn({channels}).to(dtype);
  return g;
}

double max_abs_diff(const at::Tensor& a, const at::Tensor& b) { return (a.to(at::kFloat) - b.to(at::kFloat)).abs().max().item<double>(); }

}  // namespace

BOOST_AUTO_TEST_CASE(fp32_matches_pytorch_also_for_far_off_means) {
  at::manual_seed(1);
  const auto g = with_params(8, 32, at::kFloat);
  // Per-channel offsets of up to 1000 against a spread of 1: E[x^2] - E[x]^2 in float would lose most digits.
  const at::Tensor x = at::randn({2, 32, 24, 24}) + at::arange(32, at::kFloat).view({1, 32, 1, 1}) * 30;
  const at::Tensor want = at::group_norm(x, 8, g.weight, g.bias, 1e-6);
  const at::Tensor got = g(x);
  BOOST_TEST(got.sizes() == want.sizes());
  BOOST_TEST(got.scalar_type() == at::kFloat);
  BOOST_TEST(max_abs_diff(got, want) < 2e-5, "max |diff| " << max_abs_diff(got, want));
}

BOOST_AUTO_TEST_CASE(bf16_matches_pytorch_within_its_rounding) {
  at::manual_seed(2);
  const auto g = with_params(4, 16, at::kBFloat16);
  const at::Tensor x = (at::randn({1, 16, 32, 32}) * 3 + 1).to(at::kBFloat16);
  const at::Tensor want = at::group_norm(x, 4, g.weight, g.bias, 1e-6);
  const at::Tensor got = g(x);
  BOOST_TEST(got.scalar_type() == at::kBFloat16);
  // Both compute in float and round once to bf16 (2^-8 relative); outputs are within |y| < 16 here.
  BOOST_TEST(max_abs_diff(got, want) <= 0.0625, "max |diff| " << max_abs_diff(got, want));
  BOOST_TEST((got.to(at::kFloat) - want.to(at::kFloat)).abs().mean().item<double>() < 1e-3);
}

BOOST_AUTO_TEST_CASE(three_dimensional_input_as_the_vae_attention_gives_it) {
  at::manual_seed(3);
  const auto g = with_params(32, 64, at::kFloat);
  const at::Tensor x = at::randn({2, 64, 100});
  BOOST_TEST(max_abs_diff(g(x), at::group_norm(x, 32, g.weight, g.bias, 1e-6)) < 1e-5);
}
