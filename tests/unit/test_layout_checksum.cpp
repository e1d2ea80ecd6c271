// The Diffusers layout reader, shard-index validation, dtype conversion and the module checksum.
#define BOOST_TEST_MODULE layout_checksum
#include <boost/test/unit_test.hpp>

#include <chrono>
#include <functional>
#include <map>
#include <cstring>
#include <fstream>

#include "pipeline/weights/checksum.hpp"
#include "pipeline/weights/convert.hpp"
#include "pipeline/weights/diffusers_layout.hpp"
#include "pipeline/weights/hf_cache.hpp"
#include "pipeline/weights/host_loader.hpp"
#include "tests/unit/temp_dir.hpp"

using namespace refit::weights;
namespace fs = std::filesystem;

namespace {

struct named_tensor {
  std::string name;
  dtype type;
  std::vector<int64_t> shape;
  std::vector<std::byte> bytes;
};

named_tensor make_tensor(std::string name, dtype t, std::vector<int64_t> shape, unsigned seed) {
  uint64_t n = dtype_bits(t) / 8;
  for (auto d : shape) n *= d;
  std::vector<std::byte> b(n);
  for (size_t i = 0; i < n; ++i) b[i] = static_cast<std::byte>((i * 37 + seed * 11) & 0x7F);  // finite floats
  return {std::move(name), t, std::move(shape), std::move(b)};
}

void write_file(const fs::path& path, const std::vector<named_tensor>& tensors) {
  std::vector<tensor_spec> specs;
  for (const auto& t : tensors) specs.push_back({t.name, t.type, t.shape});
  safetensors_writer w(path, specs);
  for (const auto& t : tensors) w.write(t.name, t.bytes);
  w.finish();
}

void write_text(const fs::path& path, const std::string& text) {
  std::ofstream(path) << text;
}

std::vector<named_tensor> sample_tensors() {
  return {make_tensor("blocks.0.weight", dtype::BF16, {4, 6}, 1), make_tensor("blocks.0.bias", dtype::F32, {6}, 2),
          make_tensor("blocks.1.weight", dtype::BF16, {4, 6}, 3), make_tensor("norm.num_batches_tracked", dtype::I64, {}, 4)};
}

// Writes `module` into dir/module as two shards plus an index.
void write_sharded(const fs::path& dir, const std::vector<named_tensor>& ts, const std::string& index_override = "") {
  fs::create_directories(dir);
  std::vector<named_tensor> a(ts.begin(), ts.begin() + 2), b(ts.begin() + 2, ts.end());
  write_file(dir / "model-00001-of-00002.safetensors", a);
  write_file(dir / "model-00002-of-00002.safetensors", b);
  std::string map;
  for (size_t i = 0; i < ts.size(); ++i)
    map += (i ? "," : "") + ("\"" + ts[i].name + "\":\"model-0000" + (i < 2 ? "1" : "2") + "-of-00002.safetensors\"");
  write_text(dir / "model.safetensors.index.json",
             index_override.empty() ? "{\"metadata\":{\"total_size\":0},\"weight_map\":{" + map + "}}" : index_override);
}

weight_errc open_error(const fs::path& dir, std::string* msg = nullptr) {
  try {
    open_module_dir("m", dir);
  } catch (const weight_error& e) {
    if (msg) *msg = e.what();
    return e.code();
  }
  BOOST_FAIL("module accepted: " << dir);
  return weight_errc::io_error;
}

// Checksum options in refit's format with these conversion and thread settings.
checksum_options options(std::optional<dtype> float_dtype, unsigned threads) {
  checksum_options o;
  o.float_dtype = float_dtype;
  o.threads = threads;
  return o;
}

}  // namespace

