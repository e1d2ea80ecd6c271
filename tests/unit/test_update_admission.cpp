// The engine's own admission of an update (actors/update_plan.cpp), whichever port it came through: model_path and
// LoRA paths inside the allowed roots, every source carrying them (so files open beneath them), bounded labels, no
// NUL bytes, and check_finite passed on to every source; and the finite check itself (pipeline/update/finite_check).
#define BOOST_TEST_MODULE update_admission
#include <boost/test/unit_test.hpp>

#include <ATen/ATen.h>

#include <filesystem>
#include <fstream>
#include <limits>
#include <span>
#include <string>

#include "actors/update_plan.hpp"
#include "pipeline/update/finite_check.hpp"
#include "pipeline/weights/safetensors.hpp"
#include "tests/unit/temp_dir.hpp"

using namespace refit;
namespace fs = std::filesystem;

namespace {

void write(const fs::path& p, const std::string& text) {
  fs::create_directories(p.parent_path());
  std::ofstream(p, std::ios::binary) << text;
}

void make_ckpt(const fs::path& dir) {
  write(dir / "model_index.json", R"({"_class_name": "X", "transformer": ["diffusers", "T"]})");
  write(dir / "transformer" / "config.json", "{}");
  weights::safetensors_writer w(dir / "transformer" / "diffusion_pytorch_model.safetensors", {{"w", weights::dtype::F32, {1}}});
  const float v = 1;
  w.write("w", std::as_bytes(std::span(&v, 1)));
  w.finish();
}

struct roots_fixture {
  test::temp_dir tmp;
  fs::path root = fs::canonical(tmp.path()) / "root", outside = fs::canonical(tmp.path()) / "outside";
  std::vector<std::string> roots{root.string()};
  roots_fixture() {
    make_ckpt(root / "good");
    make_ckpt(outside / "evil");
    make_ckpt(root / "linked");
    fs::remove_all(root / "linked" / "transformer");
    fs::create_directory_symlink(outside / "evil" / "transformer", root / "linked" / "transformer");
  }
  actors::update_plan plan(const msg::update_request& req) const { return actors::plan_update(req, {"transformer"}, "transformer", 7, roots); }
};

msg::update_request checkpoint(const fs::path& p) {
  msg::update_request r;
  r.model_path = p.string();
  return r;
}

}  // namespace

BOOST_FIXTURE_TEST_CASE(a_checkpoint_inside_the_roots_plans_sources_that_carry_them, roots_fixture) {
  auto req = checkpoint(root / "good");
  req.check_finite = msg::finite_check::on;
  const auto p = plan(req);
  BOOST_TEST_REQUIRE(p.error.empty(), p.error);
  const auto& s = p.sources.at("transformer");
  BOOST_TEST(s.location == (root / "good" / "transformer").string());
  BOOST_TEST(s.roots == roots, boost::test_tools::per_element());
  BOOST_TEST(s.check_finite);
  req.check_finite = msg::finite_check::off;
  BOOST_TEST(!plan(req).sources.at("transformer").check_finite);
  // Without roots (the server was started without --allowed-model-root) nothing is restricted.
  const auto open = actors::plan_update(checkpoint(outside / "evil"), {"transformer"}, "transformer", 7, {});
  BOOST_TEST(open.error.empty(), open.error);
  BOOST_TEST(open.sources.at("transformer").roots.empty());
}

BOOST_FIXTURE_TEST_CASE(a_model_path_outside_the_roots_is_refused_by_the_engine, roots_fixture) {
  for (const fs::path& p : {outside / "evil", root / ".." / "outside" / "evil"}) {
    const auto r = plan(checkpoint(p));
    BOOST_TEST(r.sources.empty());
    BOOST_TEST(r.error.find("model_path '" + p.string() + "' resolves to '" + (outside / "evil").string() +
                            "', which is outside the allowed model roots (" + root.string() + ")") == 0,
               r.error);
  }
  const auto linked = plan(checkpoint(root / "linked"));
  BOOST_TEST(linked.sources.empty());
  BOOST_TEST(linked.error.find("Cannot use model_path: " + (root / "linked" / "transformer").string() +
                               ": resolves outside the allowed model root") == 0,
             linked.error);
}

