// Fault injection into the update transaction: every phase (and finalize, after the decision) x failure kind x module, with 1 and 2
// workers and with a second worker joined from another actor system over the actor port (the victim is then that remote
// participant, reached through its relays), staged and in place, without and with layerwise offload of the transformer's blocks. A failed update must name
// module and phase, leave every checksum on every worker as it was, keep the server serving, and leave
// no undo or shadow buffers behind.
#define BOOST_TEST_MODULE faults
#include <boost/test/unit_test.hpp>
#include <boost/test/data/test_case.hpp>

#include <thread>

#include "actors/module_actor.hpp"
#include "tests/unit/engine_fixture.hpp"
#include "tests/unit/remote_engine.hpp"

using namespace refit;
using namespace refit::test;
namespace fs = std::filesystem;
namespace bdata = boost::unit_test::data;

namespace {

struct world {
  temp_dir dir;
  fs::path a, b;
  engine_system_config cfg;
  std::unique_ptr<caf::actor_system> sys;
  std::map<std::pair<size_t, bool>, std::unique_ptr<engine_client>> engines;  // by worker count and offload
  std::map<bool, std::unique_ptr<test::remote_engine>> remote;                 // by offload
  world() {
    a = make_tiny(dir.path() / "a", 1);
    b = make_tiny(dir.path() / "b", 2);
    sys = std::make_unique<caf::actor_system>(cfg);
  }
  // workers: 1 or 2 local ones, or joined_worker (one local, one joined from another actor system).
  engine_client& engine(size_t workers, bool offload) {
    if (workers == joined_worker) {
      auto& r = remote[offload];
      if (!r) r = std::make_unique<test::remote_engine>(a, offload);
      return r->client();
    }
    auto& e = engines[{workers, offload}];
    if (!e)
      e = std::make_unique<engine_client>(
          *sys, actors::spawn_engine(*sys, {a, std::vector<std::string>(workers, test_device()), "fp32", offload, 1}));
    return *e;
  }
  ~world() {
    // Two actor systems of one process joined over loopback TCP do not always shut down one after the other (a
    // system's destructor waits for its detached actors while the other still holds proxies of them: it hung under
    // load in CI), so the remote engines are left to the process's exit. `refit serve` and `refit worker` are
    // separate processes: their shutdown is tested in test_remote_workers.py.
    for (auto& [offload, r] : remote) static_cast<void>(r.release());
    for (auto& [n, e] : engines) caf::anon_send_exit(e->scheduler(), caf::exit_reason::user_shutdown);
  }
  static constexpr size_t joined_worker = 3;
};

// Lives for the whole test module and is torn down before main returns (not at static destruction,
// when the libraries it uses may already be gone).
world* current = nullptr;
struct world_fixture {
  world instance;
  world_fixture() { current = &instance; }
  ~world_fixture() { current = nullptr; }
};
world& w() { return *current; }

const char* phases[] = {"validate", "stage", "commit"};
const char* kinds[] = {"error", "throw", "die"};
const char* modules[] = {"text_encoder", "transformer", "vae"};
const char* modes[] = {"staged", "in_place"};
// 1 or 2 local workers, or 3: a local worker and a joined one (the victim).
const int worker_setups[] = {1, 2, 3};
int32_t worker_count(int setup) { return setup == 3 ? 2 : setup; }

}  // namespace

BOOST_TEST_GLOBAL_FIXTURE(world_fixture);

BOOST_AUTO_TEST_CASE(fault_injection_is_compiled_into_this_test_build) { BOOST_TEST(actors::fault_injection_compiled()); }

