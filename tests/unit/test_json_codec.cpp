// The HTTP API's JSON codec (strict request parsing, reply shapes), /metrics text, and the
// allowed-model-root policy of the admin endpoints.
#define BOOST_TEST_MODULE json_codec
#include <boost/test/unit_test.hpp>

#include <nlohmann/json.hpp>

#include <filesystem>
#include <set>
#include <string>

#include "net/http_bridge.hpp"
#include "net/distributed_api.hpp"
#include "net/images_api.hpp"
#include "net/json_codec.hpp"
#include "net/metrics.hpp"
#include "tests/unit/temp_dir.hpp"

using namespace refit;
using json = nlohmann::json;
namespace fs = std::filesystem;

namespace {

// The bad_request message a parser throws for `body`, or "" when it accepts it.
template <class Parse>
std::string rejection(Parse parse, const std::string& body) {
  try {
    parse(body);
  } catch (const net::bad_request& e) {
    return e.what();
  }
  return "";
}

std::string update_rejection(const std::string& body) { return rejection(net::parse_update_request, body); }
std::string checksum_rejection(const std::string& body) { return rejection(net::parse_checksum_request, body); }
std::string image_rejection(const std::string& body) { return rejection(net::parse_image_request, body); }

std::set<std::string> keys(const json& o) {
  std::set<std::string> out;
  for (auto it = o.begin(); it != o.end(); ++it) out.insert(it.key());
  return out;
}

}  // namespace

BOOST_AUTO_TEST_CASE(malformed_json_and_non_objects_are_bad_requests) {
  for (const std::string body : {"{", "not json", "", "{\"model_path\": \"/m\",}", "{'model_path': '/m'}"})
    BOOST_TEST(update_rejection(body).find("request body is not valid JSON") == 0, "body: " << body);
  BOOST_TEST(update_rejection("{").find("parse error") != std::string::npos);  // says where parsing stopped
  for (const std::string body : {"[]", "[{\"model_path\": \"/m\"}]", "\"/m\"", "42", "null"}) {
    BOOST_TEST(update_rejection(body) == "request body must be a JSON object", "body: " << body);
    BOOST_TEST(checksum_rejection(body) == "request body must be a JSON object");
    BOOST_TEST(image_rejection(body) == "request body must be a JSON object");
  }
}

// The parser quotes what it read last, bytes that are not UTF-8 included; a file name may not be UTF-8
// either. Replies replace such bytes with U+FFFD instead of failing (the server answered 500 before).
BOOST_AUTO_TEST_CASE(replies_quoting_bytes_that_are_not_utf8_stay_valid_json) {
  const std::string body = "{\"module_names\": [\"vae\xc3r\"]}";
  const std::string why = checksum_rejection(body);
  BOOST_TEST(why.find("request body is not valid JSON") == 0, why);
  const std::string bad = "no module 'vae\xc3r' in \xff/tmp";
  for (const std::string& reply : {net::error_json(why), net::error_json(bad), net::openai_error_json(bad, "invalid_request_error"),
                                   net::checksums_json({{"vae\xc3r", "not_found"}})}) {
    const json j = json::parse(reply);  // throws on invalid UTF-8
    BOOST_TEST(j.dump().find("\xef\xbf\xbd") != std::string::npos, reply);  // U+FFFD
  }
  msg::update_result r;
  r.message = bad;
  BOOST_TEST(json::parse(net::update_result_json(r))["message"] == "no module 'vae\xef\xbf\xbdr' in \xef\xbf\xbd/tmp");
}

BOOST_AUTO_TEST_CASE(update_request_needs_a_non_empty_model_path) {
  for (const std::string body : {"{}", R"({"model_path": null})", R"({"model_path": ""})", R"({"flush_cache": true})"})
    BOOST_TEST(update_rejection(body) == "model_path is required", "body: " << body);
  BOOST_TEST(update_rejection(R"({"model_path": 5})") == "field 'model_path' must be a string");
  BOOST_TEST(update_rejection(R"({"model_path": ["/m"]})") == "field 'model_path' must be a string");
}

BOOST_AUTO_TEST_CASE(update_request_defaults_match_sglang) {
  const auto r = net::parse_update_request(R"({"model_path": "/ckpt/step-10"})");
  BOOST_TEST(r.model_path == "/ckpt/step-10");
  BOOST_TEST(r.flush_cache == true);
  BOOST_TEST(r.abort_all_requests == false);
  BOOST_TEST(r.target_modules.empty());  // every module
  BOOST_TEST(r.weight_version == "");    // derived by the scheduler
  BOOST_TEST(r.mode == msg::update_mode::auto_select);
  // null means "not given" for every optional field.
  const auto n = net::parse_update_request(
      R"({"model_path": "/m", "flush_cache": null, "target_modules": null, "weight_version": null, "abort_all_requests": null, "mode": null})");
  BOOST_TEST(n.flush_cache == true);
  BOOST_TEST(n.target_modules.empty());
  BOOST_TEST(n.mode == msg::update_mode::auto_select);
}

BOOST_AUTO_TEST_CASE(update_request_reads_every_field) {
  const auto r = net::parse_update_request(
      R"({"model_path": "/m", "flush_cache": false, "target_modules": ["transformer", "vae"], "weight_version": "step-7",
          "abort_all_requests": true, "mode": "in_place"})");
  BOOST_TEST(r.flush_cache == false);
  BOOST_TEST((r.target_modules == std::vector<std::string>{"transformer", "vae"}));
  BOOST_TEST(r.weight_version == "step-7");
  BOOST_TEST(r.abort_all_requests == true);
  BOOST_TEST(r.mode == msg::update_mode::in_place);
  BOOST_TEST(net::parse_update_request(R"({"model_path": "/m", "mode": "staged"})").mode == msg::update_mode::staged);
}

