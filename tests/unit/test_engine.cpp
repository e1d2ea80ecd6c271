// The actor engine and the transactional weight update, on tiny checkpoints (CPU, fp32).
#define BOOST_TEST_MODULE engine
#include <boost/test/unit_test.hpp>

#include <fstream>
#include <condition_variable>
#include <mutex>
#include <thread>

#include "actors/client_gateway.hpp"
#include "tests/unit/engine_fixture.hpp"

using namespace refit;
using namespace refit::test;
namespace fs = std::filesystem;

namespace {

// Two checkpoints made once for the whole module.
struct checkpoints {
  temp_dir dir;
  fs::path a, b, b_transformer_only, corrupt;
  checkpoints() {
    a = make_tiny(dir.path() / "a", 1);
    b = make_tiny(dir.path() / "b", 2);
    b_transformer_only = mix(a, b, "transformer", dir.path() / "a_with_b_transformer");
    corrupt = make_corrupt(a, b, dir.path() / "corrupt");
  }
};

checkpoints& ckpts() {
  static checkpoints c;
  return c;
}

}  // namespace

BOOST_AUTO_TEST_CASE(server_checksums_equal_disk_checksums_of_the_loaded_checkpoint) {
  engine e(ckpts().a);
  BOOST_TEST(e.client.checksums() == disk_checksums(ckpts().a));
  auto info = e.client.info();
  BOOST_TEST(info.weight_version == "0");
  BOOST_TEST(info.modules.size() == 3u);
}

BOOST_AUTO_TEST_CASE(same_model_reload_leaves_checksums_and_images_identical) {
  engine e(ckpts().a);
  const auto before = e.client.checksums();
  const auto image = e.client.generate(5);
  auto r = e.client.update(update_to(ckpts().a));
  BOOST_TEST(r.success, r.message);
  BOOST_TEST(r.weight_version == "1");
  BOOST_TEST(r.modules.size() == 3u);
  BOOST_TEST(e.client.checksums() == before);
  auto again = e.client.generate(5);
  BOOST_TEST(again.first == "1");
  BOOST_TEST(again.second == image.second);
}

BOOST_AUTO_TEST_CASE(update_to_a_second_checkpoint_matches_its_disk_checksum_and_a_fresh_server) {
  engine e(ckpts().a);
  msg::update_request req = update_to(ckpts().b);
  req.weight_version = "step-100";
  auto r = e.client.update(req);
  BOOST_TEST(r.success, r.message);
  BOOST_TEST(r.weight_version == "step-100");
  BOOST_TEST(r.mode == msg::write_path::staged);
  BOOST_TEST(r.cache_flushed);
  for (const char* phase : {"plan", "validate", "stage", "pause", "commit", "finish", "total"}) BOOST_TEST(r.timings.count(phase) == 1u, phase);
  BOOST_TEST(e.client.checksums() == disk_checksums(ckpts().b));
  auto updated = e.client.generate(9);
  BOOST_TEST(updated.first == "step-100");
  engine fresh(ckpts().b);
  BOOST_TEST(fresh.client.generate(9).second == updated.second);
  auto info = e.client.info();
  BOOST_TEST(info.model_path == ckpts().b.string());
  for (const auto& m : info.modules) {
    BOOST_TEST(m.source == (ckpts().b / m.name).string());
    BOOST_TEST(m.undo_bytes == 0u);
    BOOST_TEST(m.shadow_bytes == 0u);
  }
}

BOOST_AUTO_TEST_CASE(target_modules_subset_changes_only_those_modules) {
  engine e(ckpts().a);
  const auto before = e.client.checksums();
  auto r = e.client.update(update_to(ckpts().b, {"transformer"}));
  BOOST_TEST(r.success, r.message);
  auto after = e.client.checksums();
  BOOST_TEST(after["transformer"] == disk_checksums(ckpts().b)["transformer"]);
  BOOST_TEST(after["vae"] == before.at("vae"));
  BOOST_TEST(after["text_encoder"] == before.at("text_encoder"));
}