BOOST_DATA_TEST_CASE(failed_update_changes_nothing_names_module_and_phase_and_keeps_serving,
                     bdata::make({false, true}) * bdata::make(modes) * bdata::make(worker_setups) * bdata::make(phases) *
                         bdata::make(kinds) * bdata::make(modules),
                     offload, mode, setup, phase, kind, module) {
  engine_client& e = w().engine(static_cast<size_t>(setup), offload);
  const int32_t workers = worker_count(setup);
  const int32_t victim = workers - 1;
  std::vector<std::map<std::string, std::string>> before;
  for (int32_t k = 0; k < workers; ++k) before.push_back(e.checksums(k));
  BOOST_REQUIRE(e.fault(module, victim, {phase, kind}));

  msg::update_request req;
  req.model_path = w().b.string();
  req.mode = mode_of(mode);
  auto r = e.update(req);
  BOOST_TEST(!r.success);
  BOOST_TEST(r.message.find("module '" + std::string(module) + "' (worker " + std::to_string(victim) + ")") != std::string::npos, r.message);
  BOOST_TEST(r.message.find("in phase '" + std::string(phase) + "'") != std::string::npos, r.message);
  BOOST_TEST(r.message.find("No weights were changed") != std::string::npos, r.message);
  const bool replaced = r.message.find("The actor of module '" + std::string(module) + "' (worker " + std::to_string(victim) +
                                       ") died and was replaced.") != std::string::npos;
  BOOST_TEST(replaced == (std::string(kind) == "die"), r.message);
  // Asked right after the reply: every module answers (a dead actor was replaced before the reply).
  for (int32_t k = 0; k < workers; ++k) BOOST_TEST(e.checksums(k) == before[k], "worker " << k);

  auto info = e.info();
  BOOST_TEST(info.modules.size() == 3u * workers);
  for (const auto& m : info.modules) {
    BOOST_TEST(m.undo_bytes == 0u, m.name << " worker " << m.worker);
    BOOST_TEST(m.shadow_bytes == 0u, m.name << " worker " << m.worker);
  }
  auto g = e.generate(4);
  BOOST_TEST(g.first.rfind("error", 0) != 0u, g.first);
}

// After every commit succeeded the update is decided: a participant that fails to finalize must not take
// its module back to the old weights. A dead one's replacement undoes its commit on start, so the
// transaction applies the update to it again before generation resumes.
BOOST_DATA_TEST_CASE(a_failure_after_the_last_commit_still_leaves_every_module_updated,
                     bdata::make({false, true}) * bdata::make(modes) * bdata::make(worker_setups) * bdata::make(kinds) * bdata::make(modules),
                     offload, mode, setup, kind, module) {
  engine_client& e = w().engine(static_cast<size_t>(setup), offload);
  const int32_t workers = worker_count(setup);
  const int32_t victim = workers - 1;
  BOOST_REQUIRE(e.fault(module, victim, {"finalize", kind}));
  msg::update_request req;
  req.model_path = w().b.string();
  req.mode = mode_of(mode);
  req.weight_version = std::string("finalize-") + kind;
  auto r = e.update(req);
  BOOST_TEST(r.success, r.message);
  BOOST_TEST(r.weight_version == req.weight_version);  // generation resumed on the decided update's version
  const bool kept = r.message.find("The actor of module '" + std::string(module) + "' (worker " + std::to_string(victim) +
                                   ") died after the update was decided; its replacement kept the new weights") != std::string::npos;
  BOOST_TEST(kept == (std::string(kind) == "die"), r.message);
  const auto disk = disk_checksums(w().b);
  for (int32_t k = 0; k < workers; ++k) BOOST_TEST(e.checksums(k) == disk, "worker " << k);
  for (const auto& m : e.info().modules) {
    BOOST_TEST(m.undo_bytes == 0u, m.name << " worker " << m.worker);
    BOOST_TEST(m.shadow_bytes == 0u, m.name << " worker " << m.worker);
  }
  req.model_path = w().a.string();  // back, for the next case
  req.mode = msg::update_mode::auto_select;
  BOOST_TEST(e.update(req).success);
  for (int32_t k = 0; k < workers; ++k) BOOST_TEST(e.checksums(k) == disk_checksums(w().a), "worker " << k);
}

