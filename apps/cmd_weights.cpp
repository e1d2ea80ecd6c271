// `refit inspect` and `refit checksum`: the weight store from the command line.
#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <map>
#include <set>

#include "apps/commands.hpp"
#include "pipeline/models/tensor_registry.hpp"
#include "pipeline/pipeline.hpp"
#include "pipeline/weights/checksum.hpp"
#include "pipeline/weights/diffusers_layout.hpp"

namespace refit::apps {

namespace fs = std::filesystem;
using json = nlohmann::json;
using namespace refit::weights;

namespace {

std::string human_bytes(uint64_t b) {
  char buf[32];
  if (b >= 1'000'000'000ull) std::snprintf(buf, sizeof buf, "%.2f GB", b / 1e9);
  else if (b >= 1'000'000ull) std::snprintf(buf, sizeof buf, "%.2f MB", b / 1e6);
  else if (b >= 1'000ull) std::snprintf(buf, sizeof buf, "%.2f kB", b / 1e3);
  else std::snprintf(buf, sizeof buf, "%llu B", static_cast<unsigned long long>(b));
  return buf;
}

// A model directory is a Diffusers pipeline (model_index.json) or a single component folder.
model_layout open_layout(const fs::path& dir) {
  if (fs::is_regular_file(dir / "model_index.json") || !fs::is_directory(dir)) return read_model_layout(dir);
  model_layout m;
  m.root = dir;
  module_weights probe = open_module_dir(dir.filename().string(), dir);  // validates, or throws
  component_info c;
  c.name = probe.module;
  c.dir = dir;
  c.weight_bearing = true;
  for (const auto& s : probe.shards) c.weight_files.push_back(s.path());
  if (fs::exists(dir / "config.json")) {
    std::ifstream in(dir / "config.json");
    json cfg = json::parse(in, nullptr, false);
    if (cfg.is_object() && cfg.contains("_class_name") && cfg["_class_name"].is_string())
      c.class_name = cfg["_class_name"].get<std::string>();
  }
  m.components.push_back(std::move(c));
  return m;
}

std::vector<const component_info*> select_modules(const model_layout& m, const std::vector<std::string>& names) {
  std::vector<const component_info*> out;
  if (names.empty()) {
    for (const auto& c : m.components)
      if (c.weight_bearing) out.push_back(&c);
    if (out.empty()) throw weight_error(weight_errc::no_weights, m.root.string() + ": no component has weights");
    return out;
  }
  for (const auto& n : names) {
    const component_info* c = m.find(n);
    if (!c) {
      std::string known;
      for (const auto& k : m.weight_bearing_names()) known += (known.empty() ? "" : ", ") + k;
      throw weight_error(weight_errc::unknown_module,
                         "module '" + n + "' not found in " + m.root.string() + " (modules with weights: " + known + ")");
    }
    if (!c->weight_bearing)
      throw weight_error(weight_errc::no_weights, "module '" + n + "' in " + m.root.string() + " has no weights");
    out.push_back(c);
  }
  return out;
}

int run_inspect(const fs::path& dir, bool as_json, bool list_tensors) {
  model_layout m = open_layout(dir);
  json out = {{"model_path", m.root.string()}, {"pipeline_class", m.pipeline_class}, {"components", json::array()}};
  if (!as_json) std::printf("model %s%s\n", m.root.c_str(), m.pipeline_class.empty() ? "" : (" (" + m.pipeline_class + ")").c_str());
  for (const auto& c : m.components) {
    json jc = {{"name", c.name}, {"library", c.library}, {"class", c.class_name}, {"weight_bearing", c.weight_bearing}};
    if (!c.weight_bearing) {
      if (!as_json) std::printf("  %-14s %-13s %-34s no weights\n", c.name.c_str(), c.library.c_str(), c.class_name.c_str());
      out["components"].push_back(jc);
      continue;
    }
    module_weights w = open_module_weights(c);
    std::map<std::string, uint64_t> dtypes;
    json tensors = json::array();
    for (const auto& [name, loc] : w.tensors) {
      ++dtypes[std::string(dtype_name(loc.entry->type))];
      if (list_tensors)
        tensors.push_back({{"name", name}, {"dtype", dtype_name(loc.entry->type)}, {"shape", loc.entry->shape},
                           {"bytes", loc.entry->nbytes()}, {"file", w.shards[loc.shard].path().filename().string()}});
    }
    json files = json::array();
    for (const auto& s : w.shards) files.push_back(s.path().filename().string());
    jc.update({{"dir", w.dir.string()}, {"files", files}, {"tensors", w.tensors.size()}, {"bytes", w.total_bytes}, {"dtypes", dtypes}});
    if (list_tensors) jc["tensor_list"] = tensors;
    out["components"].push_back(jc);
    if (!as_json) {
      std::string dt;
      for (const auto& [k, v] : dtypes) dt += (dt.empty() ? "" : " ") + k + "x" + std::to_string(v);
      std::printf("  %-14s %-13s %-34s %6zu tensors %11s  %s  [%zu file%s]\n", c.name.c_str(), c.library.c_str(),
                  c.class_name.c_str(), w.tensors.size(), human_bytes(w.total_bytes).c_str(), dt.c_str(),
                  w.shards.size(), w.shards.size() == 1 ? "" : "s");
      if (list_tensors)
        for (const auto& t : tensors)
          std::printf("      %-60s %-8s %-22s %12llu  %s\n", t["name"].get<std::string>().c_str(),
                      t["dtype"].get<std::string>().c_str(), t["shape"].dump().c_str(),
                      static_cast<unsigned long long>(t["bytes"].get<uint64_t>()), t["file"].get<std::string>().c_str());
    }
  }
  if (as_json) std::printf("%s\n", out.dump(2).c_str());
  return 0;
}

// Which tensors of each module are buffers (SGLang's checksum covers parameters only), from the pipeline
// family the checkpoint belongs to: `dir` itself, or the pipeline folder a component folder sits in.
// Empty when no family refit serves can be built from it; every tensor is then hashed.
std::map<std::string, std::set<std::string>> buffers_by_module(const fs::path& dir, const model_layout& m) {
  const fs::path root = fs::is_regular_file(dir / "model_index.json") ? dir : dir.parent_path();
  std::map<std::string, std::set<std::string>> out;
  try {
    auto family = pipeline::open_pipeline(root, models::placement{});
    for (const auto& module : family->module_names())
      for (const auto& slot : family->registry(module).slots())
        if (slot.is_buffer) out[module].insert(slot.name);
  } catch (const std::exception& e) {
    spdlog::warn("checksum: {} is not a pipeline refit can build ({}); SGLang's formula covers parameters only, but which tensors "
                 "are buffers is not known here: every tensor is hashed",
                 m.root.string(), e.what());
  }
  return out;
}

int run_checksum(const fs::path& dir, const std::vector<std::string>& modules, const std::string& dtype_flag,
                 const std::string& format_flag, bool as_json, unsigned threads) {
  checksum_options opts;
  opts.threads = threads;
  if (!dtype_flag.empty()) {
    opts.float_dtype = parse_target_dtype(dtype_flag);
    if (!opts.float_dtype) throw std::invalid_argument("--dtype must be bf16, fp16 or fp32, got '" + dtype_flag + "'");
  }
  const auto format = parse_checksum_format(format_flag);
  if (!format) throw std::invalid_argument("--format must be sglang or refit, got '" + format_flag + "'");
  opts.format = *format;
  model_layout m = open_layout(dir);
  const auto buffers = opts.format == checksum_format::sglang ? buffers_by_module(dir, m) : std::map<std::string, std::set<std::string>>{};
  json out = json::object();
  for (const component_info* c : select_modules(m, modules)) {
    auto t0 = std::chrono::steady_clock::now();
    module_weights w = open_module_weights(*c);
    auto it = buffers.find(c->name);
    opts.exclude = it == buffers.end() ? std::set<std::string>{} : it->second;
    std::string hex = module_checksum(w, opts);
    double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    spdlog::info("checksum {} ({} format): {} tensors{}, {} from {} in {:.3f} s ({:.2f} GB/s)", c->name, checksum_format_name(opts.format),
                 w.tensors.size(), opts.exclude.empty() ? "" : " (" + std::to_string(opts.exclude.size()) + " buffers left out)",
                 human_bytes(w.total_bytes), w.dir.string(), s, s > 0 ? w.total_bytes / s / 1e9 : 0.0);
    out[c->name] = hex;
    if (!as_json) std::printf("%s  %s\n", hex.c_str(), c->name.c_str());
  }
  if (as_json) std::printf("%s\n", out.dump().c_str());
  return 0;
}

}  // namespace

void add_weight_commands(CLI::App& app, command_registry& commands) {
  struct inspect_args {
    std::string dir;
    bool json = false, tensors = false;
  };
  auto ia = std::make_shared<inspect_args>();
  auto* inspect = app.add_subcommand("inspect", "Show a checkpoint's modules, classes, tensor counts, dtypes and bytes; validates every file");
  inspect->add_option("MODEL_DIR", ia->dir, "Diffusers pipeline folder (with model_index.json) or one component folder")->required();
  inspect->add_flag("--json", ia->json, "Print one JSON object instead of a table");
  inspect->add_flag("--tensors", ia->tensors, "List every tensor (name, dtype, shape, bytes, file)");
  commands.emplace_back(inspect, [ia] { return run_inspect(ia->dir, ia->json, ia->tensors); });

  struct checksum_args {
    std::string dir, dtype, format = "sglang";
    std::vector<std::string> modules;
    bool json = false;
    unsigned threads = 0;
  };
  auto ca = std::make_shared<checksum_args>();
  auto* checksum = app.add_subcommand("checksum",
      "SHA-256 module checksums of a checkpoint on disk, as the server reports them after loading it "
      "(definitions: README, 'The checksum')");
  checksum->add_option("MODEL_DIR", ca->dir, "Diffusers pipeline folder or one component folder")->required();
  checksum->add_option("--module", ca->modules, "Module to hash (repeatable; default: every module with weights)")->allow_extra_args(false);
  checksum->add_option("--dtype", ca->dtype, "Hash floating tensors as converted to bf16, fp16 or fp32 (the dtype the server holds)");
  checksum->add_option("--format", ca->format,
                       "sglang: SGLang's compute_weights_checksum over the parameters (buffers left out), what /get_weights_checksum "
                       "reports by default; refit: refit's self-describing formula over every tensor")
      ->capture_default_str();
  checksum->add_flag("--json", ca->json, "Print one JSON object {\"<module>\": \"<hex>\", ...}");
  checksum->add_option("--threads", ca->threads, "Hashing threads (default: all cores)");
  commands.emplace_back(checksum, [ca] { return run_checksum(ca->dir, ca->modules, ca->dtype, ca->format, ca->json, ca->threads); });
}

}  // namespace refit::apps