BOOST_AUTO_TEST_CASE(in_place_mode_gives_the_same_weights_and_says_so) {
  engine e(ckpts().a);
  msg::update_request req = update_to(ckpts().b);
  req.mode = msg::update_mode::in_place;
  auto r = e.client.update(req);
  BOOST_TEST(r.success, r.message);
  BOOST_TEST(r.mode == msg::write_path::in_place);
  BOOST_TEST(r.mode_reason.find("requested") != std::string::npos);
  BOOST_TEST(e.client.checksums() == disk_checksums(ckpts().b));
}

BOOST_AUTO_TEST_CASE(bad_requests_fail_and_change_nothing) {
  engine e(ckpts().a);
  const auto before = e.client.checksums();
  auto r = e.client.update(update_to("/nonexistent/path/to/model"));
  BOOST_TEST(!r.success);
  BOOST_TEST(r.message.find("/nonexistent/path/to/model") != std::string::npos, r.message);
  r = e.client.update(update_to(""));
  BOOST_TEST(!r.success);
  BOOST_TEST(r.message.find("model_path is required") != std::string::npos, r.message);
  r = e.client.update(update_to(ckpts().b, {"nonexistent_module"}));
  BOOST_TEST(!r.success);
  BOOST_TEST(r.message.find("not found in pipeline") != std::string::npos, r.message);
  msg::update_request bad_mode = update_to(ckpts().b);
  bad_mode.mode = static_cast<msg::update_mode>(7);  // what a peer could put on the wire
  r = e.client.update(bad_mode);
  BOOST_TEST(!r.success);
  BOOST_TEST(r.message.find("mode must be auto, staged or in_place") != std::string::npos, r.message);
  BOOST_TEST(e.client.checksums() == before);
  BOOST_TEST(e.client.info().weight_version == "0");
}

BOOST_AUTO_TEST_CASE(corrupted_checkpoint_fails_naming_module_and_file_and_changes_nothing) {
  engine e(ckpts().a);
  const auto before = e.client.checksums();
  auto r = e.client.update(update_to(ckpts().corrupt, {"transformer", "vae"}));
  BOOST_TEST(!r.success);
  BOOST_TEST(r.message.find("module 'vae'") != std::string::npos, r.message);
  BOOST_TEST(r.message.find("diffusion_pytorch_model.safetensors") != std::string::npos, r.message);
  BOOST_TEST(r.message.find("No weights were changed") != std::string::npos, r.message);
  BOOST_TEST(e.client.checksums() == before);
  BOOST_TEST(e.client.generate(3).first == "0");
}

BOOST_AUTO_TEST_CASE(abort_all_requests_cancels_in_flight_generation_with_a_clear_error) {
  engine e(ckpts().a);
  caf::scoped_actor self{e.sys};
  msg::generation_request long_job;
  long_job.prompts = {"slow"};
  long_job.steps = 400;
  long_job.width = long_job.height = 64;
  auto pending = self->request(e.client.scheduler(), caf::infinite, msg::generate_atom::value, long_job);
  // The update must find the job running: wait until the scheduler reports it in flight.
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  uint64_t in_flight = 0;
  while (in_flight == 0 && std::chrono::steady_clock::now() < deadline)
    self->request(e.client.scheduler(), caf::infinite, msg::stats_atom::value)
        .receive([&](msg::scheduler_stats& s) { in_flight = s.in_flight; }, [&](caf::error&) {});
  BOOST_REQUIRE(in_flight == 1u);
  msg::update_request req = update_to(ckpts().b);
  req.abort_all_requests = true;
  auto r = e.client.update(req);
  BOOST_TEST(r.success, r.message);
  BOOST_TEST(r.aborted_requests == 1u);
  std::string outcome;
  pending.receive([&](msg::generation_result&) { outcome = "finished"; }, [&](caf::error& err) { outcome = msg::describe(err); });
  BOOST_TEST(outcome.find("aborted by a weight update") != std::string::npos, outcome);
  BOOST_TEST(e.client.generate(1).first == "1");
}