BOOST_AUTO_TEST_CASE(update_request_wrong_types_name_the_field) {
  const std::vector<std::pair<std::string, std::string>> cases{
      {R"({"model_path": "/m", "flush_cache": "true"})", "field 'flush_cache' must be a boolean"},
      {R"({"model_path": "/m", "flush_cache": 1})", "field 'flush_cache' must be a boolean"},
      {R"({"model_path": "/m", "abort_all_requests": 0})", "field 'abort_all_requests' must be a boolean"},
      {R"({"model_path": "/m", "target_modules": "transformer"})", "field 'target_modules' must be a list of strings or null"},
      {R"({"model_path": "/m", "target_modules": ["vae", 3]})", "field 'target_modules' must be a list of strings or null"},
      {R"({"model_path": "/m", "target_modules": {"vae": true}})", "field 'target_modules' must be a list of strings or null"},
      {R"({"model_path": "/m", "weight_version": 7})", "field 'weight_version' must be a string"},
      {R"({"model_path": "/m", "mode": "fast"})", R"(field 'mode' must be one of "auto", "staged", "in_place")"},
      {R"({"model_path": "/m", "mode": true})", "field 'mode' must be a string"},
  };
  for (const auto& [body, message] : cases) BOOST_TEST(update_rejection(body) == message, "body: " << body);
}

BOOST_AUTO_TEST_CASE(update_request_empty_target_list_is_not_every_module) {
  // The protocol's empty list means "all"; [] from a client must not silently widen to that.
  BOOST_TEST(update_rejection(R"({"model_path": "/m", "target_modules": []})").find("field 'target_modules' must not be an empty list") == 0);
}

// SGLang's weight_update_mode "lora_merge": model_path is an adapter, merged into the base.
BOOST_AUTO_TEST_CASE(update_request_lora_merge_names_the_adapter) {
  auto r = net::parse_update_request(R"({"model_path": "/loras/a", "weight_update_mode": "lora_merge", "lora_alpha": 8})");
  BOOST_TEST((r.source == msg::source_kind::lora));
  BOOST_REQUIRE(r.adapters.size() == 1u);
  BOOST_TEST(r.adapters[0].path == "/loras/a");
  BOOST_TEST(r.adapters[0].alpha == 8);
  BOOST_TEST(r.adapters[0].strength == 1.0);
  BOOST_TEST(update_rejection(R"({"model_path": "/m", "lora_rank": 4})") == "fields 'lora_alpha' and 'lora_rank' need weight_update_mode \"lora_merge\"");
  BOOST_TEST(update_rejection(R"({"model_path": "/m", "weight_update_mode": "lora_merge", "target_modules": ["a", "b"]})") ==
             "LoRA IPC weight update requires exactly one target module per request");
}

// A misspelled field must not be silently dropped (target_module would update every module).
BOOST_AUTO_TEST_CASE(unknown_fields_are_refused_by_name) {
  BOOST_TEST(update_rejection(R"({"model_path": "/m", "target_module": ["vae"]})") ==
             "unknown field(s) 'target_module' (this endpoint takes: model_path, flush_cache, target_modules, weight_version, "
             "abort_all_requests, mode, weight_update_mode, lora_alpha, lora_rank, check_finite)");
  BOOST_TEST(update_rejection(R"({"model_path": "/m", "load_format": 3, "extra": {"nested": [1, 2]}})").find("unknown field(s) 'extra', 'load_format'") == 0);
  BOOST_TEST(checksum_rejection(R"({"whatever": null, "worker": 1})").find("unknown field(s) 'whatever'") == 0);
  BOOST_TEST(image_rejection(R"({"prompt": "a fox", "steps": 4})").find("unknown field(s) 'steps'") == 0);
  // OpenAI's documented fields are known: honoured, or refused by name with the reason.
  const auto i = net::parse_image_request(R"({"prompt": "a fox", "model": "m", "user": "me", "quality": "auto", "background": "opaque",
                                              "moderation": "low", "stream": false, "partial_images": 0, "safety_identifier": null})");
  BOOST_TEST(i.generation.prompts.at(0) == "a fox");
  BOOST_TEST(*i.model == "m");
  BOOST_TEST(i.user == "me");
}

// Issue 13: a NUL byte would truncate a path; weight_version is repeated in every reply and in /metrics.
BOOST_AUTO_TEST_CASE(nul_bytes_hostile_weight_versions_and_check_finite) {
  BOOST_TEST(update_rejection(R"({"model_path": "/m\u0000/x"})") == "field 'model_path' must not contain a NUL byte");
  BOOST_TEST(update_rejection(R"({"model_path": "/m", "target_modules": ["vae\u0000"]})") ==
             "field 'target_modules' must not contain a NUL byte");
  BOOST_TEST(update_rejection(R"({"model_path": "/m", "weight_version": ")" + std::string(257, 'v') + "\"}") ==
             "field 'weight_version' is 257 bytes long; at most 256 are allowed");
  BOOST_TEST(update_rejection(R"({"model_path": "/m", "weight_version": "a\tb"})") ==
             "field 'weight_version' holds the byte 0x09 at offset 1; only printable ASCII without '\"' and '\\' is allowed");
  BOOST_TEST(update_rejection(R"({"model_path": "/m", "weight_version": "\u00e9"})").find("holds the byte 0xc3 at offset 0") !=
             std::string::npos);
  BOOST_TEST(update_rejection(R"({"model_path": "/m", "check_finite": 1})").find("field 'check_finite' must be a boolean") == 0);
  BOOST_TEST((net::parse_update_request(R"({"model_path": "/m"})").check_finite == msg::finite_check::server_default));
  BOOST_TEST((net::parse_update_request(R"({"model_path": "/m", "check_finite": false})").check_finite == msg::finite_check::off));
  const auto ok = net::parse_update_request(R"({"model_path": "/m", "check_finite": true, "weight_version": ")" + std::string(256, '~') + "\"}");
  BOOST_TEST((ok.check_finite == msg::finite_check::on));
  BOOST_TEST(ok.weight_version.size() == 256u);
  // Prompts are free text.
  BOOST_TEST(net::parse_image_request(R"({"prompt": "a\u0000fox"})").generation.prompts.at(0) == std::string("a\0fox", 5));
  // The distributed endpoint refuses too, keeping the announcement for the workers to drop.
  const auto d = net::parse_distributed_update_request(
      R"({"names": ["a"], "dtypes": ["float16"], "shapes": [[4]], "weight_version": "x\ny", "check_finite": false})");
  BOOST_TEST(d.refused == "field 'weight_version' holds the byte 0x0a at offset 1; only printable ASCII without '\"' and '\\' is allowed");
  BOOST_TEST(d.tensors.size() == 1u);
}

