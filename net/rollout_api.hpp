// POST /rollout/generate as SGLang's diffusion server serves it (sglang 0.5.23 RolloutRequest /
// RolloutResponse): a JSON request, an application/msgpack reply with one map per sample, tensors as
// {"__tensor__": true, "data": <safetensors bytes of {"t": tensor}>, "shape": [...], "dtype": "torch.float32"},
// so SGLang's client-side decoding works unchanged; refit adds each sample's weight_version.
#pragma once

#include <string>
#include <string_view>

#include "messages/protocol.hpp"
#include "net/json_codec.hpp"

namespace refit::net {

struct rollout_http_request {
  msg::rollout_request rollout;
  bool seed_given = false;  // otherwise the caller draws one (and the reply says which)
};

// Throws bad_request naming the field; fields refit cannot honour (video, image editing, a CUDA generator,
// extra_sampling_params) are refused when set, never ignored.
rollout_http_request parse_rollout_request(std::string_view body);

// The msgpack body of the reply.
std::string rollout_response_msgpack(const msg::rollout_result& result);

}  // namespace refit::net
