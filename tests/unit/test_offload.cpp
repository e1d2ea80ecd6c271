// Layerwise offload of the DiT blocks (tiny checkpoints; CPU fp32, or REFIT_TEST_DEVICE=cuda in bf16):
// bitwise-identical sampling with and without offload, what lives where, and weight updates through
// the host store (staged swap, in place, rollback) with the resident blocks rewritten.
#define BOOST_TEST_MODULE offload
#include <boost/test/unit_test.hpp>

#include <ATen/ATen.h>
#include <c10/core/InferenceMode.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <atomic>
#include <condition_variable>
#include <mutex>
#include <thread>

#include "actors/module_actor.hpp"
#include "pipeline/update/checkpoint_source.hpp"
#include "pipeline/update/module_updater.hpp"
#include "pipeline/flux2_klein.hpp"
#include "pipeline/models/flux2_transformer.hpp"
#include "pipeline/models/layer_offload.hpp"
#include "pipeline/weights/device_loader.hpp"
#include "pipeline/weights/host_loader.hpp"
#include "tests/unit/engine_fixture.hpp"

#ifdef REFIT_TORCH_CUDA
#include <c10/cuda/CUDACachingAllocator.h>
#endif

using namespace refit;
using namespace refit::test;
namespace fs = std::filesystem;

namespace {

struct checkpoints {
  temp_dir dir;
  fs::path a, b, base, deep, deep_base, corrupt, a_with_b_transformer;
  checkpoints() {
    a = make_tiny(dir.path() / "a", 1);
    b = make_tiny(dir.path() / "b", 2);
    base = dir.path() / "base";
    pipeline::make_model({"flux2-klein-tiny", 3, base, 2, false, {}});  // undistilled: sampled with CFG
    // Six blocks (2 double-stream + 4 single-stream), so that every prefetch size rotates device slots.
    deep = dir.path() / "deep";
    pipeline::make_model({"flux2-klein-tiny", 4, deep, 2, true, {}, 2, 4});
    deep_base = dir.path() / "deep_base";
    pipeline::make_model({"flux2-klein-tiny", 5, deep_base, 2, false, {}, 2, 4});
    corrupt = make_corrupt(a, b, dir.path() / "corrupt");
    a_with_b_transformer = mix(a, b, "transformer", dir.path() / "a_with_b_transformer");
  }
};

checkpoints& ckpts() {
  static checkpoints c;
  return c;
}

models::placement test_placement() {
  models::placement where;
  where.device = at::Device(test_device());
  where.float_dtype = where.device.is_cuda() ? at::kBFloat16 : at::kFloat;
  return where;
}

struct loaded {
  std::shared_ptr<weights::device_loader> loader;
  std::shared_ptr<pipeline::flux2_klein_pipeline> pipe;
};

loaded load(const fs::path& model, std::optional<double> prefetch) {
  loaded l;
  const auto where = test_placement();
  if (where.device.is_cuda()) l.loader = std::make_shared<weights::device_loader>(where.device.has_index() ? where.device.index() : 0);
  l.pipe = std::make_shared<pipeline::flux2_klein_pipeline>(model, where,
                                                            pipeline::offload_settings{prefetch.has_value(), prefetch.value_or(1)});
  l.pipe->load_weights(std::nullopt, l.loader.get());
  return l;
}

// The sampler's float output before 8-bit rounding (which can hide a tiny model's differences), on the CPU.
at::Tensor sample(const pipeline::flux2_klein_pipeline& pipe, uint64_t seed = 7, std::optional<double> teacache = std::nullopt,
                  pipeline::generation_stats* stats = nullptr) {
  c10::InferenceMode inference;
  const at::Tensor embeds = pipe.encode_prompts({"a red fox"});
  std::optional<at::Tensor> negative;
  if (!pipe.is_distilled()) negative = pipe.encode_prompts({"blurry"});
  const at::Tensor noise = pipe.initial_noise(1, 32, 32, seed);
  return pipe.sample(noise, embeds, negative, 6, 4.0, nullptr, {teacache.has_value(), teacache}, stats).to(at::kCPU);
}

// Bytes the caching allocator has handed out on the test device (0 on the CPU).
int64_t device_allocated() {
#ifdef REFIT_TORCH_CUDA
  const at::Device d = test_placement().device;
  if (d.is_cuda()) {
    const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(d.has_index() ? d.index() : 0);
    return stats.allocated_bytes[static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE)].current;
  }
#endif
  return 0;
}