BOOST_AUTO_TEST_CASE(openai_fields_refit_cannot_honour_are_refused_by_name) {
  const std::vector<std::pair<std::string, std::string>> cases{
      {R"({"prompt": "p", "quality": "hd"})", "field 'quality' = \"hd\" is not supported"},
      {R"({"prompt": "p", "background": "transparent"})", "field 'background' = \"transparent\" is not supported"},
      {R"({"prompt": "p", "style": "vivid"})", "field 'style' (DALL-E 3's vivid/natural) is not supported"},
      {R"({"prompt": "p", "stream": true})", "field 'stream' = true is not supported"},
      {R"({"prompt": "p", "partial_images": 2})", "field 'partial_images' is not supported"},
      {R"({"prompt": "p", "output_format": "gif"})", R"(field 'output_format' must be "png" (the default), "jpeg" or "webp")"},
      {R"({"prompt": "p", "output_compression": 101})", "field 'output_compression' must be an integer between 0 and 100"},
      {R"({"prompt": "p", "response_format": "html"})", R"(field 'response_format' must be "b64_json" (the default) or "url")"},
  };
  for (const auto& [body, message] : cases) BOOST_TEST(image_rejection(body).find(message) == 0, "body: " << body << " -> " << image_rejection(body));
}

BOOST_AUTO_TEST_CASE(image_size_width_height_seeds_and_formats) {
  auto g = net::parse_image_request(R"({"prompt": "p", "width": 96, "height": 64})").generation;
  BOOST_TEST(g.width == 96);
  BOOST_TEST(g.height == 64);
  g = net::parse_image_request(R"({"prompt": "p", "size": "96x64", "width": 96})").generation;  // agreeing is fine
  BOOST_TEST(g.width == 96);
  BOOST_TEST(g.height == 64);
  g = net::parse_image_request(R"({"prompt": "p", "size": "auto"})").generation;  // the model's size
  BOOST_TEST(g.width == 0);
  BOOST_TEST(image_rejection(R"({"prompt": "p", "size": "64x64", "width": 96, "height": 64})") ==
             "fields 'width'/'height' (96x64) disagree with 'size' (64x64): give one or make them agree");
  BOOST_TEST(image_rejection(R"({"prompt": "p", "width": 4096, "height": 4096})").find("field 'width/height' must be at most") == 0);
  auto r = net::parse_image_request(R"({"prompt": "p", "n": 3, "seed": [7, 9, 11]})");
  BOOST_TEST((r.generation.seeds == std::vector<uint64_t>{7, 9, 11}));
  BOOST_TEST(r.seed_given);
  BOOST_TEST(image_rejection(R"({"prompt": "p", "n": 2, "seed": [7]})").find("field 'seed' lists 1 seeds for n = 2 images") == 0);
  BOOST_TEST(image_rejection(R"({"prompt": "p", "seed": [-1]})") == "field 'seed' must be a non-negative integer or a list of them");
  r = net::parse_image_request(R"({"prompt": "p", "output_format": "jpg", "output_compression": 60, "response_format": "url"})");
  BOOST_TEST(r.generation.format == msg::image_format::jpeg);
  BOOST_TEST(r.generation.compression == 60);
  BOOST_TEST(r.url);
  BOOST_TEST(net::parse_image_request(R"({"prompt": "p", "output_format": "webp"})").generation.format == msg::image_format::webp);
  BOOST_TEST(net::parse_image_request(R"({"prompt": "p"})").generation.format == msg::image_format::png);
}

BOOST_AUTO_TEST_CASE(checksum_request_fields) {
  const auto d = net::parse_checksum_request("{}");
  BOOST_TEST(!d.module_names.has_value());
  BOOST_TEST(d.worker == 0);
  BOOST_TEST(!net::parse_checksum_request(R"({"module_names": null})").module_names.has_value());
  const auto r = net::parse_checksum_request(R"({"module_names": ["transformer", "bogus"], "worker": 2})");
  BOOST_TEST((*r.module_names == std::vector<std::string>{"transformer", "bogus"}));
  BOOST_TEST(r.worker == 2);
  BOOST_TEST(net::parse_checksum_request(R"({"module_names": []})").module_names->empty());
  BOOST_TEST(checksum_rejection(R"({"module_names": "vae"})") == "field 'module_names' must be a list of strings or null");
  BOOST_TEST(checksum_rejection(R"({"worker": -1})") == "field 'worker' must be a non-negative integer");
  BOOST_TEST(checksum_rejection(R"({"worker": 1.5})") == "field 'worker' must be a non-negative integer");
  BOOST_TEST(checksum_rejection(R"({"worker": "0"})") == "field 'worker' must be a non-negative integer");
  BOOST_TEST(checksum_rejection(R"({"worker": 99999999999})") == "field 'worker' must be a non-negative integer");
  BOOST_TEST(d.format == msg::checksum_format::sglang);  // SGLang's formula unless asked otherwise
  BOOST_TEST(net::parse_checksum_request(R"({"format": "refit"})").format == msg::checksum_format::refit);
  BOOST_TEST(checksum_rejection(R"({"format": "md5"})") == R"(field 'format' must be "sglang" (the default) or "refit")");
}

