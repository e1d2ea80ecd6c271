// compute_tuning: the attention kernel order PyTorch is given, and the refusal of unknown values.
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

BOOST_AUTO_TEST_CASE(each_choice_goes_first_the_rest_in_pytorch_order) {
  apply_compute_tuning({"efficient"});
  BOOST_TEST(describe_compute_tuning() == "attention efficient, flash, math, cudnn");
  apply_compute_tuning({"cudnn"});  // whatever came before
  BOOST_TEST(describe_compute_tuning() == "attention cudnn, flash, efficient, math");
  apply_compute_tuning({"math"});
  BOOST_TEST((first_kernel() == at::SDPBackend::math));
  BOOST_TEST(at::globalContext().sDPPriorityOrder().size() == at::num_sdp_backends);
}

BOOST_AUTO_TEST_CASE(auto_restores_pytorchs_own_order) {
  apply_compute_tuning({"math"});
  apply_compute_tuning({});
  // This machine has no GPU: PyTorch's order stays its CPU-visible default.
  BOOST_TEST(describe_compute_tuning() == "attention flash, efficient, math, cudnn");
}

BOOST_AUTO_TEST_CASE(unknown_values_are_refused_and_change_nothing) {
  apply_compute_tuning({"flash"});
  const std::string before = describe_compute_tuning();
  BOOST_CHECK_EXCEPTION(apply_compute_tuning({"fast"}), std::invalid_argument, [](const std::invalid_argument& e) {
    return std::string(e.what()) == "attention backend 'fast': expected auto, cudnn, flash, efficient or math";
  });
  BOOST_TEST(describe_compute_tuning() == before);
}
