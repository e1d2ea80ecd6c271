// compute_tuning: the attention kernel order PyTorch is given, the VAE layout, and the refusal of unknown values.
#define BOOST_TEST_MODULE compute_tuning
#include <boost/test/unit_test.hpp>

#include <ATen/Context.h>

#include <stdexcept>
#include <string>

#include "pipeline/models/compute_tuning.hpp"

using refit::models::apply_compute_tuning;
using refit::models::compute_tuning;
using refit::models::describe_compute_tuning;

namespace {
at::SDPBackend first_kernel() { return at::globalContext().sDPPriorityOrder()[0]; }
}  // namespace

BOOST_AUTO_TEST_CASE(auto_prefers_cudnn_and_channels_last) {
  apply_compute_tuning({});
  BOOST_TEST((first_kernel() == at::SDPBackend::cudnn_attention));
  BOOST_TEST(refit::models::vae_channels_last());
  BOOST_TEST(describe_compute_tuning() == "attention cudnn, flash, efficient, math; VAE channels_last");
}

BOOST_AUTO_TEST_CASE(each_choice_goes_first_the_rest_in_pytorch_order) {
  apply_compute_tuning({"efficient", "contiguous"});
  BOOST_TEST(describe_compute_tuning() == "attention efficient, flash, math, cudnn; VAE contiguous");
  BOOST_TEST(!refit::models::vae_channels_last());
  apply_compute_tuning({"flash", "channels_last"});  // whatever came before
  BOOST_TEST(describe_compute_tuning() == "attention flash, efficient, math, cudnn; VAE channels_last");
  apply_compute_tuning({"math", "auto"});
  BOOST_TEST((first_kernel() == at::SDPBackend::math));
  BOOST_TEST(at::globalContext().sDPPriorityOrder().size() == at::num_sdp_backends);
}

BOOST_AUTO_TEST_CASE(unknown_values_are_refused_and_change_nothing) {
  apply_compute_tuning({"flash", "contiguous"});
  const std::string before = describe_compute_tuning();
  BOOST_CHECK_EXCEPTION(apply_compute_tuning({"fast", "auto"}), std::invalid_argument, [](const std::invalid_argument& e) {
    return std::string(e.what()) == "attention backend 'fast': expected auto, cudnn, flash, efficient or math";
  });
  BOOST_CHECK_EXCEPTION(apply_compute_tuning({"cudnn", "nhwc"}), std::invalid_argument, [](const std::invalid_argument& e) {
    return std::string(e.what()) == "VAE layout 'nhwc': expected auto, channels_last or contiguous";
  });
  BOOST_TEST(describe_compute_tuning() == before);
}