BOOST_AUTO_TEST_CASE(image_request_defaults) {
  const auto r = net::parse_image_request(R"({"prompt": "a red fox"})");
  const auto& g = r.generation;
  BOOST_TEST((g.prompts == std::vector<std::string>{"a red fox"}));
  BOOST_TEST(g.images_per_prompt == 1);
  BOOST_TEST(g.width == 0);  // the model's size
  BOOST_TEST(g.height == 0);
  BOOST_TEST(g.steps == 0);  // the model's default
  BOOST_TEST(g.guidance_scale == 4.0);
  BOOST_TEST(!r.seed_given);
  BOOST_TEST(g.negative_prompt == "");
  BOOST_TEST(g.enable_teacache == false);
  BOOST_TEST(g.teacache_threshold < 0);  // the model's threshold
}

BOOST_AUTO_TEST_CASE(image_request_reads_every_field) {
  const auto r = net::parse_image_request(
      R"({"prompt": "p", "n": 3, "size": "64x32", "response_format": "b64_json", "num_inference_steps": 4, "guidance_scale": 2,
          "seed": 18446744073709551615, "negative_prompt": "blurry", "enable_teacache": true, "model": "refit"})");
  const auto& g = r.generation;
  BOOST_TEST(g.images_per_prompt == 3);
  BOOST_TEST(g.width == 64);
  BOOST_TEST(g.height == 32);
  BOOST_TEST(g.steps == 4);
  BOOST_TEST(g.guidance_scale == 2.0);
  BOOST_TEST(r.seed_given);
  BOOST_TEST(g.seed == 18446744073709551615ull);
  BOOST_TEST(g.negative_prompt == "blurry");
  BOOST_TEST(g.enable_teacache == true);
  BOOST_TEST(net::parse_image_request(R"({"prompt": "p", "guidance_scale": 3.5})").generation.guidance_scale == 3.5);
  BOOST_TEST(net::parse_image_request(R"({"prompt": "p", "teacache_threshold": 0.4})").generation.teacache_threshold == 0.4);
  BOOST_TEST(net::parse_image_request(R"({"prompt": "p", "teacache_threshold": 0})").generation.teacache_threshold == 0.0);
}

BOOST_AUTO_TEST_CASE(image_request_rejections_name_the_field) {
  const std::vector<std::pair<std::string, std::string>> cases{
      {R"({})", "prompt is required"},
      {R"({"prompt": ""})", "prompt is required"},
      {R"({"prompt": 3})", "field 'prompt' must be a string"},
      {R"({"prompt": "p", "n": 0})", "field 'n' must be an integer between 1 and 8"},
      {R"({"prompt": "p", "n": 9})", "field 'n' must be an integer between 1 and 8"},
      {R"({"prompt": "p", "n": 2.0})", "field 'n' must be an integer between 1 and 8"},
      {R"({"prompt": "p", "n": "2"})", "field 'n' must be an integer between 1 and 8"},
      {R"({"prompt": "p", "response_format": 1})", "field 'response_format' must be a string"},
      {R"({"prompt": "p", "num_inference_steps": 0})", "field 'num_inference_steps' must be an integer between 1 and 1000"},
      {R"({"prompt": "p", "num_inference_steps": 4.5})", "field 'num_inference_steps' must be an integer between 1 and 1000"},
      {R"({"prompt": "p", "guidance_scale": "high"})", "field 'guidance_scale' must be a number"},
      {R"({"prompt": "p", "seed": -1})", "field 'seed' must be a non-negative integer"},
      {R"({"prompt": "p", "seed": 1.5})", "field 'seed' must be a non-negative integer"},
      {R"({"prompt": "p", "negative_prompt": false})", "field 'negative_prompt' must be a string"},
      {R"({"prompt": "p", "enable_teacache": "yes"})", "field 'enable_teacache' must be a boolean"},
      {R"({"prompt": "p", "teacache_threshold": -0.1})", "field 'teacache_threshold' must be a finite number >= 0"},
      {R"({"prompt": "p", "teacache_threshold": "low"})", "field 'teacache_threshold' must be a number"},
      {R"({"prompt": "p", "size": 64})", "field 'size' must be a string"},
  };
  for (const auto& [body, message] : cases) BOOST_TEST(image_rejection(body) == message, "body: " << body);
  for (const std::string size : {"64", "64x", "x64", "0x64", "64x0", "-64x64", "64X64", "64x64x64", "6 4x64", "99999x64", "1e2x64"})
    BOOST_TEST(image_rejection(R"({"prompt": "p", "size": ")" + size + "\"}").find("field 'size' must be \"auto\" or \"WIDTHxHEIGHT\"") == 0,
               "size: " << size);
  // Within the per-side bound but over the pixel budget of one image.
  BOOST_TEST(image_rejection(R"({"prompt": "p", "size": "4096x2048"})").find("field 'size' must be at most 4194304 pixels") == 0);
  BOOST_TEST(image_rejection(R"({"prompt": "p", "size": "2048x2048"})").empty());
}

