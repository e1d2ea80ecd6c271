// Shared by the engine tests: tiny checkpoints made with make-model, an actor system, and blocking
// helpers around the scheduler's typed interface.
#pragma once

#include <caf/all.hpp>

#include <cstdlib>
#include <filesystem>
#include <map>
#include <string>

#include "actors/engine.hpp"
#include "messages/protocol.hpp"
#include "pipeline/make_model.hpp"
#include "pipeline/weights/checksum.hpp"
#include "pipeline/weights/diffusers_layout.hpp"
#include "tests/unit/temp_dir.hpp"

namespace refit::test {

struct engine_system_config : caf::actor_system_config {
  engine_system_config() {
    msg::add_types(*this);
    set("scheduler.max-threads", 4);
  }
};

// The device the engine tests run on: REFIT_TEST_DEVICE (e.g. cuda on the GPU machine), else cpu.
inline std::string test_device() {
  const char* d = std::getenv("REFIT_TEST_DEVICE");
  return d && *d ? d : "cpu";
}

inline std::filesystem::path make_tiny(const std::filesystem::path& dir, uint64_t seed) {
  pipeline::make_model({"flux2-klein-tiny", seed, dir, 2, true, {}});
  return dir;
}

// The checksum `refit checksum --dtype fp32` reports for each module of a checkpoint.
inline std::map<std::string, std::string> disk_checksums(const std::filesystem::path& model) {
  std::map<std::string, std::string> out;
  auto layout = weights::read_model_layout(model);
  weights::checksum_options options;  // refit's format, as the server's default in these tests
  options.float_dtype = weights::dtype::F32;
  options.threads = 2;
  for (const auto& name : layout.weight_bearing_names())
    out[name] = weights::module_checksum(weights::open_module_weights(*layout.find(name)), options);
  return out;
}

// Copies a checkpoint, then replaces one module folder with another checkpoint's.
inline std::filesystem::path mix(const std::filesystem::path& base, const std::filesystem::path& other, const std::string& module,
                                 const std::filesystem::path& out) {
  std::filesystem::copy(base, out, std::filesystem::copy_options::recursive);
  std::filesystem::remove_all(out / module);
  std::filesystem::copy(other / module, out / module, std::filesystem::copy_options::recursive);
  return out;
}

// Blocking requests to one module actor: a phase's report or the error text, the checksum, the info.
template <class... Ts>
std::pair<msg::module_report, std::string> ask_module(caf::scoped_actor& self, const msg::module_actor& module, Ts... xs) {
  std::pair<msg::module_report, std::string> out;
  self->request(module, caf::infinite, xs...).receive([&](msg::module_report& r) { out.first = r; },
                                                      [&](caf::error& e) { out.second = msg::describe(e); });
  return out;
}
inline std::string module_checksum(caf::scoped_actor& self, const msg::module_actor& module,
                                   msg::checksum_format format = msg::checksum_format::refit) {
  std::string out;
  self->request(module, caf::infinite, msg::checksum_atom::value, format).receive([&](std::string& s) { out = s; }, [&](caf::error&) {});
  return out;
}
inline msg::module_info module_info_of(caf::scoped_actor& self, const msg::module_actor& module) {
  msg::module_info out;
  self->request(module, caf::infinite, msg::info_atom::value).receive([&](msg::module_info& i) { out = i; }, [&](caf::error&) {});
  return out;
}

// The update mode a test names: auto, staged, in_place.
inline msg::update_mode mode_of(std::string_view name) {
  const auto m = msg::parse_update_mode(name);
  if (!m) throw std::invalid_argument("no update mode '" + std::string(name) + "'");
  return *m;
}

// A module's folder of a checkpoint, as a weight source for a module actor.
inline msg::weight_source checkpoint(const std::filesystem::path& module_dir) { return {msg::source_kind::checkpoint, module_dir.string(), 0, {}, {}, false, -1, {}}; }

// An update request to `path` (targets: empty for every module).
inline msg::update_request update_to(const std::filesystem::path& path, std::vector<std::string> targets = {},
                                     std::string_view mode = "auto") {
  msg::update_request r;
  r.model_path = path.string();
  r.target_modules = std::move(targets);
  r.mode = mode_of(mode);
  return r;
}

// `base` with `other`'s transformer and a VAE shard truncated by 2 bytes: an update to it must fail in
// validation (naming the VAE) and change nothing, although its transformer alone would load.
inline std::filesystem::path make_corrupt(const std::filesystem::path& base, const std::filesystem::path& other,
                                          const std::filesystem::path& out) {
  mix(base, other, "transformer", out);
  const std::filesystem::path vae = out / "vae" / "diffusion_pytorch_model.safetensors";
  std::filesystem::resize_file(vae, std::filesystem::file_size(vae) - 2);
  return out;
}

class engine_client {
 public:
  engine_client(caf::actor_system& sys, msg::scheduler_actor scheduler) : self_(sys), scheduler_(std::move(scheduler)) {}