BOOST_AUTO_TEST_CASE(model_index_lists_components_and_finds_their_weights) {
  refit::test::temp_dir tmp;
  const fs::path root = tmp.path() / "model";
  fs::create_directories(root / "scheduler");
  write_text(root / "scheduler/scheduler_config.json", "{}");
  write_sharded(root / "transformer", sample_tensors());
  fs::create_directories(root / "vae");
  write_file(root / "vae/diffusion_pytorch_model.safetensors", {make_tensor("conv.weight", dtype::F32, {2, 2}, 5)});
  write_text(root / "model_index.json",
             R"({"_class_name":"Flux2KleinPipeline","_diffusers_version":"0.36.0","is_distilled":true,)"
             R"("scheduler":["diffusers","FlowMatchEulerDiscreteScheduler"],"transformer":["diffusers","Flux2Transformer2DModel"],)"
             R"("vae":["diffusers","AutoencoderKLFlux2"],"image_encoder":[null,null]})");
  model_layout m = read_model_layout(root);
  BOOST_TEST(m.pipeline_class == "Flux2KleinPipeline");
  BOOST_TEST(m.components.size() == 3u);
  BOOST_TEST(m.weight_bearing_names() == (std::vector<std::string>{"transformer", "vae"}));
  BOOST_TEST(!m.find("scheduler")->weight_bearing);
  BOOST_TEST(m.find("transformer")->weight_files.size() == 2u);
  BOOST_TEST(m.find("transformer")->class_name == "Flux2Transformer2DModel");
  auto w = open_module_weights(*m.find("transformer"));
  BOOST_TEST(w.tensors.size() == 4u);
  BOOST_TEST(w.total_bytes == 48u + 24u + 48u + 8u);

  fs::remove_all(root / "vae");
  try {
    read_model_layout(root);
    BOOST_FAIL("missing component folder accepted");
  } catch (const weight_error& e) {
    BOOST_TEST(e.code() == weight_errc::missing_component);
    BOOST_TEST(std::string(e.what()).find("lists component 'vae'") != std::string::npos);
  }
  write_text(root / "model_index.json", "{not json");
  try {
    read_model_layout(root);
    BOOST_FAIL("broken model_index.json accepted");
  } catch (const weight_error& e) {
    BOOST_TEST(e.code() == weight_errc::bad_model_index);
  }
}

BOOST_AUTO_TEST_CASE(shard_index_must_agree_with_the_shards) {
  refit::test::temp_dir tmp;
  auto ts = sample_tensors();
  std::string msg;

  const fs::path missing = tmp.path() / "missing";
  write_sharded(missing, ts);
  fs::remove(missing / "model-00002-of-00002.safetensors");
  BOOST_TEST(open_error(missing, &msg) == weight_errc::missing_shard);
  BOOST_TEST(msg.find("model-00002-of-00002.safetensors") != std::string::npos);

  const fs::path unlisted = tmp.path() / "unlisted";
  write_sharded(unlisted, ts, R"({"weight_map":{"blocks.0.weight":"model-00001-of-00002.safetensors","blocks.0.bias":"model-00001-of-00002.safetensors","blocks.1.weight":"model-00002-of-00002.safetensors"}})");
  BOOST_TEST(open_error(unlisted, &msg) == weight_errc::shard_mismatch);
  BOOST_TEST(msg.find("tensor 'norm.num_batches_tracked' is in shard model-00002-of-00002.safetensors but missing from weight_map") != std::string::npos);

  const fs::path wrong = tmp.path() / "wrong";
  write_sharded(wrong, ts, R"({"weight_map":{"blocks.0.weight":"model-00002-of-00002.safetensors","blocks.0.bias":"model-00001-of-00002.safetensors","blocks.1.weight":"model-00002-of-00002.safetensors","norm.num_batches_tracked":"model-00002-of-00002.safetensors"}})");
  BOOST_TEST(open_error(wrong, &msg) == weight_errc::shard_mismatch);
  BOOST_TEST(msg.find("weight_map puts tensor 'blocks.0.weight' in model-00002-of-00002.safetensors") != std::string::npos);

  const fs::path phantom = tmp.path() / "phantom";
  write_sharded(phantom, ts, R"({"weight_map":{"blocks.0.weight":"model-00001-of-00002.safetensors","blocks.0.bias":"model-00001-of-00002.safetensors","blocks.1.weight":"model-00002-of-00002.safetensors","norm.num_batches_tracked":"model-00002-of-00002.safetensors","ghost":"model-00002-of-00002.safetensors"}})");
  BOOST_TEST(open_error(phantom, &msg) == weight_errc::shard_mismatch);
  BOOST_TEST(msg.find("lists tensor 'ghost'") != std::string::npos);

  const fs::path twice = tmp.path() / "twice";
  write_sharded(twice, ts);
  write_file(twice / "model-00002-of-00002.safetensors", {ts[2], ts[3], ts[0]});
  BOOST_TEST(open_error(twice, &msg) == weight_errc::tensor_in_two_shards);
  BOOST_TEST(msg.find("tensor 'blocks.0.weight' is stored in both") != std::string::npos);

  const fs::path escape = tmp.path() / "escape";
  write_sharded(escape, ts, R"({"weight_map":{"blocks.0.weight":"../missing/model-00001-of-00002.safetensors"}})");
  BOOST_TEST(open_error(escape, &msg) == weight_errc::bad_shard_index);

  const fs::path ambiguous = tmp.path() / "ambiguous";
  write_sharded(ambiguous, ts);
  fs::remove(ambiguous / "model.safetensors.index.json");
  BOOST_TEST(open_error(ambiguous, &msg) == weight_errc::bad_shard_index);
  BOOST_TEST(msg.find("no index naming the shards") != std::string::npos);
}

