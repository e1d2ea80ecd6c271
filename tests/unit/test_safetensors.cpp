// The strict safetensors reader and the writer.
#define BOOST_TEST_MODULE safetensors
#include <boost/test/unit_test.hpp>

#include <nlohmann/json.hpp>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <numeric>
#include <set>

#include "pipeline/weights/safetensors.hpp"
#include "tests/unit/temp_dir.hpp"

using namespace refit::weights;
namespace fs = std::filesystem;

namespace {

std::vector<std::byte> pattern(size_t n, unsigned seed) {
  std::vector<std::byte> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = static_cast<std::byte>((i * 131 + seed * 7 + 3) & 0xFF);
  return v;
}

std::vector<std::byte> file_with_header(const std::string& header, size_t data_bytes) {
  std::vector<std::byte> v(8 + header.size() + data_bytes);
  uint64_t n = header.size();
  std::memcpy(v.data(), &n, 8);
  std::memcpy(v.data() + 8, header.data(), header.size());
  return v;
}

weight_errc parse_error_code(const std::string& header, size_t data_bytes, std::string* message = nullptr) {
  auto v = file_with_header(header, data_bytes);
  try {
    parse_header("mem.safetensors", v, v.size());
  } catch (const weight_error& e) {
    if (message) *message = e.what();
    return e.code();
  }
  BOOST_FAIL("header was accepted: " << header);
  return weight_errc::io_error;
}

}  // namespace

BOOST_AUTO_TEST_CASE(dtype_codes_round_trip_and_have_the_spec_widths) {
  for (dtype t : all_dtypes) BOOST_TEST(parse_dtype(dtype_name(t)).value() == t);
  BOOST_TEST(dtype_bits(dtype::BF16) == 16u);
  BOOST_TEST(dtype_bits(dtype::F8_E8M0) == 8u);
  BOOST_TEST(dtype_bits(dtype::C64) == 64u);
  BOOST_TEST(dtype_bits(dtype::F4) == 4u);
  BOOST_TEST(dtype_bits(dtype::F6_E3M2) == 6u);
  BOOST_TEST(!parse_dtype("bf16").has_value());
  BOOST_TEST(parse_target_dtype("bf16").value() == dtype::BF16);
  BOOST_TEST(!parse_target_dtype("int8").has_value());
}

BOOST_AUTO_TEST_CASE(writer_output_reads_back_with_identical_bytes_for_every_dtype) {
  refit::test::temp_dir dir;
  std::vector<tensor_spec> specs;
  std::map<std::string, std::vector<std::byte>> data;
  unsigned seed = 0;
  for (dtype t : all_dtypes) {
    std::string name = "t." + std::string(dtype_name(t));
    std::vector<int64_t> shape = dtype_bits(t) < 8 ? std::vector<int64_t>{4, 8} : std::vector<int64_t>{3, 5};
    specs.push_back({name, t, shape});
    data[name] = pattern(shape[0] * shape[1] * dtype_bits(t) / 8, ++seed);
  }
  specs.push_back({"scalar", dtype::F32, {}});
  data["scalar"] = pattern(4, 99);
  specs.push_back({"empty", dtype::BF16, {0, 7}});
  data["empty"] = {};
  const fs::path path = dir.path() / "all.safetensors";
  {
    safetensors_writer w(path, specs, {{"format", "pt"}, {"note", "ünïcode"}});
    // Reverse order: the layout is fixed up front, so order of writes does not matter.
    for (auto it = specs.rbegin(); it != specs.rend(); ++it) w.write(it->name, data[it->name]);
    w.finish();
  }
  auto f = safetensors_file::open(path);
  BOOST_TEST(f.header().header_len % 8 == 0u);
  BOOST_TEST(f.header().metadata.at("note") == "ünïcode");
  BOOST_TEST(f.header().tensors.size() == specs.size());
  for (const auto& s : specs) {
    const tensor_entry* t = f.header().find(s.name);
    BOOST_REQUIRE(t != nullptr);
    BOOST_TEST(t->type == s.type);
    BOOST_TEST(t->shape == s.shape);
    auto bytes = f.bytes(*t);
    BOOST_TEST(std::vector<std::byte>(bytes.begin(), bytes.end()) == data[s.name]);
  }
  BOOST_TEST(f.header().find("scalar")->shape.empty());
  BOOST_TEST(f.header().find("empty")->nbytes() == 0u);
}