BOOST_AUTO_TEST_CASE(generation_continues_while_20_updates_alternate_and_every_image_matches_its_version) {
  const std::vector<uint64_t> seeds = {11, 12};
  std::map<std::string, std::map<uint64_t, std::vector<uint8_t>>> reference;
  for (const auto& [version, path] : {std::pair{std::string("A"), ckpts().a}, std::pair{std::string("B"), ckpts().b}}) {
    engine ref(path);
    for (uint64_t s : seeds) reference[version][s] = ref.client.generate(s).second;
  }
  BOOST_REQUIRE(reference["A"][11] != reference["B"][11]);

  engine e(ckpts().a, 2);
  BOOST_TEST((e.client.generate(11).second == reference["A"][11]));
  std::atomic<bool> stop{false};
  std::mutex results_mutex;
  std::condition_variable progressed;
  std::vector<std::tuple<uint64_t, std::string, std::vector<uint8_t>>> results;
  std::vector<std::thread> clients;
  for (uint64_t seed : seeds)
    clients.emplace_back([&, seed] {
      engine_client c(e.sys, e.client.scheduler());
      while (!stop.load()) {
        auto [version, png] = c.generate(seed);
        std::lock_guard lock(results_mutex);
        results.emplace_back(seed, version, std::move(png));
        progressed.notify_all();
      }
    });
  std::vector<double> pauses;
  for (int i = 0; i < 20; ++i) {
    const bool to_b = i % 2 == 0;
    msg::update_request req = update_to(to_b ? ckpts().b : ckpts().a);
    req.weight_version = to_b ? "B" : "A";
    req.mode = msg::update_mode::staged;
    auto r = e.client.update(req);
    BOOST_TEST(r.success, r.message);
    pauses.push_back(r.timings["pause"]);
    // Let at least one more image finish on these weights before the next update.
    std::unique_lock lock(results_mutex);
    const size_t seen = results.size();
    progressed.wait(lock, [&] { return results.size() > seen; });
  }
  stop = true;
  for (auto& t : clients) t.join();

  std::map<std::string, int> per_version;
  for (const auto& [seed, version, png] : results) {
    BOOST_TEST(version.rfind("error", 0) != 0u, version);
    const std::string weights = version == "0" ? "A" : version;
    BOOST_TEST((png == reference[weights][seed]), "seed " << seed << " version " << version);
    ++per_version[weights];
  }
  BOOST_TEST(per_version["A"] > 0);
  BOOST_TEST(per_version["B"] > 0);
  std::sort(pauses.begin(), pauses.end());
  BOOST_TEST_MESSAGE("20 staged updates during generation: " << results.size() << " images; generation pause per update median "
                                                             << pauses[pauses.size() / 2] * 1e3 << " ms, max " << pauses.back() * 1e3 << " ms");
  BOOST_TEST(pauses.back() < 0.5);  // a swap of storage, not a load
}

BOOST_AUTO_TEST_CASE(flush_cache_false_keeps_the_cache_and_says_so) {
  engine e(ckpts().a);
  msg::update_request req = update_to(ckpts().b);
  req.flush_cache = false;
  auto r = e.client.update(req);
  BOOST_TEST(r.success, r.message);
  BOOST_TEST(!r.cache_flushed);
  req.flush_cache = true;
  req.model_path = ckpts().a.string();
  r = e.client.update(req);
  BOOST_TEST(r.cache_flushed);
}