BOOST_FIXTURE_TEST_CASE(labels_and_paths_are_bounded_for_every_source, roots_fixture) {
  auto req = checkpoint(root / "good");
  req.weight_version = std::string(256, 'v');
  BOOST_TEST(plan(req).error.empty());
  req.weight_version = std::string(257, 'v');
  BOOST_TEST(plan(req).error == "field 'weight_version' is 257 bytes long; at most 256 are allowed");
  req.weight_version = "v1\r\n";
  BOOST_TEST(plan(req).error == "field 'weight_version' holds the byte 0x0d at offset 2; only printable ASCII without '\"' and '\\' is allowed");
  req.weight_version = "v\\1";
  BOOST_TEST(plan(req).error.find("holds the byte 0x5c at offset 1") != std::string::npos);
  req.weight_version.clear();
  req.model_path = (root / "good").string() + std::string(1, '\0') + "x";
  BOOST_TEST(plan(req).error == "field 'model_path' must not contain a NUL byte");

  msg::update_request distributed;
  distributed.source = msg::source_kind::distributed;
  distributed.group_name = "g";
  distributed.tensors = {{"w", "float32", {1}}};
  distributed.weight_version = std::string(300, 'x');
  BOOST_TEST(plan(distributed).error.find("field 'weight_version' is 300 bytes long") == 0);
  distributed.weight_version = "ok";
  distributed.check_finite = msg::finite_check::on;
  const auto d = plan(distributed);
  BOOST_TEST_REQUIRE(d.error.empty(), d.error);
  BOOST_TEST(d.sources.at("transformer").check_finite);
}

BOOST_FIXTURE_TEST_CASE(lora_paths_are_admitted_like_model_paths, roots_fixture) {
  msg::update_request req;
  req.source = msg::source_kind::lora;
  req.adapters = {{"mine", (root / "good" / "transformer").string(), 1.0, 0, false, 0}};
  auto p = plan(req);
  BOOST_TEST_REQUIRE(p.error.empty(), p.error);
  BOOST_TEST(p.sources.at("transformer").roots == roots, boost::test_tools::per_element());
  req.adapters[0].path = (outside / "evil" / "transformer").string();
  BOOST_TEST(plan(req).error.find("lora_path '" + req.adapters[0].path + "' resolves to") == 0, plan(req).error);
  req.adapters[0] = {"bad\nname", (root / "good").string(), 1.0, 0, false, 0};
  BOOST_TEST(plan(req).error.find("field 'lora_nickname' holds the byte 0x0a") == 0, plan(req).error);
}

BOOST_AUTO_TEST_CASE(the_finite_check_finds_the_first_nan_or_infinity) {
  std::vector<at::Tensor> ts{at::ones({4, 3}), at::arange(10, at::kLong), at::ones({5}, at::kBFloat16), at::empty({0}),
                             at::ones({2, 2}, at::kHalf)};
  BOOST_TEST(!update::first_non_finite(ts));
  ts[2][3] = std::numeric_limits<float>::infinity();
  BOOST_TEST(update::first_non_finite(ts).value_or(99) == 2u);
  ts[0][1][2] = std::numeric_limits<float>::quiet_NaN();
  BOOST_TEST(update::first_non_finite(ts).value_or(99) == 0u);
  ts[0] = at::ones({4, 3}).t();  // not contiguous
  ts[2] = at::ones({5}, at::kBFloat16);
  ts[4][1][1] = -std::numeric_limits<float>::infinity();
  BOOST_TEST(update::first_non_finite(ts).value_or(99) == 4u);
}