  msg::update_result update(msg::update_request req) {
    msg::update_result out;
    self_->request(scheduler_, caf::infinite, msg::update_atom::value, std::move(req))
        .receive([&](msg::update_result& r) { out = std::move(r); },
                 [&](caf::error& e) { out.message = "transport error: " + msg::describe(e); });
    return out;
  }
  // refit's format, as disk_checksums computes it; tests of SGLang's format ask for it.
  std::map<std::string, std::string> checksums(int32_t worker = 0, msg::checksum_format format = msg::checksum_format::refit) {
    std::map<std::string, std::string> out;
    self_->request(scheduler_, caf::infinite, msg::checksum_atom::value, msg::checksum_request{{}, worker, format})
        .receive([&](std::map<std::string, std::string>& m) { out = std::move(m); },
                 [&](caf::error& e) { out["error"] = msg::describe(e); });
    return out;
  }
  // The first image's PNG bytes, or the error text prefixed with "error: ".
  std::pair<std::string, std::vector<uint8_t>> generate(uint64_t seed, int64_t steps = 2, int64_t size = 32) {
    msg::generation_request r;
    r.prompts = {"a red fox"};
    r.seed = seed;
    r.steps = steps;
    r.width = r.height = size;
    std::pair<std::string, std::vector<uint8_t>> out;
    self_->request(scheduler_, caf::infinite, msg::generate_atom::value, r)
        .receive([&](msg::generation_result& g) { out = {g.weight_version, g.images.at(0)}; },
                 [&](caf::error& e) { out = {"error: " + msg::describe(e), {}}; });
    return out;
  }
  msg::model_info info() {
    msg::model_info out;
    self_->request(scheduler_, caf::infinite, msg::info_atom::value).receive([&](msg::model_info& i) { out = std::move(i); },
                                                                            [&](caf::error&) {});
    return out;
  }
  bool fault(const std::string& module, int32_t worker, msg::fault_spec f) {
    bool ok = false;
    self_->request(scheduler_, caf::infinite, msg::fault_atom::value, module, worker, f)
        .receive([&](bool b) { ok = b; }, [&](caf::error&) { ok = false; });
    return ok;
  }
  const msg::scheduler_actor& scheduler() const { return scheduler_; }

 private:
  caf::scoped_actor self_;
  msg::scheduler_actor scheduler_;
};

// A whole engine on `model` (scheduler, workers on the test device, fp32), shut down with the object.
struct engine {
  engine_system_config cfg;
  caf::actor_system sys{cfg};
  engine_client client;
  explicit engine(const std::filesystem::path& model, size_t workers = 1, bool offload = false, double prefetch = 1)
      : client(sys, actors::spawn_engine(sys, {model, std::vector<std::string>(workers, test_device()), "fp32", offload, prefetch})) {}
  ~engine() { caf::anon_send_exit(client.scheduler(), caf::exit_reason::user_shutdown); }
};

}  // namespace refit::test