bool bitwise_equal(const at::Tensor& x, const at::Tensor& y) {
  return x.sizes() == y.sizes() && x.scalar_type() == y.scalar_type() && at::equal(x.view(at::kByte), y.view(at::kByte));
}

}  // namespace

BOOST_AUTO_TEST_CASE(sampling_is_bitwise_identical_with_and_without_offload) {
  for (const fs::path& model : {ckpts().a, ckpts().deep, ckpts().deep_base}) {
    const at::Tensor reference = sample(*load(model, std::nullopt).pipe);
    pipeline::generation_stats plain_tc;
    const at::Tensor reference_tc = sample(*load(model, std::nullopt).pipe, 7, 0.6, &plain_tc);
    BOOST_TEST(plain_tc.blocks_skipped > 0, model.filename() << ": the TeaCache case must skip blocks");
    // Six blocks: prefetch 1, 2, 3 (0.5 of them) use 2, 3, 4 slots and rotate; 64 keeps all six resident.
    for (double prefetch : {1.0, 2.0, 0.5, 64.0}) {
      auto l = load(model, prefetch);
      const int64_t blocks = l.pipe->transformer_offload()->layers();
      BOOST_TEST(l.pipe->transformer_offload()->prefetch_size() ==
                 std::min<int64_t>(prefetch < 1 ? static_cast<int64_t>(std::ceil(prefetch * blocks)) : static_cast<int64_t>(prefetch),
                                   blocks - 1));
      BOOST_TEST(bitwise_equal(sample(*l.pipe), reference), model.filename() << " prefetch " << prefetch);
      // Twice: the second request starts from the blocks the first one prefetched around the wrap.
      BOOST_TEST(bitwise_equal(sample(*l.pipe), reference), model.filename() << " prefetch " << prefetch << ", second request");
      pipeline::generation_stats tc;
      BOOST_TEST(bitwise_equal(sample(*l.pipe, 7, 0.6, &tc), reference_tc), model.filename() << " prefetch " << prefetch << ", TeaCache");
      BOOST_TEST(tc.blocks_skipped == plain_tc.blocks_skipped);
    }
  }
}

BOOST_AUTO_TEST_CASE(blocks_hold_no_device_weights_between_uses_and_the_host_store_holds_the_checkpoint) {
  auto l = load(ckpts().a, 1.0);
  auto* off = l.pipe->transformer_offload();
  BOOST_REQUIRE(off != nullptr);
  auto& reg = l.pipe->registry("transformer");
  BOOST_TEST(off->layers() == 3);  // tiny: 1 double-stream + 2 single-stream blocks
  sample(*l.pipe);
  const auto info = off->info();
  std::vector<int64_t> resident = info.resident;
  std::sort(resident.begin(), resident.end());
  // Prefetch 1: two device slots, and after a request the first two blocks wait for the next one.
  BOOST_TEST(resident == (std::vector<int64_t>{0, 1}), "resident blocks");
  BOOST_TEST(info.prefetches > 0u);

  const auto host = weights::load_to_host(weights::open_module_dir("transformer", ckpts().a / "transformer"),
                                          {test_placement().float_dtype == at::kBFloat16 ? weights::dtype::BF16 : weights::dtype::F32});
  std::map<std::string, at::Tensor> disk(host.begin(), host.end());
  size_t offloaded = 0, resident_params = 0;
  uint64_t block_bytes = 0;
  for (size_t i = 0; i < reg.slots().size(); ++i) {
    const auto& s = reg.slots()[i];
    const bool in_block = s.name.rfind("transformer_blocks.", 0) == 0 || s.name.rfind("single_transformer_blocks.", 0) == 0;
    BOOST_TEST(off->offloaded(i) == in_block, s.name);
    if (in_block) {
      ++offloaded;
      BOOST_TEST(s.tensor->numel() == 0, s.name << " holds device weights between uses");
      BOOST_TEST(off->host_tensor(i).device().is_cpu());
      BOOST_TEST(bitwise_equal(off->host_tensor(i), disk.at(s.name)), s.name);
      block_bytes += off->host_tensor(i).nbytes();
    } else {
      ++resident_params;
      BOOST_TEST(s.tensor->device().type() == test_placement().device.type(), s.name);
      BOOST_TEST(bitwise_equal(s.tensor->to(at::kCPU), disk.at(s.name)), s.name);
    }
  }
  BOOST_TEST(offloaded > 0u);
  BOOST_TEST(resident_params > 0u);
  BOOST_TEST(info.host_bytes >= block_bytes);
  BOOST_TEST(info.host_bytes < block_bytes + 64 * 512);  // alignment padding only
  // Two device slots, each with room for the largest block.
  std::map<std::string, uint64_t> per_block;
  for (size_t i = 0; i < reg.slots().size(); ++i) {
    if (!off->offloaded(i)) continue;
    const std::string& n = reg.slots()[i].name;
    const auto second_dot = n.find('.', n.find('.') + 1);
    per_block[n.substr(0, second_dot)] += (off->host_tensor(i).nbytes() + 511) / 512 * 512;
  }
  BOOST_TEST(per_block.size() == 3u);
  uint64_t largest = 0;
  for (const auto& [name, bytes] : per_block) largest = std::max(largest, bytes);
  BOOST_TEST(info.device_bytes == 2 * largest);
  BOOST_TEST(info.spare_host_bytes == 0u);
}

