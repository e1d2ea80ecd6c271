// What a worker received from a trainer, as a weight source (transfer::received_source), and the check of a
// trainer's announcement before any byte moves (transfer::check_announcement), driven without a group: a
// received tensor the module can hold as it is becomes the live weight without a copy, any other is copied
// (converted), a rollback restores every byte, released tensors cannot be read again, and a refused
// announcement names the tensor as the trainer named it.
#define BOOST_TEST_MODULE received_weights
#include <boost/test/unit_test.hpp>

#include <ATen/ATen.h>
#include <c10/core/InferenceMode.h>

#include "pipeline/flux2_klein.hpp"
#include "pipeline/make_model.hpp"
#include "pipeline/models/tensor_registry.hpp"
#include "pipeline/transfer/broadcast_receive.hpp"
#include "pipeline/transfer/received_weights.hpp"
#include "pipeline/update/checkpoint_source.hpp"
#include "pipeline/update/module_updater.hpp"
#include "tests/unit/temp_dir.hpp"

using namespace refit;
using refit::test::temp_dir;

namespace {

struct fixture {
  temp_dir dir;
  std::filesystem::path a = dir.path() / "a";
  std::shared_ptr<pipeline::flux2_klein_pipeline> pipe;
  std::unique_ptr<update::module_updater> core;
  fixture() {
    pipeline::make_model({"flux2-klein-tiny", 1, a, 2, true, {}});
    pipe = std::make_shared<pipeline::flux2_klein_pipeline>(a, models::placement{}, pipeline::offload_settings{});
    pipe->load_weights();
    core = std::make_unique<update::module_updater>(pipe, "transformer", 0, std::make_shared<update::checkpoint_source>(a / "transformer"));
  }
  const models::tensor_registry& registry() const { return pipe->registry("transformer"); }
  const models::tensor_slot& slot(size_t i) const { return registry().slots()[i]; }
  at::Tensor& live(size_t i) const { return *registry().slots()[i].tensor; }
  std::string checksum() const { return core->checksum(weights::checksum_format::refit); }
};

template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "";
}

}  // namespace

BOOST_AUTO_TEST_CASE(a_tensor_the_module_can_hold_as_it_is_is_adopted_any_other_is_converted) {
  c10::InferenceMode inference;
  fixture f;
  const std::string before = f.checksum();
  auto set = std::make_shared<transfer::received_weights>("distributed group 'g'");
  const at::Tensor same_dtype = at::full(f.slot(0).shape, 0.5);                 // fp32, as held: adopted
  const at::Tensor other_dtype = at::full(f.slot(1).shape, 0.25, at::kBFloat16);  // converted on copy
  at::Tensor bucket = at::zeros({static_cast<int64_t>(at::full(f.slot(2).shape, 0.0).nbytes()) + 16}, at::kByte);
  const at::Tensor slice = bucket.narrow(0, 16, bucket.numel() - 16).view(at::kFloat).view(f.slot(2).shape).fill_(-1.0);  // a view: copied
  set->add("transformer", f.slot(0).name, same_dtype);
  set->add("transformer", f.slot(1).name, other_dtype);
  set->add("transformer", f.slot(2).name, slice);
  auto src = std::make_shared<transfer::received_source>(set);

  BOOST_TEST(f.core->validate(*src).tensors == 3u);
  f.core->stage(src, update::requested_path::staged);
  BOOST_TEST(f.checksum() == before);
  f.core->commit();
  BOOST_TEST(f.live(0).data_ptr() == same_dtype.data_ptr());  // the received buffer is the weight now
  BOOST_TEST(at::equal(f.live(1), at::full(f.slot(1).shape, 0.25)));
  BOOST_TEST(f.live(1).scalar_type() == at::kFloat);
  BOOST_TEST(at::equal(f.live(2), at::full(f.slot(2).shape, -1.0)));
  BOOST_TEST(f.live(2).data_ptr() != slice.data_ptr());
  f.core->rollback_requested();
  f.core->rollback();
  BOOST_TEST(f.checksum() == before);

  // Applied again and kept: after the set is released, its values live on in the module, and the source
  // says it cannot be read again.
  f.core->stage(src, update::requested_path::staged);
  f.core->commit();
  f.core->finalize();
  const std::string updated = f.checksum();
  set->release();
  BOOST_TEST(!src->repeatable());
  BOOST_TEST(f.checksum() == updated);
  BOOST_TEST(at::equal(f.live(0), at::full(f.slot(0).shape, 0.5)));
  BOOST_TEST(error_of([&] { src->plan({"transformer", 0, f.registry(), f.pipe->placement(), nullptr}); }).find("were released") !=
             std::string::npos);
  BOOST_TEST(f.core->status().source == "distributed group 'g', " + (f.a / "transformer").string());  // slot order
}

