// The OpenAI image API as refit serves it (POST /v1/images/generations, GET /v1/models[/{id}]), compatible
// with OpenAI's clients and SGLang's diffusion server. Every documented OpenAI field is honoured or refused
// by name with a 400; SGLang's and refit's extensions (width, height, seed lists, num_inference_steps, ...)
// are taken; anything else is an unknown field, refused by name.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "messages/protocol.hpp"
#include "net/json_codec.hpp"

namespace refit::net {

struct image_request {
  msg::generation_request generation;
  bool seed_given = false;              // otherwise the caller draws a random seed
  bool url = false;                     // response_format "url" (else "b64_json", refit's default)
  std::optional<std::string> model;     // must name the served model (checked by the bridge)
  std::string user;                     // OpenAI's user / safety_identifier, for the log
};
image_request parse_image_request(std::string_view body);

// The reply: OpenAI's shape plus SGLang's id and inference_time_s and refit's weight_version. `urls`
// (one per image) when the request asked for response_format "url", else the images go inline.
std::string image_result_json(const msg::generation_result& result, int64_t created_unix_s, std::string_view id,
                              const std::vector<std::string>& urls = {});

// GET /v1/models and GET /v1/models/{id}: the served model's card (id = the model path served).
std::string models_list_json(std::string_view model_path);
std::string model_card_json(std::string_view model_path);
// 404 for a model that is not served, as OpenAI words it.
std::string model_not_found_json(std::string_view model);

}  // namespace refit::net