BOOST_AUTO_TEST_CASE(bad_prefetch_sizes_are_refused) {
  for (double p : {0.0, -1.0, 1.5, std::numeric_limits<double>::infinity(), std::numeric_limits<double>::quiet_NaN()})
    BOOST_CHECK_THROW(load(ckpts().a, p), std::invalid_argument);
}

namespace {

// The transformer's module actor over an offloaded pipeline.
struct offloaded_module {
  loaded l = load(ckpts().a, 1.0);
  engine_system_config cfg;
  caf::actor_system sys{cfg};
  caf::scoped_actor self{sys};
  std::shared_ptr<actors::module_state> state =
      actors::make_module_state(std::make_shared<update::module_updater>(l.pipe, "transformer", 0, std::make_shared<update::checkpoint_source>(ckpts().a / "transformer"), l.loader));
  msg::module_actor module = actors::spawn_module_actor(sys, state);
  std::map<std::string, std::string> disk_a = disk_checksums(ckpts().a), disk_b = disk_checksums(ckpts().b);

  ~offloaded_module() { caf::anon_send_exit(module, caf::exit_reason::user_shutdown); }

  template <class... Ts>
  std::pair<msg::module_report, std::string> ask(Ts... xs) {
    return ask_module(self, module, xs...);
  }
  std::string checksum() { return module_checksum(self, module); }
};

// Checkpoint checksums are of fp32 values; on the GPU the module holds bf16, so compare with a fresh
// load of the same checkpoint instead.
std::string expected_checksum(offloaded_module& m, const fs::path& model) {
  if (!test_placement().device.is_cuda()) return (model == ckpts().a ? m.disk_a : m.disk_b).at("transformer");
  auto fresh = load(model, std::nullopt);
  engine_system_config cfg;
  caf::actor_system sys{cfg};
  caf::scoped_actor self{sys};
  auto st = actors::make_module_state(std::make_shared<update::module_updater>(fresh.pipe, "transformer", 0, std::make_shared<update::checkpoint_source>(model / "transformer"), fresh.loader));
  auto actor = actors::spawn_module_actor(sys, st);
  const std::string out = module_checksum(self, actor);
  caf::anon_send_exit(actor, caf::exit_reason::user_shutdown);
  return out;
}

}  // namespace

BOOST_FIXTURE_TEST_SUITE(updates_through_the_host_store, offloaded_module)