BOOST_AUTO_TEST_CASE(in_place_writes_the_received_values_over_the_live_tensors) {
  c10::InferenceMode inference;
  fixture f;
  const std::string before = f.checksum();
  at::Tensor* storage_before = &f.live(0);
  const void* ptr_before = f.live(0).data_ptr();
  auto set = std::make_shared<transfer::received_weights>("distributed group 'g'");
  set->add("transformer", f.slot(0).name, at::full(f.slot(0).shape, 2.0));
  auto src = std::make_shared<transfer::received_source>(set);
  f.core->stage(src, update::requested_path::in_place);
  f.core->commit();
  BOOST_TEST(storage_before->data_ptr() == ptr_before);  // written over, not swapped
  BOOST_TEST(at::equal(f.live(0), at::full(f.slot(0).shape, 2.0)));
  f.core->rollback_requested();
  f.core->rollback();
  BOOST_TEST(f.checksum() == before);
}

BOOST_AUTO_TEST_CASE(an_announcement_that_does_not_fit_is_refused_naming_the_tensor_as_announced) {
  fixture f;
  auto& pipe = *f.pipe;
  const auto& s0 = f.slot(0);
  auto a = [&](std::vector<transfer::announced_tensor> ts, bool bucket = false) {
    transfer::announcement out;
    out.tensors = std::move(ts);
    out.flattened_bucket = bucket;
    return out;
  };
  auto t = [&](std::string name, c10::ScalarType dt, std::vector<int64_t> shape, std::string module = "transformer") {
    return transfer::announced_tensor{module, name, module + "." + name, dt, std::move(shape)};
  };
  transfer::check_announcement(pipe, a({t(s0.name, at::kBFloat16, s0.shape)}));  // a float converts to the held fp32

  BOOST_TEST(error_of([&] { transfer::check_announcement(pipe, a({t("nope.weight", at::kFloat, {1})})); }) ==
             "module 'transformer' has no tensor 'nope.weight'");
  auto wrong = s0.shape;
  wrong.back() += 1;
  BOOST_TEST(error_of([&] { transfer::check_announcement(pipe, a({t(s0.name, at::kFloat, wrong)})); })
                 .find("tensor 'transformer." + s0.name + "': shape [") == 0);
  BOOST_TEST(error_of([&] { transfer::check_announcement(pipe, a({t(s0.name, at::kLong, s0.shape)})); }) ==
             "tensor 'transformer." + s0.name + "': dtype Long does not convert to the module's Float");
  BOOST_TEST(error_of([&] { transfer::check_announcement(pipe, a({t(s0.name, at::kFloat, s0.shape), t(s0.name, at::kFloat, s0.shape)})); }) ==
             "tensor 'transformer." + s0.name + "' is announced twice");
  BOOST_TEST(error_of([&] { transfer::check_announcement(pipe, a({t(s0.name, at::kFloat, {-1, 4})})); }).find("negative dimension") !=
             std::string::npos);
  // In one flattened bucket, a tensor must start at a multiple of its element size (as SGLang requires):
  // a bf16 tensor of n elements, n not a multiple of 4, puts a float64 after it off its 8-byte grid.
  const models::tensor_slot* odd = nullptr;
  for (const auto& s : pipe.registry("vae").slots()) {
    int64_t n = 1;
    for (auto d : s.shape) n *= d;
    if (n % 4 != 0 && !s.fixed_dtype) odd = &s;
  }
  BOOST_REQUIRE(odd);
  const std::string misaligned = error_of([&] {
    transfer::check_announcement(pipe, a({t(odd->name, at::kBFloat16, odd->shape, "vae"), t(s0.name, at::kDouble, s0.shape)}, true));
  });
  BOOST_TEST(misaligned.find("flattened_bucket: tensor 'transformer." + s0.name + "' starts at byte ") == 0, misaligned);
  BOOST_TEST(misaligned.find("not a multiple of its element size 8") != std::string::npos, misaligned);
}
