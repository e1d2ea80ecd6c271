// The module and cache actors on their own, driven with typed messages from a scoped actor.
#define BOOST_TEST_MODULE module_actor
#include <boost/test/unit_test.hpp>

#include <ATen/ATen.h>

#include "actors/cache_actor.hpp"
#include "actors/module_actor.hpp"
#include "pipeline/update/checkpoint_source.hpp"
#include "pipeline/update/module_updater.hpp"
#include "pipeline/flux2_klein.hpp"
#include "pipeline/weights/device_loader.hpp"
#include "tests/unit/engine_fixture.hpp"

using namespace refit;
using namespace refit::test;
namespace fs = std::filesystem;

namespace {

struct fixture {
  temp_dir dir;
  fs::path a = make_tiny(dir.path() / "a", 1), b = make_tiny(dir.path() / "b", 2);
  std::map<std::string, std::string> disk_a = disk_checksums(a), disk_b = disk_checksums(b);
  engine_system_config cfg;
  caf::actor_system sys{cfg};
  caf::scoped_actor self{sys};
  std::shared_ptr<weights::device_loader> loader;
  std::shared_ptr<pipeline::flux2_klein_pipeline> pipe;
  std::shared_ptr<actors::module_state> state;
  msg::module_actor module;

  fixture() {
    models::placement where;
    where.device = at::Device(test_device());
    if (where.device.is_cuda()) loader = std::make_shared<weights::device_loader>(where.device.has_index() ? where.device.index() : 0);
    pipe = std::make_shared<pipeline::flux2_klein_pipeline>(a, where);
    pipe->load_weights(std::nullopt, loader.get());
    state = actors::make_module_state(std::make_shared<update::module_updater>(pipe, "transformer", 0, std::make_shared<update::checkpoint_source>(a / "transformer"), loader));
    module = actors::spawn_module_actor(sys, state);
  }
  ~fixture() { caf::anon_send_exit(module, caf::exit_reason::user_shutdown); }

  template <class... Ts>
  std::pair<msg::module_report, std::string> ask(Ts... xs) {
    return ask_module(self, module, xs...);
  }
  std::string checksum() { return module_checksum(self, module); }
  msg::module_info info() { return module_info_of(self, module); }
};

}  // namespace

BOOST_FIXTURE_TEST_SUITE(module_actor_lifecycle, fixture)

BOOST_AUTO_TEST_CASE(validate_reads_headers_only_and_names_what_does_not_fit) {
  auto [ok, err] = ask(msg::validate_atom::value, checkpoint(b / "transformer"));
  BOOST_TEST(err.empty(), err);
  BOOST_TEST(ok.tensors == 33u);
  auto [bad, why] = ask(msg::validate_atom::value, checkpoint(b / "vae"));
  BOOST_TEST(why.find("module 'transformer' (worker 0) phase 'validate'") != std::string::npos, why);
  BOOST_TEST(why.find("checkpoint lacks tensor") != std::string::npos, why);
  BOOST_TEST(checksum() == disk_a["transformer"]);
}

BOOST_AUTO_TEST_CASE(staged_commit_swaps_and_rollback_swaps_back) {
  auto [staged, e1] = ask(msg::stage_atom::value, checkpoint(b / "transformer"), mode_of("staged"));
  BOOST_TEST(e1.empty(), e1);
  BOOST_TEST(staged.path == msg::write_path::staged);
  BOOST_TEST(info().shadow_bytes == staged.bytes);
  BOOST_TEST(checksum() == disk_a["transformer"]);  // staging never touches live weights
  auto [committed, e2] = ask(msg::commit_atom::value);
  BOOST_TEST(e2.empty(), e2);
  BOOST_TEST(checksum() == disk_b["transformer"]);
  BOOST_TEST(info().undo_bytes > 0u);
  BOOST_TEST(info().shadow_bytes == 0u);
  auto [rolled, e3] = ask(msg::rollback_atom::value);
  BOOST_TEST(e3.empty(), e3);
  BOOST_TEST(checksum() == disk_a["transformer"]);
  BOOST_TEST(info().undo_bytes == 0u);
  BOOST_TEST(info().source == (a / "transformer").string());
}