BOOST_AUTO_TEST_CASE(successful_update_reply_shape) {
  msg::update_result r;
  r.success = true;
  r.message = "Updated transformer, vae";
  r.weight_version = "step-7";
  r.modules = {{"transformer", 1, 12, 4096, 0.25, msg::write_path::staged, "/ckpt/transformer"}};
  r.timings = {{"plan", 0.001}, {"total", 0.5}};
  r.mode = msg::write_path::staged;
  r.mode_reason = "fits";
  r.cache_flushed = true;
  r.aborted_requests = 2;
  const json j = json::parse(net::update_result_json(r));
  BOOST_TEST((keys(j) == std::set<std::string>{"success", "message", "weight_version", "modules", "timings", "mode", "mode_reason",
                                                "cache_flushed", "aborted_requests"}));
  BOOST_TEST(j["success"] == true);
  BOOST_TEST(j["weight_version"] == "step-7");
  BOOST_TEST(j["modules"].size() == 1u);
  const json& m = j["modules"][0];
  BOOST_TEST((keys(m) == std::set<std::string>{"name", "worker", "tensors", "bytes", "seconds", "path", "source_dir"}));
  BOOST_TEST(m["name"] == "transformer");
  BOOST_TEST(m["worker"] == 1);
  BOOST_TEST(m["tensors"] == 12);
  BOOST_TEST(m["bytes"] == 4096);
  BOOST_TEST(m["seconds"] == 0.25);
  BOOST_TEST(m["path"] == "staged");
  BOOST_TEST(m["source_dir"] == "/ckpt/transformer");
  BOOST_TEST(j["timings"]["total"] == 0.5);
  BOOST_TEST(j["mode"] == "staged");
  BOOST_TEST(j["cache_flushed"] == true);
  BOOST_TEST(j["aborted_requests"] == 2);
}

BOOST_AUTO_TEST_CASE(failed_update_reply_shape) {
  msg::update_result r;
  r.message = "Module 'bogus' not found in pipeline";
  r.weight_version = "3";
  r.timings = {{"total", 0.1}};
  const json j = json::parse(net::update_result_json(r));
  BOOST_TEST((keys(j) == std::set<std::string>{"success", "message", "weight_version"}));
  BOOST_TEST(j["success"] == false);
  BOOST_TEST(j["message"] == "Module 'bogus' not found in pipeline");
  BOOST_TEST(j["weight_version"] == "3");
  const json e = json::parse(net::error_json("no \"key\""));
  BOOST_TEST((keys(e) == std::set<std::string>{"success", "message"}));
  BOOST_TEST(e["message"] == "no \"key\"");
}

namespace {
// One worker's layerwise-offload state, the same values for every worker but its index.
msg::offload_info offload_of_worker(int32_t worker) {
  msg::offload_info o;
  o.worker = worker;
  o.blocks = 25;
  o.prefetch_size = 1;
  o.resident_blocks = {0, 1};
  o.host_bytes = 7000;
  o.spare_host_bytes = 7000;
  o.device_bytes = 900;
  o.prefetches = 50;
  o.prefetched_bytes = 45000;
  o.refreshes = 2;
  return o;
}
}  // namespace

BOOST_AUTO_TEST_CASE(query_reply_shapes) {
  const json c = json::parse(net::checksums_json({{"transformer", "ab12"}, {"bogus", "not_found"}}));
  BOOST_TEST(c == json({{"transformer", "ab12"}, {"bogus", "not_found"}}));

  msg::model_info info;
  info.model_path = "/ckpt/a";
  info.weight_version = "0";
  msg::module_info mi;
  mi.name = "vae";
  mi.class_name = "AutoencoderKLFlux2";
  mi.dtype = "fp32";
  mi.device = "cpu";
  mi.worker = 1;
  mi.tensors = 10;
  mi.bytes = 1000;
  mi.source = "/ckpt/a/vae";
  mi.undo_bytes = 5;  // internal: not part of the reply
  msg::module_info other = mi;
  other.worker = 0;
  other.name = "transformer";
  msg::module_info first = other;
  first.name = "text_encoder";
  info.modules = {mi, other, first};
  info.workers = {{0, "cuda:0", "", "serving"}, {1, "cuda:1", "host-b", "catching_up"}};
  const json i = json::parse(net::model_info_json(info));
  BOOST_TEST((keys(i) == std::set<std::string>{"model_path", "weight_version", "modules", "sleeping", "workers"}));
  // A local worker has no host; a joined one says which process it is.
  BOOST_TEST(i["workers"] == json::parse(R"([{"worker": 0, "device": "cuda:0", "status": "serving"},
                                             {"worker": 1, "device": "cuda:1", "host": "host-b", "status": "catching_up"}])"));
  // Sorted by worker, then name, whatever order the module actors answered in.
  BOOST_TEST(i["modules"][0]["name"] == "text_encoder");
  BOOST_TEST(i["modules"][1]["name"] == "transformer");
  BOOST_TEST(i["modules"][2] == json({{"name", "vae"}, {"class", "AutoencoderKLFlux2"}, {"dtype", "fp32"}, {"device", "cpu"}, {"worker", 1},
                                      {"tensors", 10}, {"bytes", 1000}, {"source_dir", "/ckpt/a/vae"}}));
  // A module whose weights are not known says why; the others carry no such key.
  info.modules[0].problem = "its actor died during an update and the replacement could not undo it: disk gone";
  const json ip = json::parse(net::model_info_json(info));
  BOOST_TEST(ip["modules"][2]["problem"] == info.modules[0].problem);
  BOOST_TEST(!ip["modules"][0].contains("problem"));
  info.modules[0].problem.clear();

  // With layerwise offload: one entry per worker, sorted by worker.
  info.offload = {offload_of_worker(1), offload_of_worker(0)};
  const json io = json::parse(net::model_info_json(info));
  BOOST_TEST(io["layerwise_offload"].size() == 2u);
  BOOST_TEST(io["layerwise_offload"][0]["worker"] == 0);
  BOOST_TEST(io["layerwise_offload"][1] == json::parse(R"({"worker": 1, "blocks": 25, "prefetch_size": 1, "resident_blocks": [0, 1],
      "host_bytes": 7000, "spare_host_bytes": 7000, "device_bytes": 900, "prefetches": 50, "prefetched_bytes": 45000,
      "refreshes": 2})"));

  const json l = json::parse(net::models_list_json("/ckpt/a"));
  BOOST_TEST(l == json::parse(R"({"object": "list", "data": [{"id": "/ckpt/a", "object": "model", "owned_by": "refit"}]})"));
  BOOST_TEST(json::parse(net::health_json()) == json({{"status", "ok"}}));

  msg::generation_result g;
  g.images = {{'f', 'o', 'o'}, {'f', 'o'}};
  g.weight_version = "2";
  g.inference_time_s = 0.75;
  g.worker = 1;
  const json im = json::parse(net::image_result_json(g, 1700000000, "abc123"));
  BOOST_TEST(im == json::parse(R"({"id": "abc123", "created": 1700000000, "data": [{"b64_json": "Zm9v"}, {"b64_json": "Zm8="}],
                                   "output_format": "png", "weight_version": "2", "inference_time_s": 0.75,
                                   "worker": 1})"));
  // response_format "url": the images' URLs instead of their bytes.
  const json iu = json::parse(net::image_result_json(g, 1700000000, "abc123", {"/v1/images/abc123/content?variant=0", "/v1/images/abc123/content?variant=1"}));
  BOOST_TEST(iu["data"] == json::parse(R"([{"url": "/v1/images/abc123/content?variant=0"}, {"url": "/v1/images/abc123/content?variant=1"}])"));
  g.teacache_calls = 8;
  g.teacache_skipped = 3;  // only TeaCache requests report the block: plain ones keep the OpenAI shape above
  BOOST_TEST(json::parse(net::image_result_json(g, 1700000000, "x"))["teacache"] == json({{"transformer_calls", 8}, {"skipped", 3}}));
  BOOST_TEST(json::parse(net::model_card_json("/ckpt/a")) == json::parse(R"({"id": "/ckpt/a", "object": "model", "owned_by": "refit"})"));
  const json nf = json::parse(net::model_not_found_json("gpt-image-1"));
  BOOST_TEST(nf["error"] == json::parse(R"({"message": "The model 'gpt-image-1' does not exist", "type": "invalid_request_error",
                                            "param": "model", "code": "model_not_found"})"));
  const json oe = json::parse(net::openai_error_json("bad size", "invalid_request_error"));
  BOOST_TEST(oe["error"]["message"] == "bad size");
  BOOST_TEST(oe["error"]["type"] == "invalid_request_error");
  BOOST_TEST(oe["success"] == false);
}