BOOST_AUTO_TEST_CASE(checksum_depends_on_content_not_on_sharding) {
  refit::test::temp_dir tmp;
  auto ts = sample_tensors();
  write_sharded(tmp.path() / "sharded", ts);
  fs::create_directories(tmp.path() / "single");
  write_file(tmp.path() / "single/model.safetensors", ts);
  const std::string sharded = module_checksum(open_module_dir("m", tmp.path() / "sharded"));
  const std::string single = module_checksum(open_module_dir("m", tmp.path() / "single"), options(std::nullopt, 1));
  BOOST_TEST(sharded == single);
  BOOST_TEST(sharded.size() == 64u);

  ts[1].bytes[5] ^= std::byte{1};
  fs::create_directories(tmp.path() / "changed");
  write_file(tmp.path() / "changed/model.safetensors", ts);
  BOOST_TEST(module_checksum(open_module_dir("m", tmp.path() / "changed")) != single);
}

BOOST_AUTO_TEST_CASE(checksum_record_follows_the_design_definition) {
  // One tensor: SHA-256( "w" 0 "BF16" 0 "2,3" 0 digest ) where digest = SHA-256(bytes).
  std::vector<std::byte> bytes(12, std::byte{0x3F});
  sha256 td;
  td.update(bytes);
  digest d = td.finish();
  sha256 whole;
  whole.update(std::string_view("w\0BF16\0" "2,3\0", 11));
  whole.update(std::as_bytes(std::span(d)));
  auto expect = whole.finish();
  BOOST_TEST(combine_module_checksum({{"w", dtype::BF16, {2, 3}, d}}) == to_hex(expect));
  // Known SHA-256 of "abc", to pin the hash itself.
  sha256 abc;
  abc.update(std::string_view("abc"));
  auto a = abc.finish();
  BOOST_TEST(to_hex(a) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
}

BOOST_AUTO_TEST_CASE(float_conversion_rounds_like_libtorch) {
  auto f32_to_bf16 = [](uint32_t bits) {
    float f;
    std::memcpy(&f, &bits, 4);
    uint16_t out;
    convert_elements(dtype::F32, reinterpret_cast<const std::byte*>(&f), dtype::BF16, reinterpret_cast<std::byte*>(&out), 1);
    return out;
  };
  BOOST_TEST(f32_to_bf16(0x3F800000u) == 0x3F80u);  // 1.0
  BOOST_TEST(f32_to_bf16(0x3F808000u) == 0x3F80u);  // halfway, ties to even (down)
  BOOST_TEST(f32_to_bf16(0x3F818000u) == 0x3F82u);  // halfway, ties to even (up)
  BOOST_TEST(f32_to_bf16(0x3F808001u) == 0x3F81u);  // above halfway
  BOOST_TEST((f32_to_bf16(0x7FC00001u) & 0x7F80u) == 0x7F80u);  // NaN stays NaN
  BOOST_TEST((f32_to_bf16(0x7FC00001u) & 0x007Fu) != 0u);

  uint8_t e4m3 = 0x38;  // 1.0 in F8_E4M3
  float one = 0;
  convert_elements(dtype::F8_E4M3, reinterpret_cast<const std::byte*>(&e4m3), dtype::F32, reinterpret_cast<std::byte*>(&one), 1);
  BOOST_TEST(one == 1.0f);
  float big = 65520.0f;  // rounds past the largest finite half
  uint16_t h;
  convert_elements(dtype::F32, reinterpret_cast<const std::byte*>(&big), dtype::F16, reinterpret_cast<std::byte*>(&h), 1);
  BOOST_TEST(h == 0x7C00u);

  BOOST_TEST(held_dtype(dtype::BF16, dtype::F32) == dtype::F32);
  BOOST_TEST(held_dtype(dtype::I64, dtype::F32) == dtype::I64);
  BOOST_TEST(held_dtype(dtype::F8_E8M0, dtype::F32) == dtype::F8_E8M0);
  BOOST_TEST(held_dtype(dtype::BF16, std::nullopt) == dtype::BF16);
}

BOOST_AUTO_TEST_CASE(checksum_with_dtype_equals_checksum_of_the_converted_file) {
  refit::test::temp_dir tmp;
  // bf16 1.0, -2.0, 0.5 stored; the same values stored as f32 must hash identically once converted.
  named_tensor bf{"w", dtype::BF16, {3}, {}};
  for (uint16_t v : {0x3F80, 0xC000, 0x3F00}) {
    bf.bytes.push_back(static_cast<std::byte>(v & 0xFF));
    bf.bytes.push_back(static_cast<std::byte>(v >> 8));
  }
  named_tensor f32{"w", dtype::F32, {3}, {}};
  for (uint32_t v : {0x3F800000u, 0xC0000000u, 0x3F000000u})
    for (int k = 0; k < 4; ++k) f32.bytes.push_back(static_cast<std::byte>((v >> (8 * k)) & 0xFF));
  named_tensor steps = make_tensor("steps", dtype::I64, {}, 9);
  fs::create_directories(tmp.path() / "bf");
  fs::create_directories(tmp.path() / "f32");
  write_file(tmp.path() / "bf/model.safetensors", {bf, steps});
  write_file(tmp.path() / "f32/model.safetensors", {f32, steps});
  auto bf_w = open_module_dir("m", tmp.path() / "bf");
  BOOST_TEST(module_checksum(bf_w, options(dtype::F32, 2)) == module_checksum(open_module_dir("m", tmp.path() / "f32")));
  BOOST_TEST(module_checksum(bf_w, options(dtype::F32, 2)) != module_checksum(bf_w));
}

namespace {
// Every tensor's bytes as load_to_host read them, by name.
std::map<std::string, std::vector<std::byte>> read_bytes(const module_weights& w) {
  std::map<std::string, std::vector<std::byte>> out;
  for (const auto& [name, t] : load_to_host(w)) {
    const auto* p = static_cast<const std::byte*>(t.data_ptr());
    out[name].assign(p, p + t.nbytes());
  }
  return out;
}

std::string file_changed_error(const std::function<void()>& read) {
  try {
    read();
  } catch (const weight_error& e) {
    BOOST_TEST(e.code() == weight_errc::file_changed);
    return e.what();
  }
  BOOST_FAIL("the read did not notice the file changing");
  return {};
}
}  // namespace

// A trainer saving over a checkpoint in place while refit reads it: the read (and the checksum) fails
// instead of returning a mix of old and new bytes. A file replaced by a rename is read whole from the file
// that was opened.
BOOST_AUTO_TEST_CASE(a_shard_written_while_it_is_read_is_refused_and_a_renamed_one_is_read_whole) {
  refit::test::temp_dir tmp;
  const auto ts = sample_tensors();
  const fs::path dir = tmp.path() / "m", shard = dir / "model-00001-of-00002.safetensors";
  write_sharded(dir, ts);
  std::map<std::string, std::vector<std::byte>> original;
  for (const auto& t : ts) original[t.name] = t.bytes;

  {  // same size, one byte rewritten; the write lands a moment after the open (the clock is coarse)
    const auto w = open_module_dir("m", dir);
    std::fstream f(shard, std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(-1, std::ios::end);
    f.put('\x01');
    f.close();
    fs::last_write_time(shard, fs::last_write_time(shard) + std::chrono::seconds(1));
    const std::string why = file_changed_error([&] { read_bytes(w); });
    BOOST_TEST(why.find(shard.string()) != std::string::npos, why);
    BOOST_TEST(why.find("written while it was read") != std::string::npos, why);
    file_changed_error([&] { module_checksum(w); });
  }
  write_sharded(dir, ts);
  {  // grown, with the modification time put back: the size gives it away
    const auto w = open_module_dir("m", dir);
    const auto mtime = fs::last_write_time(shard);
    std::ofstream(shard, std::ios::app | std::ios::binary) << "trailing";
    fs::last_write_time(shard, mtime);
    const std::string why = file_changed_error([&] { read_bytes(w); });
    BOOST_TEST(why.find("bytes") != std::string::npos, why);
  }
  write_sharded(dir, ts);
  {  // the checkpoint is rewritten the safe way, a new file renamed over the old: the open one is read
    const auto w = open_module_dir("m", dir);
    const std::string before = module_checksum(w);
    auto changed = ts;
    for (auto& t : changed) t.bytes.assign(t.bytes.size(), std::byte{0x11});
    write_sharded(tmp.path() / "next", changed);
    fs::rename(tmp.path() / "next" / shard.filename(), shard);
    BOOST_TEST((read_bytes(w) == original));
    BOOST_TEST(module_checksum(w) == before);
    BOOST_TEST(module_checksum(open_module_dir("m", dir)) != before);  // the path now names the new file
  }
}

// Hugging Face ids as model paths: found offline in the hub cache's layout, never downloaded.
BOOST_AUTO_TEST_CASE(hugging_face_ids_resolve_through_the_local_hub_cache_only) {
  refit::test::temp_dir tmp;
  const fs::path hub = tmp.path() / "hub";
  const std::string commit = "0123456789abcdef0123456789abcdef01234567";
  const fs::path repo = hub / "models--black-forest-labs--FLUX.2-klein-4B";
  fs::create_directories(repo / "snapshots" / commit);
  fs::create_directories(repo / "refs");
  std::ofstream(repo / "refs" / "main") << commit;  // huggingface_hub writes it without a newline
  ::setenv("HF_HUB_CACHE", hub.c_str(), 1);
  BOOST_TEST(hf_hub_cache() == hub);
  BOOST_TEST(resolve_model_path("black-forest-labs/FLUX.2-klein-4B") == (repo / "snapshots" / commit).string());
  // An existing path wins over a cached id; paths and odd spellings are left for the caller to report.
  BOOST_TEST(resolve_model_path(tmp.path().string()) == tmp.path().string());
  BOOST_TEST(resolve_model_path("/nonexistent/path/to/model") == "/nonexistent/path/to/model");
  BOOST_TEST(resolve_model_path("../x") == "../x");
  BOOST_TEST(!looks_like_repo_id("org/../etc"));
  BOOST_TEST(!looks_like_repo_id("org/name/extra"));
  BOOST_TEST(looks_like_repo_id("Qwen/Qwen-Image-2512"));
  try {
    resolve_model_path("black-forest-labs/FLUX.2-klein-base-4B");
    BOOST_FAIL("an uncached id must be refused");
  } catch (const std::runtime_error& e) {
    BOOST_TEST(std::string(e.what()).find("Failed to download model: 'black-forest-labs/FLUX.2-klein-base-4B'") == 0, e.what());
  }
  std::ofstream(repo / "refs" / "main", std::ios::trunc) << "not-a-commit";
  BOOST_TEST(!find_cached_repo("black-forest-labs/FLUX.2-klein-4B").has_value());
  ::unsetenv("HF_HUB_CACHE");
}