BOOST_AUTO_TEST_CASE(in_place_commit_then_finalize_records_the_new_source) {
  BOOST_TEST(ask(msg::stage_atom::value, checkpoint(b / "transformer"), mode_of("in_place")).second.empty());
  BOOST_TEST(info().shadow_bytes == 0u);
  auto [committed, err] = ask(msg::commit_atom::value);
  BOOST_TEST(err.empty(), err);
  BOOST_TEST(committed.path == msg::write_path::in_place);
  BOOST_TEST(checksum() == disk_b["transformer"]);
  BOOST_TEST(info().undo_bytes > 0u);
  BOOST_TEST(ask(msg::finalize_atom::value).second.empty());
  BOOST_TEST(info().undo_bytes == 0u);
  BOOST_TEST(info().source == (b / "transformer").string());
}

BOOST_AUTO_TEST_CASE(a_replacement_actor_undoes_the_commit_its_dead_predecessor_left) {
  BOOST_TEST(ask(msg::stage_atom::value, checkpoint(b / "transformer"), mode_of("staged")).second.empty());
  BOOST_TEST(ask(msg::commit_atom::value).second.empty());
  BOOST_TEST(checksum() == disk_b["transformer"]);
  self->monitor(module);
  caf::anon_send_exit(module, caf::exit_reason::kill);
  self->receive([&](caf::down_msg&) {});
  module = actors::spawn_module_actor(sys, state);
  BOOST_TEST(checksum() == disk_a["transformer"]);
  BOOST_TEST(info().undo_bytes == 0u);
}

// Once the transaction recorded its decision (every participant committed), a replacement keeps the
// commit its dead predecessor did not finalize; a later commit that was not decided is undone again.
BOOST_AUTO_TEST_CASE(a_replacement_actor_keeps_a_decided_commit_and_undoes_only_an_undecided_one) {
  auto kill_and_respawn = [&] {
    self->monitor(module);
    caf::anon_send_exit(module, caf::exit_reason::kill);
    self->receive([](caf::down_msg&) {});
    module = actors::spawn_module_actor(sys, state);
  };
  BOOST_TEST(ask(msg::stage_atom::value, checkpoint(b / "transformer"), mode_of("staged")).second.empty());
  BOOST_TEST(ask(msg::commit_atom::value).second.empty());
  state->core->mark_decided();
  kill_and_respawn();
  BOOST_TEST(checksum() == disk_b["transformer"]);
  BOOST_TEST(info().undo_bytes == 0u);
  BOOST_TEST(info().source == (b / "transformer").string());

  BOOST_TEST(ask(msg::stage_atom::value, checkpoint(a / "transformer"), mode_of("in_place")).second.empty());
  BOOST_TEST(ask(msg::commit_atom::value).second.empty());
  BOOST_TEST(checksum() == disk_a["transformer"]);
  kill_and_respawn();  // this commit was never decided
  BOOST_TEST(checksum() == disk_b["transformer"]);
  BOOST_TEST(info().source == (b / "transformer").string());
}

BOOST_AUTO_TEST_CASE(discard_frees_shadows_without_touching_live_weights) {
  BOOST_TEST(ask(msg::stage_atom::value, checkpoint(b / "transformer"), mode_of("staged")).second.empty());
  BOOST_TEST(info().shadow_bytes > 0u);
  BOOST_TEST(ask(msg::discard_atom::value).second.empty());
  BOOST_TEST(info().shadow_bytes == 0u);
  BOOST_TEST(checksum() == disk_a["transformer"]);
}

BOOST_AUTO_TEST_SUITE_END()

BOOST_AUTO_TEST_CASE(cache_actor_counts_resets_and_teacache_steps) {
  engine_system_config cfg;
  caf::actor_system sys{cfg};
  caf::scoped_actor self{sys};
  auto cache = actors::spawn_cache_actor(sys, 0);
  uint64_t n = 0;
  self->send(cache, msg::teacache_atom::value, uint64_t{5}, uint64_t{3});
  self->request(cache, caf::infinite, msg::reset_atom::value).receive([&](uint64_t k) { n = k; }, [&](caf::error&) {});
  self->send(cache, msg::teacache_atom::value, uint64_t{2}, uint64_t{0});
  self->request(cache, caf::infinite, msg::reset_atom::value).receive([&](uint64_t k) { n = k; }, [&](caf::error&) {});
  BOOST_TEST(n == 2u);
  msg::teacache_counters c;
  self->request(cache, caf::infinite, msg::stats_atom::value).receive([&](msg::teacache_counters& k) { c = k; }, [&](caf::error&) {});
  BOOST_TEST(c.resets == 2u);
  BOOST_TEST(c.requests == 2u);
  BOOST_TEST(c.steps_computed == 7u);
  BOOST_TEST(c.steps_skipped == 3u);
  caf::anon_send_exit(cache, caf::exit_reason::user_shutdown);
}