BOOST_AUTO_TEST_CASE(base64_matches_rfc4648_vectors) {
  auto b64 = [](const std::string& s) { return net::base64_encode(std::vector<uint8_t>(s.begin(), s.end())); };
  BOOST_TEST(b64("") == "");
  BOOST_TEST(b64("f") == "Zg==");
  BOOST_TEST(b64("fo") == "Zm8=");
  BOOST_TEST(b64("foo") == "Zm9v");
  BOOST_TEST(b64("foob") == "Zm9vYg==");
  BOOST_TEST(b64("fooba") == "Zm9vYmE=");
  BOOST_TEST(b64("foobar") == "Zm9vYmFy");
  BOOST_TEST(net::base64_encode({0xFF, 0xFE, 0x00}) == "//4A");
}

BOOST_AUTO_TEST_CASE(metrics_text_has_the_contract_names_and_values) {
  msg::scheduler_stats s;
  s.updates_ok = 3;
  s.updates_failed = 1;
  s.generations_ok = 5;
  s.generations_failed = 1;
  s.generations_cancelled = 2;
  s.in_flight = 1;
  s.queued = 4;
  s.last_pause_s = 0.125;
  s.last_timings = {{"commit", 0.25}, {"total", 2.0}};
  s.last_update_bytes = 4'000'000'000;
  // latencies 0.07, 0.3 and 700 s, counted into the buckets as the scheduler does
  s.latency_bucket_counts.assign(msg::latency_bucket_bounds_s().size() + 1, 0);
  s.latency_bucket_counts[1] = 1;  // <= 0.1
  s.latency_bucket_counts[3] = 1;  // <= 0.5
  s.latency_bucket_counts.back() = 1;  // above 600
  s.latency_sum_s = 700.37;
  s.latency_count = 3;
  const std::string t = net::prometheus_text(s, "/ckpt/\"a\"\\b", "step-1");
  auto has = [&t](const std::string& line) { return t.find("\n" + line + "\n") != std::string::npos; };
  BOOST_TEST(has("refit_updates_total{result=\"success\"} 3"));
  BOOST_TEST(has("refit_updates_total{result=\"failure\"} 1"));
  BOOST_TEST(has("refit_update_phase_seconds{phase=\"commit\"} 0.25"));
  BOOST_TEST(has("refit_update_bytes 4000000000"));
  BOOST_TEST(has("refit_update_bytes_per_second 2000000000"));
  BOOST_TEST(has("refit_update_pause_seconds 0.125"));
  BOOST_TEST(has("refit_generations_total{result=\"ok\"} 5"));
  BOOST_TEST(has("refit_generations_total{result=\"failed\"} 1"));
  BOOST_TEST(has("refit_generations_total{result=\"cancelled\"} 2"));
  BOOST_TEST(has("refit_generation_latency_seconds_bucket{le=\"0.05\"} 0"));
  BOOST_TEST(has("refit_generation_latency_seconds_bucket{le=\"0.1\"} 1"));  // cumulative
  BOOST_TEST(has("refit_generation_latency_seconds_bucket{le=\"0.5\"} 2"));
  BOOST_TEST(has("refit_generation_latency_seconds_bucket{le=\"600\"} 2"));
  BOOST_TEST(has("refit_generation_latency_seconds_bucket{le=\"+Inf\"} 3"));
  BOOST_TEST(has("refit_generation_latency_seconds_count 3"));
  BOOST_TEST(has("refit_requests_in_flight 1"));
  BOOST_TEST(has("refit_requests_queued 4"));
  BOOST_TEST(has(R"(refit_model_info{model_path="/ckpt/\"a\"\\b",weight_version="step-1"} 1)"));
  BOOST_TEST(has("# TYPE refit_generation_latency_seconds histogram"));
  BOOST_TEST(has("# TYPE refit_updates_total counter"));
  BOOST_TEST(t.find("refit_offload_") == std::string::npos);  // only servers with layerwise offload report it

  s.teacache = {{2, 10, 6, 1}};
  s.offload = {offload_of_worker(0)};
  const std::string u = net::prometheus_text(s, "/ckpt", "1");
  auto has_u = [&u](const std::string& line) { return u.find("\n" + line + "\n") != std::string::npos; };
  BOOST_TEST(has_u("refit_teacache_requests_total{worker=\"0\"} 2"));
  BOOST_TEST(has_u("refit_teacache_steps_total{worker=\"0\",result=\"computed\"} 10"));
  BOOST_TEST(has_u("refit_teacache_steps_total{worker=\"0\",result=\"skipped\"} 6"));
  BOOST_TEST(has_u("refit_teacache_resets_total{worker=\"0\"} 1"));
  BOOST_TEST(has_u("refit_offload_host_bytes{worker=\"0\"} 7000"));
  BOOST_TEST(has_u("refit_offload_device_bytes{worker=\"0\"} 900"));
  BOOST_TEST(has_u("refit_offload_resident_blocks{worker=\"0\"} 2"));
  BOOST_TEST(has_u("refit_offload_prefetches_total{worker=\"0\"} 50"));
  BOOST_TEST(has_u("refit_offload_prefetched_bytes_total{worker=\"0\"} 45000"));
  BOOST_TEST(has_u("refit_offload_refreshes_total{worker=\"0\"} 2"));
}