BOOST_AUTO_TEST_CASE(staged_update_swaps_host_stores_rewrites_resident_blocks_and_rolls_back) {
  const at::Tensor image_a = sample(*l.pipe);  // leaves blocks 0 and 1 resident
  const at::Tensor image_b = sample(*load(ckpts().a_with_b_transformer, std::nullopt).pipe);
  const std::string sum_a = expected_checksum(*this, ckpts().a), sum_b = expected_checksum(*this, ckpts().b);
  BOOST_TEST(checksum() == sum_a);
  auto* off = l.pipe->transformer_offload();

  const int64_t device_before = device_allocated();
  auto [staged, e1] = ask(msg::stage_atom::value, checkpoint(ckpts().b / "transformer"), mode_of("auto"));
  BOOST_TEST(e1.empty(), e1);
  BOOST_TEST(staged.path == msg::write_path::staged);
  // The blocks are staged in host memory: device shadows exist only for the parameters outside them.
  uint64_t resident_bytes = 0;
  for (size_t i = 0; i < l.pipe->registry("transformer").slots().size(); ++i)
    if (!off->offloaded(i)) resident_bytes += l.pipe->registry("transformer").slots()[i].tensor->nbytes();
  if (test_placement().device.is_cuda())  // (the CPU run has no device allocator to ask)
    BOOST_TEST(device_allocated() - device_before <= static_cast<int64_t>(resident_bytes + 64 * 512));
  BOOST_TEST(off->info().spare_host_bytes == off->host_bytes());
  BOOST_TEST(checksum() == sum_a);  // staging writes the second store only
  const uint64_t refreshes = off->info().refreshes;
  const int64_t device_staged = device_allocated();
  auto [committed, e2] = ask(msg::commit_atom::value);
  BOOST_TEST(e2.empty(), e2);
  if (test_placement().device.is_cuda()) BOOST_TEST(device_allocated() == device_staged, "a commit allocates no device memory");
  BOOST_TEST(checksum() == sum_b);
  BOOST_TEST(off->info().refreshes == refreshes + 2, "both resident blocks rewritten");
  BOOST_TEST(bitwise_equal(sample(*l.pipe), image_b), "after commit the images are the new checkpoint's");

  auto [rolled, e3] = ask(msg::rollback_atom::value);
  BOOST_TEST(e3.empty(), e3);
  BOOST_TEST(checksum() == sum_a);
  BOOST_TEST(bitwise_equal(sample(*l.pipe), image_a), "after rollback the images are the old checkpoint's");

  // Again, reusing the second store, and kept this time.
  BOOST_TEST(ask(msg::stage_atom::value, checkpoint(ckpts().b / "transformer"), mode_of("staged")).second.empty());
  BOOST_TEST(ask(msg::commit_atom::value).second.empty());
  BOOST_TEST(ask(msg::finalize_atom::value).second.empty());
  BOOST_TEST(checksum() == sum_b);
  BOOST_TEST(bitwise_equal(sample(*l.pipe), image_b));
}

BOOST_AUTO_TEST_CASE(in_place_update_writes_the_live_host_store_and_rolls_back_from_the_snapshot) {
  const at::Tensor image_a = sample(*l.pipe);
  const at::Tensor image_b = sample(*load(ckpts().a_with_b_transformer, std::nullopt).pipe);
  const std::string sum_a = expected_checksum(*this, ckpts().a), sum_b = expected_checksum(*this, ckpts().b);
  auto* off = l.pipe->transformer_offload();

  BOOST_TEST(ask(msg::stage_atom::value, checkpoint(ckpts().b / "transformer"), mode_of("in_place")).second.empty());
  auto [committed, err] = ask(msg::commit_atom::value);
  BOOST_TEST(err.empty(), err);
  BOOST_TEST(committed.path == msg::write_path::in_place);
  BOOST_TEST(off->info().spare_host_bytes == 0u, "in place needs no second store");
  BOOST_TEST(checksum() == sum_b);
  BOOST_TEST(bitwise_equal(sample(*l.pipe), image_b));
  BOOST_TEST(ask(msg::rollback_atom::value).second.empty());
  BOOST_TEST(checksum() == sum_a);
  BOOST_TEST(bitwise_equal(sample(*l.pipe), image_a));
}

BOOST_AUTO_TEST_CASE(a_replacement_actor_undoes_a_staged_commit_its_dead_predecessor_left) {
  const at::Tensor image_a = sample(*l.pipe);
  const std::string sum_a = expected_checksum(*this, ckpts().a), sum_b = expected_checksum(*this, ckpts().b);
  BOOST_TEST(ask(msg::stage_atom::value, checkpoint(ckpts().b / "transformer"), mode_of("staged")).second.empty());
  BOOST_TEST(ask(msg::commit_atom::value).second.empty());
  BOOST_TEST(checksum() == sum_b);
  self->monitor(module);
  caf::anon_send_exit(module, caf::exit_reason::kill);
  self->receive([](caf::down_msg&) {});
  module = actors::spawn_module_actor(sys, state);  // its start-up swaps the host stores back
  BOOST_TEST(checksum() == sum_a);
  BOOST_TEST(bitwise_equal(sample(*l.pipe), image_a));
}