// The same death, but the worker's record of the decision did not reach the module first: its
// replacement undoes the commit on start, and the transaction applies the update to it again.
BOOST_DATA_TEST_CASE(a_module_that_missed_the_decision_is_updated_again,
                     bdata::make({false, true}) * bdata::make(modes) * bdata::make(worker_setups) * bdata::make(modules), offload, mode, setup,
                     module) {
  engine_client& e = w().engine(static_cast<size_t>(setup), offload);
  const int32_t workers = worker_count(setup);
  const int32_t victim = workers - 1;
  BOOST_REQUIRE(e.fault(module, victim, {"decide", "lost"}));
  BOOST_REQUIRE(e.fault(module, victim, {"finalize", "die"}));
  msg::update_request req;
  req.model_path = w().b.string();
  req.mode = mode_of(mode);
  auto r = e.update(req);
  BOOST_TEST(r.success, r.message);
  BOOST_TEST(r.message.find("The actor of module '" + std::string(module) + "' (worker " + std::to_string(victim) +
                            ") died after its commit and was replaced; the update was applied to it again") != std::string::npos,
             r.message);
  const auto disk = disk_checksums(w().b);
  for (int32_t k = 0; k < workers; ++k) BOOST_TEST(e.checksums(k) == disk, "worker " << k);
  for (const auto& m : e.info().modules) BOOST_TEST(m.undo_bytes + m.shadow_bytes == 0u, m.name << " worker " << m.worker);
  req.model_path = w().a.string();
  req.mode = msg::update_mode::auto_select;
  BOOST_TEST(e.update(req).success);
  for (int32_t k = 0; k < workers; ++k) BOOST_TEST(e.checksums(k) == disk_checksums(w().a), "worker " << k);
}

BOOST_DATA_TEST_CASE(after_every_failure_a_clean_update_still_succeeds_on_every_worker,
                     bdata::make({false, true}) * bdata::make(worker_setups), offload, setup) {
  engine_client& e = w().engine(static_cast<size_t>(setup), offload);
  const int32_t workers = worker_count(setup);
  msg::update_request req;
  req.model_path = w().b.string();
  auto r = e.update(req);
  BOOST_TEST(r.success, r.message);
  const auto disk = disk_checksums(w().b);
  for (int32_t k = 0; k < workers; ++k) BOOST_TEST(e.checksums(k) == disk, "worker " << k);
  req.model_path = w().a.string();  // back, for any later case
  BOOST_TEST(e.update(req).success);
}

namespace {
// A staged update to b in which the VAE fails its commit and the transformer then fails its rollback as
// `kind` says (a double fault).
msg::update_result update_with_failing_rollback(engine_client& e, const char* kind) {
  BOOST_REQUIRE(e.fault("vae", 0, {"commit", "error"}));
  BOOST_REQUIRE(e.fault("transformer", 0, {"rollback", kind}));
  msg::update_request req;
  req.model_path = w().b.string();
  req.mode = msg::update_mode::staged;
  return e.update(req);
}
}  // namespace

// A double fault: one module fails its commit and another's actor dies while rolling back. The worker
// replaces the dead actor, whose start-up undoes its commit; the transaction waits for that before
// generation resumes, so the update still changes nothing.
BOOST_DATA_TEST_CASE(an_actor_dying_during_rollback_is_replaced_and_its_commit_undone, bdata::make({false, true}), offload) {
  engine_client& e = w().engine(1, offload);
  const auto before = e.checksums();
  const auto image = e.generate(4);
  auto r = update_with_failing_rollback(e, "die");
  BOOST_TEST(!r.success);
  BOOST_TEST(r.message.find("No weights were changed") != std::string::npos, r.message);
  BOOST_TEST(r.message.find("transformer (worker 0, by a replacement actor)") != std::string::npos, r.message);
  BOOST_TEST(e.checksums() == before);
  BOOST_TEST(e.generate(4).second == image.second);
}

// A rollback that fails leaves that module on the new weights and the reply says so; the next update's
// stage finishes the rollback before anything else, so even when that update fails too the module is
// back on the weights every other module holds.
BOOST_DATA_TEST_CASE(a_failed_rollback_is_finished_by_the_next_update, bdata::make({false, true}), offload) {
  engine_client& e = w().engine(1, offload);
  const auto a = disk_checksums(w().a), b = disk_checksums(w().b);
  BOOST_REQUIRE(e.checksums() == a);
  auto r = update_with_failing_rollback(e, "error");
  BOOST_TEST(!r.success);
  BOOST_TEST(r.message.find("ROLLBACK FAILED for module 'transformer' (worker 0)") != std::string::npos, r.message);
  BOOST_TEST(e.checksums().at("transformer") == b.at("transformer"));

  BOOST_REQUIRE(e.fault("vae", 0, {"stage", "error"}));
  msg::update_request req;
  req.model_path = w().b.string();
  r = e.update(req);
  BOOST_TEST(!r.success);
  BOOST_TEST(r.message.find("No weights were changed") != std::string::npos, r.message);
  BOOST_TEST(e.checksums() == a);
  for (const auto& m : e.info().modules) BOOST_TEST(m.undo_bytes == 0u, m.name);
}
