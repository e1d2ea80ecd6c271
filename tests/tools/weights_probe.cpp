// Test helper: exposes the weight store's reader, writer and host loader to the Python oracle tests.
//   weights_probe dump FILE                      JSON: metadata and, per tensor, dtype, shape, sha256 of its bytes
//   weights_probe copy IN OUT                    rewrite every tensor of IN (and its metadata) with refit's writer
//   weights_probe host MODULE_DIR DTYPE|none MODE JSON: per tensor, dtype and sha256 of the host tensor after loading;
//                                                MODE copy, mapped, or reuse (read twice into the same tensors)
#include <ATen/ATen.h>
#include <nlohmann/json.hpp>

#include <cstdio>
#include <cstring>
#include <iostream>

#include "pipeline/weights/checksum.hpp"
#include "pipeline/weights/diffusers_layout.hpp"
#include "pipeline/weights/host_loader.hpp"
#include "pipeline/weights/safetensors.hpp"

using namespace refit::weights;
using json = nlohmann::json;

namespace {

std::string hex_digest(std::span<const std::byte> bytes) {
  sha256 h;
  h.update(bytes);
  auto d = h.finish();
  return to_hex(d);
}

int dump(const char* path) {
  auto f = safetensors_file::open(path);
  json out = {{"metadata", f.header().metadata}, {"tensors", json::object()}};
  for (const auto& t : f.header().tensors)
    out["tensors"][t.name] = {{"dtype", dtype_name(t.type)}, {"shape", t.shape}, {"sha256", hex_digest(f.bytes(t))}};
  std::cout << out.dump() << "\n";
  return 0;
}

int copy(const char* in, const char* out) {
  auto f = safetensors_file::open(in);
  std::vector<tensor_spec> specs;
  for (const auto& t : f.header().tensors) specs.push_back({t.name, t.type, t.shape});
  safetensors_writer w(out, specs, f.header().metadata);
  for (const auto& t : f.header().tensors) w.write(t.name, f.bytes(t));
  w.finish();
  return 0;
}

int host(const char* dir, const char* dtype_spelling, const std::string& mode) {
  host_load_options opts;
  opts.chunk_bytes = 1000;  // many chunks per tensor, so chunk seams are exercised
  if (mode == "mapped") opts.storage = host_load_options::backing::mapped;
  if (std::strcmp(dtype_spelling, "none") != 0) {
    opts.float_dtype = parse_target_dtype(dtype_spelling);
    if (!opts.float_dtype) throw std::invalid_argument("bad dtype");
  }
  auto w = open_module_dir("module", dir);
  json out = json::object();
  auto loaded = load_to_host(w, opts);
  if (mode == "reuse") {
    for (auto& [name, t] : loaded) t.zero_();
    read_into(w, loaded, opts);
  }
  for (auto& [name, t] : loaded) {
    auto* p = static_cast<const std::byte*>(t.data_ptr());
    out[name] = {{"dtype", std::string(c10::toString(t.scalar_type()))},
                 {"shape", t.sizes().vec()},
                 {"sha256", hex_digest({p, t.nbytes()})}};
  }
  std::cout << out.dump() << "\n";
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    if (argc == 3 && !std::strcmp(argv[1], "dump")) return dump(argv[2]);
    if (argc == 4 && !std::strcmp(argv[1], "copy")) return copy(argv[2], argv[3]);
    if (argc == 5 && !std::strcmp(argv[1], "host")) return host(argv[2], argv[3], argv[4]);
  } catch (const weight_error& e) {
    std::fprintf(stderr, "%s [%s]\n", e.what(), std::string(to_string(e.code())).c_str());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 1;
  }
  std::fprintf(stderr, "usage: weights_probe dump FILE | copy IN OUT | host MODULE_DIR bf16|fp16|fp32|none copy|mapped|reuse\n");
  return 2;
}