BOOST_AUTO_TEST_CASE(allowed_roots_resolve_symlinks_and_dotdot) {
  test::temp_dir tmp;
  const fs::path root = tmp.path() / "ckpts", outside = tmp.path() / "secret";
  fs::create_directories(root / "step-1");
  fs::create_directories(outside);
  fs::create_directories(tmp.path() / "ckpts-evil");
  fs::create_directory_symlink(outside, root / "escape");
  fs::create_directory_symlink(root / "step-1", tmp.path() / "alias");
  const net::model_root_policy policy({root});
  BOOST_TEST(policy.restricted());

  BOOST_TEST(policy.admit((root / "step-1").string()).value() == fs::canonical(root / "step-1"));
  BOOST_TEST(policy.admit((root / "step-1/").string()).value() == fs::canonical(root / "step-1"));
  BOOST_TEST(policy.admit(root.string()).has_value());
  BOOST_TEST(policy.admit((tmp.path() / "alias").string()).has_value());  // a link from outside that lands inside
  BOOST_TEST(!policy.admit((root / "escape").string()).has_value());      // a link inside that lands outside
  BOOST_TEST(!policy.admit((root / "escape/new").string()).has_value());
  BOOST_TEST(!policy.admit((root / "step-1/../../secret").string()).has_value());
  BOOST_TEST(!policy.admit((root / "../ckpts-evil").string()).has_value());  // a sibling sharing the prefix
  BOOST_TEST(!policy.admit(outside.string()).has_value());
  // Not there yet: checked lexically below its deepest existing parent.
  BOOST_TEST(policy.admit((root / "step-2/transformer").string()).value() == fs::canonical(root) / "step-2/transformer");
  BOOST_TEST(!policy.admit((root / "step-2/../../secret").string()).has_value());

  const net::model_root_policy open;
  BOOST_TEST(!open.restricted());
  BOOST_TEST(open.admit(outside.string()).has_value());
  BOOST_CHECK_THROW(net::model_root_policy({tmp.path() / "missing"}), std::invalid_argument);
}

