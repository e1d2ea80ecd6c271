// SGLang's post-training endpoints beside the weight updates of http_bridge.cpp: release/resume of device memory,
// updates from a colocated trainer's shared tensors and their checker, and the LoRA operations.
#include <spdlog/spdlog.h>

#include "net/bridge_context.hpp"
#include "net/distributed_api.hpp"
#include "net/json_codec.hpp"
#include "net/lora_api.hpp"
#include "net/tensor_api.hpp"

namespace refit::net::bridge {

// POST /release_memory_occupation, /resume_memory_occupation: 200 when done (or already so), 400 when refused
// or rolled back (every worker stays as it was).
template <class Atom>
void memory_occupation(bridge_context& ctx, const http::request& req, http::response& res) {
  if (reject_unauthorized(ctx, req, res)) return;
  try {
    parse_memory_request(req.body);
  } catch (const bad_request& e) {
    msg::memory_result r;
    r.message = e.what();
    reply(res, 400, memory_result_json(r));
    return;
  }
  auto r = ask<msg::memory_result>(ctx, ctx.config.request_timeout, Atom::value);
  if (auto* e = std::get_if<caf::error>(&r)) {
    msg::memory_result failed;
    failed.message = describe(*e, ctx.config.request_timeout);
    reply(res, status_for(*e) == 504 ? 504 : 500, memory_result_json(failed));
    return;
  }
  const auto& m = std::get<msg::memory_result>(r);
  reply(res, m.success ? 200 : 400, memory_result_json(m));
}

// POST /update_weights_from_tensor: the trainer's tensors are shared, not sent; each worker opens its payload.
void update_weights_from_tensor(bridge_context& ctx, const http::request& req, http::response& res) {
  if (reject_unauthorized(ctx, req, res)) return;
  msg::update_request update;
  try {
    update = parse_tensor_update_request(req.body);
  } catch (const bad_request& e) {
    spdlog::warn("refit serve: tensor update rejected (400): {}", e.what());
    reply(res, 400, failed_update_json(e.what(), current_identity(ctx).weight_version));
    return;
  }
  run_update(ctx, update, "tensors shared by the trainer", res);
}

// POST /update_weights_from_tensor_checker: SGLang's {success, message}, 200 or 400.
void update_weights_from_tensor_checker(bridge_context& ctx, const http::request& req, http::response& res) {
  if (reject_unauthorized(ctx, req, res)) return;
  checker_request check;
  try {
    check = parse_checker_request(req.body);
  } catch (const bad_request& e) {
    reply(res, 400, group_result_json({false, e.what()}));
    return;
  }
  std::vector<std::string> names;
  for (const auto& [name, hex] : check.expected) names.push_back(name);
  auto r = ask<std::map<std::string, std::string>>(ctx, ctx.config.request_timeout, msg::tensor_hashes_atom::value, check.target_module, names);
  if (auto* e = std::get_if<caf::error>(&r)) {
    const int status = status_for(*e);
    reply(res, status == 400 ? 400 : status, group_result_json({false, describe(*e, ctx.config.request_timeout)}));
    return;
  }
  const auto [ok, message] = check_tensor_hashes(check, std::get<0>(r));
  reply(res, ok ? 200 : 400, group_result_json({ok, message}));
}

// POST /v1/set_lora, /v1/merge_lora_weights, /v1/unmerge_lora_weights: each one update transaction.
// SGLang answers a failure with 500 {"detail"}; refit with 400 when the request or the adapter is at fault
// (nothing changed), 500/504 when the server is.
void run_lora(bridge_context& ctx, const http::request& req, http::response& res, lora_call (*parse)(std::string_view),
              const char* failure_prefix) {
  if (reject_unauthorized(ctx, req, res)) return;
  lora_call call;
  try {
    call = parse(req.body);
  } catch (const bad_request& e) {
    spdlog::warn("refit serve: {} rejected (400): {}", req.path, e.what());
    reply(res, 400, lora_failure_json(std::string(failure_prefix) + ": " + e.what(), current_identity(ctx).weight_version));
    return;
  }
  for (auto& a : call.request.adapters) {
    if (a.path.empty() || !ctx.roots.restricted()) continue;
    auto admitted = ctx.roots.admit(a.path);
    if (!admitted) {
      const std::string why = std::string(failure_prefix) + ": lora_path '" + a.path + "' is outside the allowed model roots";
      spdlog::warn("refit serve: {} refused (403): {}", req.path, why);
      reply(res, 403, lora_failure_json(why, current_identity(ctx).weight_version));
      return;
    }
    a.path = admitted->string();
  }
  auto r = ask<msg::update_result>(ctx, ctx.config.request_timeout, msg::lora_atom::value, call.request);
  if (auto* e = std::get_if<caf::error>(&r)) {
    reply(res, status_for(*e) == 504 ? 504 : 500,
          lora_failure_json(std::string(failure_prefix) + ": " + describe(*e, ctx.config.request_timeout), current_identity(ctx).weight_version));
    return;
  }
  auto& result = std::get<msg::update_result>(r);
  current_identity(ctx);
  if (!result.success) {
    spdlog::warn("refit serve: {} failed: {}", req.path, result.message);
    reply(res, 400, lora_failure_json(std::string(failure_prefix) + ": " + result.message, result.weight_version));
    return;
  }
  spdlog::info("refit serve: {}: {} (weight_version {})", req.path, call.success_message, result.weight_version);
  reply(res, 200, lora_success_json(call.success_message, result));
}

void set_lora(bridge_context& ctx, const http::request& req, http::response& res) {
  run_lora(ctx, req, res, parse_set_lora, "Failed to set LoRA adapter");
}
void merge_lora(bridge_context& ctx, const http::request& req, http::response& res) {
  run_lora(ctx, req, res, parse_merge_lora, "Failed to merge LoRA weights");
}
void unmerge_lora(bridge_context& ctx, const http::request& req, http::response& res) {
  run_lora(ctx, req, res, parse_unmerge_lora, "Failed to unmerge LoRA weights");
}

void list_loras(bridge_context& ctx, const http::request& req, http::response& res) {
  if (reject_unauthorized(ctx, req, res)) return;
  auto r = ask<msg::lora_status>(ctx, query_timeout, msg::list_loras_atom::value);
  if (auto* e = std::get_if<caf::error>(&r)) {
    reply(res, 500, lora_failure_json(describe(*e, query_timeout), current_identity(ctx).weight_version));
    return;
  }
  reply(res, 200, lora_status_json(std::get<msg::lora_status>(r)));
}

void release_memory_occupation(bridge_context& ctx, const http::request& req, http::response& res) {
  memory_occupation<msg::release_memory_atom>(ctx, req, res);
}

void resume_memory_occupation(bridge_context& ctx, const http::request& req, http::response& res) {
  memory_occupation<msg::resume_memory_atom>(ctx, req, res);
}

}  // namespace refit::net::bridge
