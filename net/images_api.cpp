#include "net/images_api.hpp"

#include <tuple>

#include "net/json_fields.hpp"

namespace refit::net {

using namespace fields;

namespace {

constexpr int64_t max_image_pixels = 2048 * 2048;
constexpr int64_t max_images = 8;

// "WIDTHxHEIGHT", digits only on both sides.
std::pair<int64_t, int64_t> parse_size(const std::string& s) {
  constexpr const char* expected = "\"auto\" or \"WIDTHxHEIGHT\" with positive integers up to 8192, e.g. \"64x64\"";
  const auto x = s.find('x');
  auto number = [&](std::string_view d) -> int64_t {
    if (d.empty() || d.size() > 5) wrong("size", expected);
    int64_t n = 0;
    for (char c : d) {
      if (c < '0' || c > '9') wrong("size", expected);
      n = n * 10 + (c - '0');
    }
    if (n < 1 || n > 8192) wrong("size", expected);
    return n;
  };
  if (x == std::string::npos) wrong("size", expected);
  return {number(std::string_view(s).substr(0, x)), number(std::string_view(s).substr(x + 1))};
}

// One request must not be able to exhaust the server's memory: today's image DiTs are trained up to about
// 4 megapixels.
void check_pixels(int64_t w, int64_t h, const std::string& what) {
  if (w * h > max_image_pixels)
    throw bad_request("field '" + what + "' must be at most " + std::to_string(max_image_pixels) + " pixels per image (e.g. 2048x2048), got " +
                      std::to_string(w) + "x" + std::to_string(h));
}

// Fields of OpenAI's API that refit takes only at the value that changes nothing.
void only_value(const json& o, const char* name, std::initializer_list<std::string_view> accepted, const std::string& why) {
  auto v = opt_string(o, name);
  if (!v) return;
  for (auto a : accepted)
    if (*v == a) return;
  throw bad_request("field '" + std::string(name) + "' = \"" + *v + "\" is not supported: " + why);
}

void parse_size_fields(const json& o, msg::generation_request& g) {
  std::optional<std::pair<int64_t, int64_t>> size;
  if (auto s = opt_string(o, "size"); s && *s != "auto") {
    size = parse_size(*s);
    check_pixels(size->first, size->second, "size");
  }
  const auto width = opt_int(o, "width", 1, 8192, "an integer between 1 and 8192");
  const auto height = opt_int(o, "height", 1, 8192, "an integer between 1 and 8192");
  if (size && ((width && *width != size->first) || (height && *height != size->second)))
    throw bad_request("fields 'width'/'height' (" + (width ? std::to_string(*width) : std::string("-")) + "x" +
                      (height ? std::to_string(*height) : std::string("-")) + ") disagree with 'size' (" + std::to_string(size->first) + "x" +
                      std::to_string(size->second) + "): give one or make them agree");
  if (size) std::tie(g.width, g.height) = *size;
  if (width) g.width = *width;
  if (height) g.height = *height;
  if (width && height) check_pixels(*width, *height, "width/height");
}

void parse_seeds(const json& o, image_request& r) {
  const json* v = field(o, "seed");
  if (!v) return;
  auto& g = r.generation;
  if (v->is_array()) {
    for (const auto& e : *v) {
      if (!e.is_number_integer() || (!e.is_number_unsigned() && e.get<int64_t>() < 0)) wrong("seed", "a non-negative integer or a list of them");
      g.seeds.push_back(e.get<uint64_t>());
    }
    if (static_cast<int64_t>(g.seeds.size()) != g.images_per_prompt)
      throw bad_request("field 'seed' lists " + std::to_string(g.seeds.size()) + " seeds for n = " + std::to_string(g.images_per_prompt) +
                        " images: give one per image, or one integer (image i then uses seed + i)");
    r.seed_given = true;
    return;
  }
  g.seed = *opt_uint64(o, "seed");
  r.seed_given = true;
}

}  // namespace

image_request parse_image_request(std::string_view body) {
  const json o = parse_object(body);
  only_known(o, {// OpenAI's documented fields
                 "prompt", "n", "size", "response_format", "output_format", "output_compression", "model", "background", "moderation",
                 "quality", "style", "user", "safety_identifier", "stream", "partial_images",
                 // SGLang's and refit's
                 "width", "height", "num_inference_steps", "guidance_scale", "seed", "negative_prompt", "enable_teacache",
                 "teacache_threshold"});
  image_request r;
  auto& g = r.generation;
  auto prompt = opt_text(o, "prompt");
  if (!prompt || prompt->empty()) throw bad_request("prompt is required");
  g.prompts = {std::move(*prompt)};
  g.images_per_prompt = opt_int(o, "n", 1, max_images, "an integer between 1 and 8").value_or(1);
  parse_size_fields(o, g);
  if (auto fmt = opt_string(o, "response_format")) {
    if (*fmt != "b64_json" && *fmt != "url") wrong("response_format", "\"b64_json\" (the default) or \"url\"");
    r.url = *fmt == "url";
  }
  if (auto fmt = opt_string(o, "output_format")) {
    const auto f = *fmt == "png" ? std::optional(msg::image_format::png)
                   : (*fmt == "jpeg" || *fmt == "jpg") ? std::optional(msg::image_format::jpeg)
                   : *fmt == "webp" ? std::optional(msg::image_format::webp)
                                    : std::nullopt;
    if (!f) wrong("output_format", "\"png\" (the default), \"jpeg\" or \"webp\"");
    g.format = *f;
  }
  g.compression = static_cast<int32_t>(opt_int(o, "output_compression", 0, 100, "an integer between 0 and 100").value_or(-1));
  r.model = opt_string(o, "model");
  only_value(o, "background", {"auto", "opaque"}, "refit's pipelines make opaque RGB images");
  only_value(o, "moderation", {"auto", "low"}, "refit applies no content moderation, at any setting");
  only_value(o, "quality", {"auto"}, "the quality of a diffusion image is set by num_inference_steps and guidance_scale");
  if (field(o, "style")) throw bad_request("field 'style' (DALL-E 3's vivid/natural) is not supported: there is no such control in a diffusion pipeline");
  if (opt_bool(o, "stream").value_or(false)) throw bad_request("field 'stream' = true is not supported: refit answers with the finished images");
  if (opt_int(o, "partial_images", 0, 3, "an integer between 0 and 3").value_or(0) > 0)
    throw bad_request("field 'partial_images' is not supported: refit does not stream partial images");
  r.user = opt_text(o, "user").value_or(opt_text(o, "safety_identifier").value_or(""));
  g.steps = opt_int(o, "num_inference_steps", 1, 1000, "an integer between 1 and 1000").value_or(0);
  g.guidance_scale = opt_number(o, "guidance_scale").value_or(g.guidance_scale);
  parse_seeds(o, r);
  g.negative_prompt = opt_text(o, "negative_prompt").value_or("");
  g.enable_teacache = opt_bool(o, "enable_teacache").value_or(false);
  if (auto t = opt_number(o, "teacache_threshold")) {
    if (!(*t >= 0) || !std::isfinite(*t)) throw bad_request("field 'teacache_threshold' must be a finite number >= 0");
    g.teacache_threshold = *t;  // turns TeaCache on for this request
  }
  return r;
}

std::string image_result_json(const msg::generation_result& r, int64_t created_unix_s, std::string_view id,
                              const std::vector<std::string>& urls) {
  json data = json::array();
  for (size_t i = 0; i < r.images.size(); ++i)
    data.push_back(urls.empty() ? json{{"b64_json", base64_encode(r.images[i])}} : json{{"url", urls.at(i)}});
  json out{{"id", id}, {"created", created_unix_s}, {"data", std::move(data)}, {"output_format", msg::to_string(r.format)},
           {"weight_version", r.weight_version}, {"inference_time_s", r.inference_time_s},
           {"worker", r.worker}};
  if (r.teacache_calls) out["teacache"] = {{"transformer_calls", r.teacache_calls}, {"skipped", r.teacache_skipped}};
  return text(out);
}

std::string model_card_json(std::string_view model_path) {
  return text(json{{"id", model_path}, {"object", "model"}, {"owned_by", "refit"}});
}

std::string models_list_json(std::string_view model_path) {
  return text(json{{"object", "list"}, {"data", json::array({json::parse(model_card_json(model_path))})}});
}

std::string model_not_found_json(std::string_view model) {
  return openai_error_json("The model '" + std::string(model) + "' does not exist", "invalid_request_error", "model", "model_not_found");
}

}  // namespace refit::net