BOOST_AUTO_TEST_CASE(distributed_update_defaults_match_sglang_and_refusals_still_carry_the_announcement) {
  const auto r = net::parse_distributed_update_request(
      R"({"names": ["a.weight", "b"], "dtypes": ["bfloat16", "torch.float32"], "shapes": [[2, 3], []]})");
  BOOST_TEST(r.refused == "");
  BOOST_TEST((r.source == msg::source_kind::distributed));
  BOOST_TEST(r.group_name == "weight_update_group");
  BOOST_TEST(r.flush_cache);
  BOOST_TEST(!r.abort_all_requests);
  BOOST_TEST(!r.flattened_bucket);
  BOOST_TEST(!r.empty_cache);
  BOOST_TEST(r.target_modules.empty());
  BOOST_TEST(r.tensors.size() == 2u);
  BOOST_TEST(r.tensors[0].name == "a.weight");
  BOOST_TEST(r.tensors[1].dtype == "torch.float32");
  BOOST_TEST((r.tensors[0].shape == std::vector<int64_t>{2, 3}));
  const auto b = net::parse_distributed_update_request(
      R"({"names": ["a"], "dtypes": ["float16"], "shapes": [[4]], "load_format": "flattened_bucket", "group_name": "g",
          "selector": "target", "torch_empty_cache": true, "target_modules": ["vae"], "weight_version": "7", "mode": "in_place"})");
  BOOST_TEST(b.refused == "");
  BOOST_TEST(b.flattened_bucket);
  BOOST_TEST(b.empty_cache);
  BOOST_TEST(b.group_name == "g");
  BOOST_TEST((b.mode == msg::update_mode::in_place));

  // The trainer broadcasts whatever refit answers: a refusal keeps what it announced, for the workers to drop.
  auto refused = [](const std::string& body) { return net::parse_distributed_update_request(body); };
  auto x = refused(R"({"names": ["a"], "dtypes": ["float32"], "shapes": [[4]], "lora_strength": 2})");
  BOOST_TEST(x.refused.find("unknown field(s) 'lora_strength'") == 0, x.refused);
  BOOST_TEST(x.tensors.size() == 1u);
  // SGLang's lora_merge: the tensors are an adapter's A/B weights.
  x = refused(R"({"names": ["a.lora_A.weight"], "dtypes": ["float32"], "shapes": [[4, 8]], "weight_update_mode": "lora_merge",
                  "lora_alpha": 16, "lora_rank": 4})");
  BOOST_TEST(x.refused == "");
  BOOST_TEST(x.lora_merge);
  BOOST_TEST(x.lora_alpha == 16);
  BOOST_TEST(x.lora_rank == 4);
  x = refused(R"({"names": ["a"], "dtypes": ["float32"], "shapes": [[4]], "weight_update_mode": "lora_add"})");
  BOOST_TEST(x.refused.find("field 'weight_update_mode' must be null (replace the weights) or \"lora_merge\"") == 0, x.refused);
  x = refused(R"({"names": ["a"], "dtypes": ["float32"], "shapes": [[4]], "lora_alpha": 16})");
  BOOST_TEST(x.refused == "fields 'lora_alpha' and 'lora_rank' need weight_update_mode \"lora_merge\"");
  x = refused(R"({"names": ["a"], "dtypes": ["float32"], "shapes": [[4]], "weight_update_mode": "lora_merge", "lora_alpha": 0})");
  BOOST_TEST(x.refused == "field 'lora_alpha' must be a positive integer or null");
  x = refused(R"({"names": ["a"], "dtypes": ["float32"], "shapes": [[4]], "load_format": "direct"})");
  BOOST_TEST(x.refused.find("field 'load_format' must be null") == 0, x.refused);
  x = refused(R"({"names": ["a"], "dtypes": ["float32"], "shapes": [[4]], "selector": "draft"})");
  BOOST_TEST(x.refused.find("field 'selector' must be") == 0, x.refused);
  x = refused(R"({"names": ["a", "b"], "dtypes": ["float32"], "shapes": [[4]]})");
  BOOST_TEST(x.refused == "names, dtypes and shapes must be equally long (got 2, 1, 1)");
  BOOST_TEST(x.tensors.empty());  // nothing can be sized: the workers leave the group instead
  x = refused(R"({"names": ["a"], "dtypes": ["float31"], "shapes": [[4]]})");
  BOOST_TEST(x.refused.find("dtypes[0] ('a'): unknown dtype 'float31'") == 0, x.refused);
  x = refused(R"({"names": ["a"], "dtypes": ["float32"], "shapes": [[-4]]})");
  BOOST_TEST(x.refused == "shapes[0] must be a list of non-negative integers");
  x = refused(R"({"dtypes": ["float32"], "shapes": [[4]]})");
  BOOST_TEST(x.refused == "field 'names' is required");
  // Without a usable group name nothing can take the broadcast: that alone is thrown.
  BOOST_TEST(rejection(net::parse_distributed_update_request, R"({"names": ["a"], "group_name": ""})") ==
             "field 'group_name' must not be empty");
  BOOST_TEST(rejection(net::parse_distributed_update_request, "[]") == "request body must be a JSON object");
}

BOOST_AUTO_TEST_CASE(group_requests_take_sglangs_fields) {
  const auto g = net::parse_group_request(R"({"master_address": "10.0.0.1", "master_port": 29500, "rank_offset": 1, "world_size": 3})");
  BOOST_TEST(g.master_address == "10.0.0.1");
  BOOST_TEST(g.master_port == 29500);
  BOOST_TEST(g.world_size == 3);
  BOOST_TEST(g.group_name == "weight_update_group");
  BOOST_TEST(g.backend == "nccl");
  auto bad = [](const std::string& body) { return rejection(net::parse_group_request, body); };
  BOOST_TEST(bad(R"({"master_port": 1, "rank_offset": 1, "world_size": 2})") == "field 'master_address' is required");
  BOOST_TEST(bad(R"({"master_address": "h", "master_port": 70000, "rank_offset": 1, "world_size": 2})") ==
             "field 'master_port' must be a port number (1..65535)");
  BOOST_TEST(bad(R"({"master_address": "h", "master_port": 1, "rank_offset": 0, "world_size": 2})") ==
             "field 'rank_offset' must be an integer >= 1 (rank 0 is the trainer)");
  BOOST_TEST(bad(R"({"master_address": "h", "master_port": 1, "rank_offset": 1, "world_size": 2, "backend": "mpi"})") ==
             "field 'backend' must be \"nccl\" (the default) or \"gloo\"");
  BOOST_TEST(bad(R"({"master_address": "h", "master_port": 1, "rank_offset": 1, "world_size": 2, "timeout": 5})").find(
                 "unknown field(s) 'timeout'") == 0);
  BOOST_TEST(net::parse_destroy_group_request("{}") == "weight_update_group");
  BOOST_TEST(rejection(net::parse_destroy_group_request, R"({"group": "g"})").find("unknown field(s) 'group'") == 0);
  BOOST_TEST(net::group_result_json({true, "ok"}) == R"({"message":"ok","success":true})");
}
