// TeaCache for the FLUX.2 DiT (tiny checkpoints, CPU, fp32): the skip rule, exactness when nothing is
// skipped, one state per CFG branch, and that a weight update leaves no state of the old weights.
#define BOOST_TEST_MODULE teacache
#include <boost/test/unit_test.hpp>

#include <ATen/ATen.h>
#include <c10/core/InferenceMode.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <fstream>

#include "actors/cache_actor.hpp"
#include "actors/worker_actor.hpp"
#include "pipeline/flux2_klein.hpp"
#include "pipeline/models/flux2_transformer.hpp"
#include "tests/unit/engine_fixture.hpp"

using namespace refit;
using namespace refit::test;
namespace fs = std::filesystem;

namespace {

// A checkpoint whose transformer folder carries a teacache.json with `threshold` (and FLUX.1 coefficients).
fs::path with_teacache_json(const fs::path& base, const fs::path& out, double threshold) {
  fs::copy(base, out, fs::copy_options::recursive);
  std::ofstream(out / "transformer" / "teacache.json") << "{\"threshold\": " << threshold << "}\n";
  return out;
}

struct checkpoints {
  temp_dir dir;
  fs::path a, b, base, a_tc, b_tc;
  checkpoints() {
    a = make_tiny(dir.path() / "a", 1);
    b = make_tiny(dir.path() / "b", 2);
    base = dir.path() / "base";
    pipeline::make_model({"flux2-klein-tiny", 3, base, 2, false, {}});  // undistilled: sampled with CFG
    a_tc = with_teacache_json(a, dir.path() / "a_tc", 0.6);
    b_tc = with_teacache_json(b, dir.path() / "b_tc", 0.6);
  }
};

checkpoints& ckpts() {
  static checkpoints c;
  return c;
}

std::unique_ptr<pipeline::flux2_klein_pipeline> load(const fs::path& model) {
  auto p = std::make_unique<pipeline::flux2_klein_pipeline>(model, models::placement{});
  p->load_weights();
  return p;
}

pipeline::generation_params params(int64_t steps, std::optional<double> threshold) {
  pipeline::generation_params p;
  p.prompts = {"a red fox"};
  p.negative_prompt = "blurry";
  p.width = p.height = 32;
  p.steps = steps;
  p.seed = 7;
  p.teacache = {threshold.has_value(), threshold};
  return p;
}

// The sampler's float output in [0, 1] before 8-bit rounding, which can hide a tiny model's differences.
at::Tensor sample(const pipeline::flux2_klein_pipeline& pipe, int64_t steps, std::optional<double> threshold,
                  pipeline::generation_stats* stats = nullptr) {
  c10::InferenceMode inference;
  const at::Tensor embeds = pipe.encode_prompts({"a red fox"});
  const at::Tensor noise = pipe.initial_noise(1, 32, 32, 7);
  return pipe.sample(noise, embeds, std::nullopt, steps, 4.0, nullptr, {threshold.has_value(), threshold}, stats);
}

// The TeaCache4FLUX rule, written out again from the reference, applied to the recorded distances.
std::vector<bool> expected_skips(const std::vector<double>& rel_l1, double threshold) {
  const sampling::teacache_config flux1;  // FLUX.1-dev coefficients
  std::vector<bool> skips;
  double acc = 0;
  const size_t n = rel_l1.size();
  for (size_t i = 0; i < n; ++i) {
    bool skip = false;
    if (i == 0 || i == n - 1) {
      acc = 0;
    } else {
      const double x = rel_l1[i];
      acc += flux1.coefficients[0] * std::pow(x, 4) + flux1.coefficients[1] * std::pow(x, 3) + flux1.coefficients[2] * x * x +
             flux1.coefficients[3] * x + flux1.coefficients[4];
      skip = acc < threshold;
      if (!skip) acc = 0;
    }
    skips.push_back(skip);
  }
  return skips;
}

std::string pattern(const std::vector<bool>& skips) {
  std::string s;
  for (bool k : skips) s += k ? 'S' : 'C';
  return s;
}

}  // namespace

BOOST_AUTO_TEST_CASE(without_a_teacache_json_the_flux1_coefficients_apply) {
  auto pipe = load(ckpts().a);
  BOOST_TEST((pipe->teacache_config().coefficients == sampling::teacache_config{}.coefficients));
  BOOST_TEST(pipe->teacache_config().threshold == 0.25);
  auto configured = load(ckpts().a_tc);
  BOOST_TEST(configured->teacache_config().threshold == 0.6);
}

