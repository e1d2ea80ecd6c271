// The update core (update::module_updater) driven directly, without CAF, with weight sources that are not
// a checkpoint: values held in memory for some slots (as a broadcast or shared tensors deliver them) and a
// delta over the current values (as a LoRA merge computes it). The same stage / commit / rollback /
// finalize must hold for them as for the disk: staging never touches live weights, a rollback restores
// every byte, the slots not planned stay as they were, and the slots' origins are tracked per slot.
#define BOOST_TEST_MODULE module_updater
#include <boost/test/unit_test.hpp>

#include <ATen/ATen.h>
#include <c10/core/InferenceMode.h>

#include "pipeline/flux2_klein.hpp"
#include "pipeline/models/layer_offload.hpp"
#include "pipeline/models/tensor_registry.hpp"
#include "pipeline/update/checkpoint_source.hpp"
#include "pipeline/update/module_updater.hpp"
#include "pipeline/make_model.hpp"
#include "tests/unit/temp_dir.hpp"

using namespace refit;
using refit::test::temp_dir;
namespace fs = std::filesystem;

namespace {

// New values for some slots, by name: planned from their shapes, filled by copying (what a broadcast
// receiver or a shared-tensor source does once the bytes are there).
struct memory_source final : update::module_source {
  std::map<std::string, at::Tensor> values;
  bool can_repeat = true;
  int fills = 0;
  std::string origin() const override { return "memory"; }
  update::source_plan plan(const update::module_context& m) override {
    update::source_plan p;
    for (const auto& [name, t] : values) {
      const auto* slot = m.registry.find(name);
      if (!slot) throw std::invalid_argument("module '" + m.module + "': no tensor '" + name + "'");
      if (t.sizes().vec() != slot->shape) throw std::invalid_argument("module '" + m.module + "': tensor '" + name + "' has the wrong shape");
      p.slots.push_back(static_cast<size_t>(slot - m.registry.slots().data()));
      p.bytes += t.nbytes();
    }
    std::sort(p.slots.begin(), p.slots.end());
    return p;
  }
  void fill(const update::module_context& m, const update::fill_target& t) override {
    ++fills;
    for (size_t k = 0; k < t.slots.size(); ++k) t.destinations[k].copy_(values.at(m.registry.slots()[t.slots[k]].name));
  }
  bool repeatable() const override { return can_repeat; }
};

// current + delta for some slots: reads what the module holds (as a LoRA merge does).
struct delta_source final : update::module_source {
  std::map<std::string, at::Tensor> delta;
  std::string origin() const override { return "delta"; }
  update::source_plan plan(const update::module_context& m) override {
    update::source_plan p;
    for (const auto& [name, d] : delta) p.slots.push_back(static_cast<size_t>(m.registry.find(name) - m.registry.slots().data()));
    std::sort(p.slots.begin(), p.slots.end());
    return p;
  }
  void fill(const update::module_context& m, const update::fill_target& t) override {
    for (size_t k = 0; k < t.slots.size(); ++k)
      t.destinations[k].copy_(t.current[k].to(at::kFloat) + delta.at(m.registry.slots()[t.slots[k]].name));
  }
  bool repeatable() const override { return false; }
};

struct fixture {
  temp_dir dir;
  fs::path a = dir.path() / "a";
  std::shared_ptr<pipeline::flux2_klein_pipeline> pipe;
  std::unique_ptr<update::module_updater> core;
  explicit fixture(bool offload = false) {
    pipeline::make_model({"flux2-klein-tiny", 1, a, 2, true, {}});
    pipe = std::make_shared<pipeline::flux2_klein_pipeline>(a, models::placement{}, pipeline::offload_settings{offload, 1});
    pipe->load_weights();
    core = std::make_unique<update::module_updater>(pipe, "transformer", 0, std::make_shared<update::checkpoint_source>(a / "transformer"));
  }
  const models::tensor_registry& registry() const { return pipe->registry("transformer"); }
  std::string checksum() const { return core->checksum(weights::checksum_format::refit); }
  // The values the module holds for slot i (the host store's for an offloaded block).
  at::Tensor held(size_t i) const {
    auto* off = pipe->transformer_offload();
    return (off && off->offloaded(i) ? off->host_tensor(i) : *registry().slots()[i].tensor).clone();
  }
  // The slot values of a deterministic random "new" tensor for slot i.
  at::Tensor new_value(size_t i, double v) const { return at::full(registry().slots()[i].shape, v); }
};

bool same(const at::Tensor& x, const at::Tensor& y) { return at::equal(x, y); }

}  // namespace

BOOST_AUTO_TEST_CASE(a_source_of_some_slots_stages_without_touching_live_weights_and_rolls_back_every_byte) {
  c10::InferenceMode inference;
  for (auto path : {update::requested_path::staged, update::requested_path::in_place}) {
    fixture f;
    const std::string before = f.checksum();
    const size_t n = f.registry().slots().size();
    const size_t first = 0, last = n - 1;
    auto src = std::make_shared<memory_source>();
    src->values[f.registry().slots()[first].name] = f.new_value(first, 0.5);
    src->values[f.registry().slots()[last].name] = f.new_value(last, -0.25);
    const at::Tensor untouched = f.held(1);

    auto v = f.core->validate(*src);
    BOOST_TEST(v.tensors == 2u);
    auto s = f.core->stage(src, path);
    BOOST_TEST(s.tensors == 2u);
    BOOST_TEST(f.checksum() == before);  // staging never touches live weights
    f.core->commit();
    BOOST_TEST(same(f.held(first), f.new_value(first, 0.5)));
    BOOST_TEST(same(f.held(last), f.new_value(last, -0.25)));
    BOOST_TEST(same(f.held(1), untouched));  // not planned: as it was
    BOOST_TEST(f.core->status().undo_bytes > 0u);
    f.core->rollback_requested();
    f.core->rollback();
    BOOST_TEST(f.checksum() == before);
    BOOST_TEST(f.core->status().undo_bytes == 0u);
    BOOST_TEST(f.core->status().source == (f.a / "transformer").string());
  }
}