BOOST_AUTO_TEST_SUITE_END()

namespace {

// The engine with layerwise offload (prefetch 1), or without for references.
struct offload_engine : engine {
  explicit offload_engine(const fs::path& model, bool offload = true) : engine(model, 1, offload, 1) {}
};

}  // namespace

BOOST_AUTO_TEST_CASE(engine_with_offload_updates_to_disk_checksums_and_refuses_a_corrupted_checkpoint) {
  offload_engine e(ckpts().a);
  BOOST_TEST(e.client.checksums() == disk_checksums(ckpts().a));
  const auto image_a = e.client.generate(5);

  auto bad = e.client.update(update_to(ckpts().corrupt));
  BOOST_TEST(!bad.success);
  BOOST_TEST(bad.message.find("vae") != std::string::npos, bad.message);
  BOOST_TEST(e.client.checksums() == disk_checksums(ckpts().a));
  BOOST_TEST(e.client.generate(5).second == image_a.second);

  for (const char* mode : {"staged", "in_place"}) {
    auto r = e.client.update(update_to(ckpts().b, {}, mode));
    BOOST_TEST(r.success, r.message);
    BOOST_TEST(msg::to_string(r.mode) == mode);
    BOOST_TEST(e.client.checksums() == disk_checksums(ckpts().b), mode);
    offload_engine fresh(ckpts().b, false);
    BOOST_TEST(e.client.generate(9).second == fresh.client.generate(9).second, mode);
    BOOST_TEST(e.client.update(update_to(ckpts().a, {}, mode)).success);
    BOOST_TEST(e.client.checksums() == disk_checksums(ckpts().a), mode);
  }
}

BOOST_AUTO_TEST_CASE(generation_continues_while_updates_alternate_and_every_image_matches_its_version) {
  // Staging reads into the second host store while the worker fetches blocks from the live one.
  std::map<std::string, std::vector<uint8_t>> reference;
  reference["A"] = offload_engine(ckpts().a, false).client.generate(11).second;
  reference["B"] = offload_engine(ckpts().b, false).client.generate(11).second;
  BOOST_REQUIRE(reference["A"] != reference["B"]);
  offload_engine e(ckpts().a);
  std::atomic<bool> stop{false};
  std::mutex mu;
  std::condition_variable progressed;
  std::vector<std::pair<std::string, std::vector<uint8_t>>> results;
  std::thread client([&] {
    engine_client c(e.sys, e.client.scheduler());
    while (!stop.load()) {
      auto r = c.generate(11);
      std::lock_guard lock(mu);
      results.push_back(std::move(r));
      progressed.notify_all();
    }
  });
  for (int i = 0; i < 8; ++i) {
    const bool to_b = i % 2 == 0;
    msg::update_request req = update_to(to_b ? ckpts().b : ckpts().a, {}, i % 4 < 2 ? "staged" : "in_place");
    req.weight_version = to_b ? "B" : "A";
    auto r = e.client.update(req);
    BOOST_TEST(r.success, r.message);
    std::unique_lock lock(mu);
    const size_t seen = results.size();
    progressed.wait(lock, [&] { return results.size() > seen; });
  }
  stop = true;
  client.join();
  std::map<std::string, int> per_version;
  for (const auto& [version, png] : results) {
    BOOST_TEST(version.rfind("error", 0) != 0u, version);
    const std::string weights = version == "0" ? "A" : version;
    BOOST_TEST((png == reference[weights]), "version " << version);
    ++per_version[weights];
  }
  BOOST_TEST(per_version["A"] > 0);
  BOOST_TEST(per_version["B"] > 0);
}

BOOST_AUTO_TEST_CASE(a_commit_failure_in_another_module_rolls_the_host_store_back) {
  offload_engine e(ckpts().a);
  const auto image_a = e.client.generate(5);
  if (!actors::fault_injection_compiled()) return;
  for (const char* module : {"text_encoder", "vae"}) {
    BOOST_REQUIRE(e.client.fault(module, 0, {"commit", "error"}));
    auto r = e.client.update(update_to(ckpts().b));
    BOOST_TEST(!r.success, module);
    BOOST_TEST(e.client.checksums() == disk_checksums(ckpts().a), module);
    BOOST_TEST(e.client.generate(5).second == image_a.second, module);
  }
}