BOOST_AUTO_TEST_CASE(a_malformed_teacache_json_is_refused_naming_the_file) {
  temp_dir d;
  const fs::path m = with_teacache_json(ckpts().a, d.path() / "m", 0.1);
  std::ofstream(m / "transformer" / "teacache.json") << R"({"coefficients": ["x"]})";
  try {
    load(m);
    BOOST_FAIL("accepted a teacache.json with non-numeric coefficients");
  } catch (const std::runtime_error& e) {
    BOOST_TEST(std::string(e.what()).find("teacache.json: 'coefficients' must be") != std::string::npos, e.what());
  }
}

BOOST_AUTO_TEST_CASE(threshold_zero_gives_byte_identical_images_to_no_cache) {
  auto pipe = load(ckpts().a);
  pipeline::generation_stats stats;
  const auto plain = pipe->generate(params(8, std::nullopt));
  const auto cached = pipe->generate(params(8, 0.0), &stats);
  BOOST_REQUIRE(stats.teacache.size() == 1u);
  BOOST_TEST(stats.teacache[0].skipped.size() == 8u);
  BOOST_TEST(stats.blocks_skipped == 0);
  BOOST_TEST(std::isnan(stats.teacache[0].rel_l1[0]));
  for (size_t i = 1; i < 8; ++i) BOOST_TEST(stats.teacache[0].rel_l1[i] > 0.0);
  BOOST_TEST((cached.at(0).pixels == plain.at(0).pixels));
}

BOOST_AUTO_TEST_CASE(a_skipping_threshold_skips_exactly_the_steps_the_rule_says) {
  auto pipe = load(ckpts().a);
  const int64_t steps = 20;
  auto timed = [&](std::optional<double> threshold, pipeline::generation_stats* stats) {
    auto t0 = std::chrono::steady_clock::now();
    at::Tensor image = sample(*pipe, steps, threshold, stats);
    return std::pair{image, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count()};
  };
  timed(std::nullopt, nullptr);  // warm-up
  const auto [plain, plain_s] = timed(std::nullopt, nullptr);
  for (double threshold : {0.0, 0.25, 0.6, 1.0}) {
    pipeline::generation_stats stats;
    const auto [cached, cached_s] = timed(threshold, &stats);
    BOOST_REQUIRE(stats.teacache.size() == 1u);
    const auto& trace = stats.teacache[0];
    BOOST_TEST(pattern(trace.skipped) == pattern(expected_skips(trace.rel_l1, threshold)), "threshold " << threshold);
    BOOST_TEST(!trace.skipped.front());
    BOOST_TEST(!trace.skipped.back());
    // Bit-identical to no cache exactly when nothing was skipped.
    BOOST_TEST(at::equal(cached, plain) == (stats.blocks_skipped == 0), "threshold " << threshold);
    BOOST_TEST_MESSAGE("threshold " << threshold << ": " << pattern(trace.skipped) << " (" << stats.blocks_skipped << " of " << steps
                                    << " skipped), max |diff| " << (cached - plain).abs().max().item<double>() << ", " << cached_s
                                    << " s vs " << plain_s << " s without TeaCache");
    if (threshold >= 0.6) BOOST_TEST(stats.blocks_skipped > 0);
  }
  // Every interior step's rescaled distance is below 100, so all of them are skipped.
  pipeline::generation_stats all;
  sample(*pipe, steps, 100.0, &all);
  BOOST_TEST(all.blocks_skipped == steps - 2);
  // With two steps both are boundaries: nothing is skipped, whatever the threshold.
  pipeline::generation_stats two;
  const at::Tensor short_run = sample(*pipe, 2, 100.0, &two);
  BOOST_TEST(two.blocks_skipped == 0);
  BOOST_TEST(at::equal(short_run, sample(*pipe, 2, std::nullopt)));
}