BOOST_AUTO_TEST_CASE(a_delta_source_reads_the_current_values_and_finalize_records_each_slots_origin) {
  c10::InferenceMode inference;
  fixture f;
  const size_t i = 2;
  const std::string name = f.registry().slots()[i].name;
  const at::Tensor before = f.held(i);
  auto src = std::make_shared<delta_source>();
  src->delta[name] = at::full(f.registry().slots()[i].shape, 1.0);
  f.core->stage(src, update::requested_path::staged);
  f.core->commit();
  BOOST_TEST(same(f.held(i), before + 1.0));
  f.core->finalize();
  // One slot came from the delta, the rest from the checkpoint: info names both.
  BOOST_TEST(f.core->status().source == (f.a / "transformer").string() + ", delta");
}

BOOST_AUTO_TEST_CASE(in_place_without_room_for_a_snapshot_rereads_each_slots_origin_or_refuses) {
  c10::InferenceMode inference;
  fixture f;
  const size_t i = 3;
  const std::string name = f.registry().slots()[i].name;
  const std::string original = f.checksum();

  // The checkpoint can be read again: an in-place commit without a snapshot restores by re-reading it.
  f.core->simulate_no_room_for_undo(true);
  auto first = std::make_shared<memory_source>();
  first->values[name] = f.new_value(i, 2.0);
  f.core->stage(first, update::requested_path::in_place);
  BOOST_TEST((f.core->commit().path == update::write_path::in_place_reread_undo));
  f.core->rollback_requested();
  BOOST_TEST((f.core->rollback().path == update::write_path::reread));
  BOOST_TEST(f.checksum() == original);

  // Once the slot holds values from a source that cannot be read again, the same commit is refused
  // before any byte is written, naming that source.
  f.core->simulate_no_room_for_undo(false);
  auto once = std::make_shared<memory_source>();
  once->can_repeat = false;
  once->values[name] = f.new_value(i, 3.0);
  f.core->stage(once, update::requested_path::staged);
  f.core->commit();
  f.core->finalize();
  const std::string with_once = f.checksum();
  f.core->simulate_no_room_for_undo(true);
  auto next = std::make_shared<memory_source>();
  next->values[name] = f.new_value(i, 4.0);
  f.core->stage(next, update::requested_path::in_place);
  try {
    f.core->commit();
    BOOST_FAIL("an in-place commit without an undo snapshot of values that cannot be read again must be refused");
  } catch (const std::runtime_error& e) {
    BOOST_TEST(std::string(e.what()).find("came from memory, which cannot be read again") != std::string::npos, e.what());
  }
  BOOST_TEST(next->fills == 0);
  BOOST_TEST(f.checksum() == with_once);
  f.core->discard();
  BOOST_TEST(f.core->status().undo_bytes + f.core->status().shadow_bytes == 0u);
}

BOOST_AUTO_TEST_CASE(a_plan_that_does_not_fit_the_module_names_the_tensor_and_changes_nothing) {
  c10::InferenceMode inference;
  fixture f;
  const std::string before = f.checksum();
  auto src = std::make_shared<memory_source>();
  src->values[f.registry().slots()[0].name] = at::zeros({3, 3});
  try {
    f.core->stage(src, update::requested_path::staged);
    BOOST_FAIL("a wrong shape must be refused at plan");
  } catch (const std::invalid_argument& e) {
    BOOST_TEST(std::string(e.what()).find(f.registry().slots()[0].name) != std::string::npos, e.what());
  }
  BOOST_TEST(src->fills == 0);
  BOOST_TEST(f.checksum() == before);
}

BOOST_AUTO_TEST_CASE(a_staged_update_of_some_offloaded_slots_keeps_the_other_blocks_in_the_swapped_store) {
  c10::InferenceMode inference;
  fixture f(/*offload=*/true);
  auto* off = f.pipe->transformer_offload();
  std::vector<size_t> hosted;
  for (size_t i = 0; i < f.registry().slots().size(); ++i)
    if (off->offloaded(i)) hosted.push_back(i);
  BOOST_REQUIRE(hosted.size() > 2u);
  const std::string before = f.checksum();
  const size_t changed = hosted.front(), other = hosted.back();
  const at::Tensor other_before = f.held(other);
  auto src = std::make_shared<memory_source>();
  src->values[f.registry().slots()[changed].name] = f.new_value(changed, 0.75);
  f.core->stage(src, update::requested_path::staged);
  f.core->commit();  // swaps the whole host store
  BOOST_TEST(same(f.held(changed), f.new_value(changed, 0.75)));
  BOOST_TEST(same(f.held(other), other_before));
  f.core->rollback_requested();
  f.core->rollback();
  BOOST_TEST(f.checksum() == before);
}