BOOST_AUTO_TEST_CASE(writer_leaves_no_file_when_a_tensor_is_missing_or_the_size_is_wrong) {
  refit::test::temp_dir dir;
  const fs::path path = dir.path() / "partial.safetensors";
  {
    safetensors_writer w(path, {{"a", dtype::F32, {2}}, {"b", dtype::F32, {2}}});
    auto a = pattern(8, 1);
    w.write("a", a);
    auto wrong = pattern(7, 2);
    try {
      w.write("b", wrong);
      BOOST_FAIL("short write accepted");
    } catch (const weight_error& e) {
      BOOST_TEST(std::string(e.what()).find("tensor 'b': given 7 bytes, layout needs 8") != std::string::npos);
    }
    try {
      w.finish();
      BOOST_FAIL("finish accepted a missing tensor");
    } catch (const weight_error& e) {
      BOOST_TEST(std::string(e.what()).find("tensor 'b': was never written") != std::string::npos);
    }
  }
  BOOST_TEST(!fs::exists(path));
  BOOST_TEST(fs::is_empty(dir.path()));  // the temporary file is gone too
}

BOOST_AUTO_TEST_CASE(malformed_corpus_gives_each_file_its_specific_error) {
  const fs::path corpus = fs::path(REFIT_SOURCE_DIR) / "tests/data/malformed";
  std::ifstream in(corpus / "expected.json");
  auto expected = nlohmann::json::parse(in);
  BOOST_TEST(expected.size() >= 12u);
  std::set<std::string> distinct_messages;
  for (auto& [file, want] : expected.items()) {
    BOOST_TEST_CONTEXT(file) {
      try {
        safetensors_file::open(corpus / file);
        BOOST_ERROR("accepted a malformed file");
      } catch (const weight_error& e) {
        const std::string msg = e.what();
        BOOST_TEST(std::string(to_string(e.code())) == want["code"].get<std::string>());
        BOOST_TEST(msg.find(want["message_contains"].get<std::string>()) != std::string::npos, msg);
        BOOST_TEST(msg.find(file) != std::string::npos, "message names the file: " << msg);
        distinct_messages.insert(msg.substr(msg.find(file) + file.size()));
      }
    }
  }
  BOOST_TEST(distinct_messages.size() == expected.size());
}

BOOST_AUTO_TEST_CASE(header_rules_are_checked_in_memory) {
  std::string msg;
  // Zero-element and 0-dim tensors are valid and tile at the same offset.
  auto ok = file_with_header(R"({"e":{"dtype":"F32","shape":[0,3],"data_offsets":[0,0]},"s":{"dtype":"I64","shape":[],"data_offsets":[0,8]}})", 8);
  auto h = parse_header("mem", ok, ok.size());
  BOOST_TEST(h.tensors.size() == 2u);
  BOOST_TEST(h.tensors[0].name == "e");
  BOOST_TEST(h.find("s")->numel() == 1u);
  // An empty file with only "{}" is valid.
  auto empty = file_with_header("{}", 0);
  BOOST_TEST(parse_header("mem", empty, empty.size()).tensors.empty());

  // A zero-element tensor may sit where another starts, but not inside another's bytes.
  auto edge = file_with_header(R"({"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},"b":{"dtype":"U8","shape":[0],"data_offsets":[0,0]}})", 2);
  BOOST_TEST(parse_header("mem", edge, edge.size()).tensors.size() == 2u);
  BOOST_TEST(parse_error_code(R"({"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},"b":{"dtype":"U8","shape":[0],"data_offsets":[1,1]}})", 2) == weight_errc::tiling_overlap);
  BOOST_TEST(parse_error_code(R"({"a":{"dtype":"U8","shape":[2.5],"data_offsets":[0,2]}})", 2, &msg) == weight_errc::bad_shape);
  BOOST_TEST(msg.find("tensor 'a'") != std::string::npos);
  BOOST_TEST(parse_error_code(R"({"a":{"shape":[1],"data_offsets":[0,1]}})", 1) == weight_errc::unknown_dtype);
  BOOST_TEST(parse_error_code(R"({"__metadata__":[1],"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}})", 1) == weight_errc::bad_metadata);
  BOOST_TEST(parse_error_code(R"({"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}} x)", 1) == weight_errc::header_bad_json);
  BOOST_TEST(parse_error_code(R"({"a":{"dtype":"U8","shape":[1],"data_offsets":[-1,0]}})", 1) == weight_errc::bad_offsets);
  BOOST_TEST(parse_error_code(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", 8, &msg) == weight_errc::tiling_gap);
  BOOST_TEST(msg.find("after the start of the data area") != std::string::npos);
  // The largest allowed header length is accepted as a length (then fails on its content).
  std::vector<std::byte> at_bound(8);
  uint64_t n = max_header_bytes;
  std::memcpy(at_bound.data(), &n, 8);
  try {
    parse_header("mem", at_bound, 8 + max_header_bytes);
  } catch (const weight_error& e) {
    BOOST_TEST(e.code() != weight_errc::header_too_large);
  }
}