BOOST_AUTO_TEST_CASE(each_cfg_branch_keeps_its_own_state) {
  auto pipe = load(ckpts().base);
  BOOST_REQUIRE(!pipe->is_distilled());
  pipeline::generation_stats stats;
  auto p = params(12, 0.6);
  pipe->generate(p, &stats);
  BOOST_REQUIRE(stats.teacache.size() == 2u);
  BOOST_TEST(stats.dit_calls == 24);
  BOOST_TEST((stats.teacache[0].rel_l1 != stats.teacache[1].rel_l1));  // the branches see different text
  for (const auto& trace : stats.teacache)
    BOOST_TEST(pattern(trace.skipped) == pattern(expected_skips(trace.rel_l1, 0.6)));
  auto skipped = [](const pipeline::teacache_trace& t) { return std::count(t.skipped.begin(), t.skipped.end(), true); };
  BOOST_TEST(stats.blocks_skipped == skipped(stats.teacache[0]) + skipped(stats.teacache[1]));
}

BOOST_AUTO_TEST_CASE(the_worker_reports_teacache_steps_to_its_cache_actor) {
  engine_system_config cfg;
  caf::actor_system sys{cfg};
  caf::scoped_actor self{sys};
  auto cache = actors::spawn_cache_actor(sys, 0);
  std::shared_ptr<pipeline::diffusion_pipeline> pipe = load(ckpts().a_tc);
  auto worker = actors::spawn_worker(sys, {0, pipe, cache, std::make_shared<std::atomic<bool>>(false)});
  msg::generation_request r;
  r.prompts = {"a red fox"};
  r.width = r.height = 32;
  r.steps = 10;
  r.enable_teacache = true;
  msg::generation_result g;
  self->request(worker, caf::infinite, msg::generate_atom::value, r)
      .receive([&](msg::generation_result& out) { g = std::move(out); }, [&](caf::error& e) { BOOST_FAIL(msg::describe(e)); });
  BOOST_TEST(g.teacache_calls == 10u);
  BOOST_TEST(g.teacache_skipped > 0u);  // threshold 0.6 from a_tc's teacache.json
  msg::teacache_counters c;
  // The counters are sent before the reply, and this request is queued behind them.
  self->request(cache, caf::infinite, msg::stats_atom::value).receive([&](msg::teacache_counters& k) { c = k; }, [&](caf::error&) {});
  BOOST_TEST(c.requests == 1u);
  BOOST_TEST(c.steps_computed == g.teacache_calls - g.teacache_skipped);
  BOOST_TEST(c.steps_skipped == g.teacache_skipped);
  for (const caf::actor_addr& a : {worker.address(), cache.address()})
    caf::anon_send_exit(a, caf::exit_reason::user_shutdown);
}

BOOST_AUTO_TEST_CASE(after_a_weight_update_no_teacache_state_of_the_old_weights_is_used) {
  engine_system_config cfg;
  caf::actor_system sys{cfg};
  caf::scoped_actor self{sys};
  auto generate = [&](const msg::scheduler_actor& s) {
    msg::generation_request r;
    r.prompts = {"a red fox"};
    r.width = r.height = 32;
    r.steps = 10;
    r.seed = 11;
    r.enable_teacache = true;
    msg::generation_result g;
    self->request(s, caf::infinite, msg::generate_atom::value, r)
        .receive([&](msg::generation_result& out) { g = std::move(out); }, [&](caf::error& e) { BOOST_FAIL(msg::describe(e)); });
    return g;
  };
  engine_client e(sys, actors::spawn_engine(sys, {ckpts().a_tc, {"cpu"}, "fp32"}));
  const auto before = generate(e.scheduler());
  BOOST_TEST(before.teacache_skipped > 0u);
  msg::update_request req;
  req.model_path = ckpts().b_tc.string();
  auto u = e.update(req);
  BOOST_REQUIRE_MESSAGE(u.success, u.message);
  BOOST_TEST(u.cache_flushed);
  const auto after = generate(e.scheduler());
  // A server that never saw the old weights makes the same image with the same TeaCache decisions:
  // nothing of the first request's state (residuals, distances, step phase) reached the second.
  engine_client fresh(sys, actors::spawn_engine(sys, {ckpts().b_tc, {"cpu"}, "fp32"}));
  const auto reference = generate(fresh.scheduler());
  BOOST_TEST(after.weight_version == "1");
  BOOST_TEST(after.teacache_calls == reference.teacache_calls);
  BOOST_TEST(after.teacache_skipped == reference.teacache_skipped);
  BOOST_TEST((after.images.at(0) == reference.images.at(0)));
  BOOST_TEST((after.images.at(0) != before.images.at(0)));
  for (const auto* s : {&e, &fresh}) caf::anon_send_exit(s->scheduler(), caf::exit_reason::user_shutdown);
}
