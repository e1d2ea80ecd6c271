// SGLang's torch.distributed weight-update endpoints (its LLM engine's, which its diffusion engine
// adopts): POST /init_weights_update_group, /update_weights_from_distributed and
// /destroy_weights_update_group, with SGLang's field names, defaults and {"success", "message"} replies.
// Parsing is strict (json_codec.hpp's rules): a field refit cannot honour is a bad_request naming it.
#pragma once

#include <string>
#include <string_view>

#include "messages/protocol.hpp"

namespace refit::net {

// POST /init_weights_update_group: master_address, master_port, rank_offset, world_size (required),
// group_name ("weight_update_group"), backend ("nccl"; refit also "gloo").
msg::group_request parse_group_request(std::string_view body);

// POST /destroy_weights_update_group: group_name ("weight_update_group").
std::string parse_destroy_group_request(std::string_view body);

// POST /update_weights_from_distributed: names, dtypes, shapes (required, equally long), group_name,
// flush_cache, abort_all_requests, weight_version, load_format (null or "flattened_bucket"),
// target_modules, selector ("all" or "target"), torch_empty_cache; refit's mode. Throws bad_request only
// when the body is not an object or group_name is unusable; any other refusal is returned in `refused`,
// because the trainer broadcasts regardless and the workers must take (and drop) its bytes.
msg::update_request parse_distributed_update_request(std::string_view body);

std::string group_result_json(const msg::group_result& result);

}  // namespace refit::net
