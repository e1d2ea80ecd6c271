// What the HTTP bridge's handler files share (http_bridge.cpp: routes, generation, disk and distributed updates,
// queries; post_training_routes.cpp: SGLang's LoRA, shared-tensor and memory endpoints): the context every handler
// thread uses, one blocking request to the scheduler, and the reply helpers. Private to net/.
#pragma once

#include <atomic>
#include <chrono>
#include <mutex>
#include <optional>
#include <string>
#include <utility>
#include <variant>

#include "net/http_bridge.hpp"
#include "net/http_server.hpp"
#include "net/image_store.hpp"

namespace refit::net::bridge {

constexpr auto query_timeout = std::chrono::seconds(60);
// /metrics and /v1/models must answer while an update keeps the module actors busy reading weights;
// past this they use the identity last seen.
constexpr auto identity_timeout = std::chrono::seconds(2);

struct identity {
  std::string model_path, weight_version;
};

// Shared by every handler thread.
struct bridge_context {
  bridge_context(caf::actor_system& s, msg::client_api_actor sched, http_bridge_config c)
      : sys(s), scheduler(std::move(sched)), config(std::move(c)), roots(config.allowed_model_roots),
        images({config.image_url_ttl, config.image_store_bytes}) {}
  caf::actor_system& sys;
  msg::client_api_actor scheduler;
  http_bridge_config config;
  model_root_policy roots;
  image_store images;             // response_format "url"
  std::string started_with;       // the model path served at start: a model id clients may keep using
  std::mutex identity_mutex;      // handlers run concurrently on the server's handler threads
  identity known;
  // Admission control: generation requests (images and rollouts) being served or queued, and a moving
  // average of their duration for Retry-After.
  std::atomic<int64_t> generations{0};
  // Set when the bridge actor exits: a handler still running then must not create a scoped_actor in an
  // actor system that is being destroyed.
  std::atomic<bool> closing{false};
  std::atomic<double> generation_seconds{1.0};
};

// One blocking request to the scheduler, from the calling HTTP thread.
template <class Result, class... Ts>
std::variant<Result, caf::error> ask(bridge_context& ctx, std::chrono::seconds timeout, Ts&&... xs) {
  if (ctx.closing) return caf::error{caf::make_error(caf::sec::request_receiver_down)};
  caf::scoped_actor self{ctx.sys};  // fresh per request: a reply that missed its timeout cannot reach a later request
  std::variant<Result, caf::error> out{caf::error{}};
  self->request(ctx.scheduler, timeout, std::forward<Ts>(xs)...)
      .receive([&](Result& r) { out = std::move(r); }, [&](caf::error& e) { out = std::move(e); });
  return out;
}

void remember(bridge_context& ctx, identity id);
// The served model and weight_version (the last one seen when the scheduler is busy).
identity current_identity(bridge_context& ctx);
std::string describe(const caf::error& e, std::chrono::seconds timeout);
int status_for(const caf::error& e);
void reply(http::response& res, int status, std::string body);
// Counts a generation request in (or answers 429 with Retry-After and returns nullopt): at most
// workers + --max-queued-requests at once. The ticket counts it out and times it.
struct generation_ticket {
  bridge_context* ctx;
  std::chrono::steady_clock::time_point start;
  generation_ticket(bridge_context* c) : ctx(c), start(std::chrono::steady_clock::now()) {}
  generation_ticket(generation_ticket&& o) noexcept : ctx(std::exchange(o.ctx, nullptr)), start(o.start) {}
  generation_ticket(const generation_ticket&) = delete;
  ~generation_ticket();
};
std::optional<generation_ticket> admit_generation(bridge_context& ctx, http::response& res, bool openai_shape);
bool reject_unauthorized(const bridge_context& ctx, const http::request& req, http::response& res);
std::string failed_update_json(const std::string& message, const std::string& weight_version);
// Runs a parsed update and answers SGLang's way (200, or 400 with {success: false, message}).
void run_update(bridge_context& ctx, const msg::update_request& update, const std::string& label, http::response& res);

// post_training_routes.cpp
void release_memory_occupation(bridge_context& ctx, const http::request& req, http::response& res);
void resume_memory_occupation(bridge_context& ctx, const http::request& req, http::response& res);
void update_weights_from_tensor(bridge_context& ctx, const http::request& req, http::response& res);
void update_weights_from_tensor_checker(bridge_context& ctx, const http::request& req, http::response& res);
void set_lora(bridge_context& ctx, const http::request& req, http::response& res);
void merge_lora(bridge_context& ctx, const http::request& req, http::response& res);
void unmerge_lora(bridge_context& ctx, const http::request& req, http::response& res);
void list_loras(bridge_context& ctx, const http::request& req, http::response& res);

}  // namespace refit::net::bridge