BOOST_AUTO_TEST_CASE(in_place_commit_without_room_for_a_snapshot_rolls_back_by_rereading_the_old_checkpoint) {
  engine e(ckpts().a);
  const auto before = e.client.checksums();
  BOOST_REQUIRE(e.client.fault("transformer", 0, {"snapshot", "nomem"}));
  BOOST_REQUIRE(e.client.fault("vae", 0, {"commit", "error"}));
  msg::update_request req = update_to(ckpts().b, {"transformer", "vae"});
  req.mode = msg::update_mode::in_place;
  auto r = e.client.update(req);
  BOOST_TEST(!r.success);
  BOOST_TEST(r.message.find("module 'vae' (worker 0) in phase 'commit'") != std::string::npos, r.message);
  BOOST_TEST(r.message.find("No weights were changed") != std::string::npos, r.message);
  bool reread = false;
  for (const auto& m : r.modules) reread |= m.module == "transformer" && m.path == msg::write_path::reread;
  BOOST_TEST(reread, "the transformer's rollback re-read its previous checkpoint");
  BOOST_TEST(e.client.checksums() == before);
}

BOOST_AUTO_TEST_CASE(enable_teacache_requests_generate_and_report_their_teacache_steps) {
  engine e(ckpts().a);
  caf::scoped_actor self{e.sys};
  msg::generation_request r;
  r.prompts = {"x"};
  r.width = r.height = 32;
  r.steps = 6;
  auto run = [&] {
    msg::generation_result out;
    std::string error;
    self->request(e.client.scheduler(), caf::infinite, msg::generate_atom::value, r)
        .receive([&](msg::generation_result& g) { out = std::move(g); }, [&](caf::error& err) { error = msg::describe(err); });
    BOOST_REQUIRE_MESSAGE(error.empty(), error);
    return out;
  };
  const auto plain = run();
  r.enable_teacache = true;
  const auto cached = run();
  BOOST_TEST(plain.teacache_calls == 0u);
  BOOST_TEST(cached.teacache_calls == 6u);  // distilled: one branch, one call per step
  BOOST_TEST(cached.teacache_skipped <= 4u);  // the first and last steps always compute
  // Without a skipped step the image is the uncached one, byte for byte (with skips, the tiny model's
  // 8-bit images may still round alike: test_teacache compares the float outputs).
  if (cached.teacache_skipped == 0u) BOOST_TEST((cached.images.at(0) == plain.images.at(0)));
  BOOST_TEST_MESSAGE("TeaCache (FLUX.1 coefficients, threshold 0.25) on 6 steps: skipped " << cached.teacache_skipped);
}

// The actor port publishes only the client gateway: it forwards the client API to the scheduler and
// refuses the internal control messages (pause, fault injection) that the scheduler itself accepts.
BOOST_AUTO_TEST_CASE(the_client_gateway_forwards_the_client_api_and_refuses_control_messages) {
  engine e(ckpts().a);
  auto gateway = actors::spawn_client_gateway(e.sys, e.client.scheduler());
  caf::scoped_actor self{e.sys};
  msg::model_info info;
  self->request(gateway, std::chrono::seconds(30), msg::info_atom::value)
      .receive([&](msg::model_info& i) { info = std::move(i); }, [&](caf::error& err) { BOOST_FAIL(msg::describe(err)); });
  BOOST_TEST(info.modules.size() == 3u);
  // What a remote peer could put on the wire, bypassing the typed handle.
  const auto untyped = caf::actor_cast<caf::actor>(gateway);
  for (auto attempt : {caf::make_message(msg::pause_atom::value, true),
                       caf::make_message(msg::fault_atom::value, std::string("vae"), int32_t{0}, msg::fault_spec{"commit", "error"})}) {
    caf::error refused;
    self->request(untyped, std::chrono::seconds(30), std::move(attempt))
        .receive([&](caf::message&) { BOOST_FAIL("the gateway answered a control message"); }, [&](caf::error& err) { refused = err; });
    BOOST_TEST((refused == caf::sec::unexpected_message), caf::to_string(refused));
  }
  // Generation still runs (a pause would hold it back) and an update still succeeds (no fault armed).
  BOOST_TEST(e.client.generate(3).first == "0");
  auto r = e.client.update(update_to(ckpts().a));
  BOOST_TEST(r.success, r.message);
  caf::anon_send_exit(gateway, caf::exit_reason::user_shutdown);
}
