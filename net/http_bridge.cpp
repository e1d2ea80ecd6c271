#include "net/http_bridge.hpp"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <ctime>
#include <mutex>
#include <random>
#include <cmath>
#include <variant>

#include "net/bridge_context.hpp"
#include "net/distributed_api.hpp"
#include "net/image_store.hpp"
#include "net/images_api.hpp"
#include "net/json_codec.hpp"
#include "net/lora_api.hpp"
#include "net/metrics.hpp"
#include "net/rollout_api.hpp"
#include "pipeline/weights/hf_cache.hpp"

namespace refit::net {

namespace fs = std::filesystem;
using clock = std::chrono::steady_clock;
using msg::refit_errc;

namespace bridge {

void remember(bridge_context& ctx, identity id) {
  std::lock_guard lock(ctx.identity_mutex);
  ctx.known = std::move(id);
}

identity current_identity(bridge_context& ctx) {
  auto r = ask<msg::model_info>(ctx, identity_timeout, msg::info_atom::value);
  if (auto* info = std::get_if<msg::model_info>(&r)) remember(ctx, {info->model_path, info->weight_version});
  std::lock_guard lock(ctx.identity_mutex);
  return ctx.known;
}

std::string describe(const caf::error& e, std::chrono::seconds timeout) {
  if (e == caf::sec::request_timeout) return "the scheduler did not reply within " + std::to_string(timeout.count()) + " s";
  if (e == caf::sec::request_receiver_down) return "the scheduler is not running";
  return msg::describe(e);
}

int status_for(const caf::error& e) {
  if (e == caf::sec::request_timeout) return 504;
  if (e.category() == caf::atom("refit")) switch (static_cast<refit_errc>(e.code())) {
      case refit_errc::invalid_request:
      case refit_errc::module_not_found: return 400;
      case refit_errc::cancelled: return 503;  // aborted by an update with abort_all_requests: retry
      case refit_errc::sleeping: return 503;   // released its device memory: resume_memory_occupation first
      default: return 500;
    }
  return 500;
}

void reply(http::response& res, int status, std::string body) { res.set(status, std::move(body)); }

generation_ticket::~generation_ticket() {
  if (!ctx) return;
  const double seconds = std::chrono::duration<double>(clock::now() - start).count();
  double avg = ctx->generation_seconds.load();
  ctx->generation_seconds.store(0.8 * avg + 0.2 * seconds);  // a race loses one sample, nothing more
  --ctx->generations;
}

std::optional<generation_ticket> admit_generation(bridge_context& ctx, http::response& res, bool openai_shape) {
  const int64_t workers = static_cast<int64_t>(std::max<size_t>(1, ctx.config.workers));
  const int64_t limit = workers + static_cast<int64_t>(ctx.config.max_queued_requests);
  const int64_t before = ctx.generations.fetch_add(1);
  if (before < limit) return generation_ticket{&ctx};
  --ctx.generations;
  // About when a place frees up: the queue ahead, spread over the workers, at the recent pace.
  const double wait = ctx.generation_seconds.load() * static_cast<double>(before - workers + 1) / static_cast<double>(workers);
  const int64_t retry = std::clamp<int64_t>(static_cast<int64_t>(std::ceil(wait)), 1, 3600);
  const std::string message = "Too many requests: " + std::to_string(ctx.config.max_queued_requests) +
                              " generation requests are already queued (--max-queued-requests); retry after " + std::to_string(retry) + " s";
  static std::atomic<uint64_t> refused{0};
  if (refused++ % 100 == 0) spdlog::warn("refit serve: {} (429 so far: {})", message, refused.load());
  res.set_header("Retry-After", std::to_string(retry));
  reply(res, 429, openai_shape ? openai_error_json(message, "rate_limit_error", {}, "rate_limit_exceeded") : detail_error_json(message));
  return std::nullopt;
}

// Constant time, so the key cannot be guessed byte by byte from response latency.
bool authorized(const bridge_context& ctx, const http::request& req) {
  if (ctx.config.api_key.empty()) return true;
  const std::string got = req.header("Authorization"), want = "Bearer " + ctx.config.api_key;
  unsigned diff = got.size() == want.size() ? 0u : 1u;
  for (size_t i = 0; i < got.size() && i < want.size(); ++i) diff |= static_cast<unsigned char>(got[i] ^ want[i]);
  return diff == 0;
}

bool reject_unauthorized(const bridge_context& ctx, const http::request& req, http::response& res) {
  if (authorized(ctx, req)) return false;
  spdlog::warn("refit serve: {} {} from {} refused: missing or wrong API key", req.method, req.path, req.remote_addr);
  res.set_header("WWW-Authenticate", "Bearer");
  reply(res, 401, error_json("missing or wrong API key: send the header 'Authorization: Bearer <key>'"));
  return true;
}

std::string failed_update_json(const std::string& message, const std::string& weight_version) {
  msg::update_result r;
  r.message = message;
  r.weight_version = weight_version;
  return update_result_json(r);
}


void update_weights(bridge_context& ctx, const http::request& req, http::response& res) {
  if (reject_unauthorized(ctx, req, res)) return;
  msg::update_request update;
  try {
    update = parse_update_request(req.body);
  } catch (const bad_request& e) {
    spdlog::warn("refit serve: update request rejected (400): {}", e.what());
    reply(res, 400, failed_update_json(e.what(), current_identity(ctx).weight_version));
    return;
  }
  try {
    update.model_path = weights::resolve_model_path(update.model_path);  // a Hugging Face id: its cached snapshot
  } catch (const std::runtime_error& e) {
    spdlog::warn("refit serve: update request rejected (400): {}", e.what());
    reply(res, 400, failed_update_json(e.what(), current_identity(ctx).weight_version));
    return;
  }
  if (ctx.roots.restricted()) {
    auto admitted = ctx.roots.admit(update.model_path);
    if (!admitted) {
      std::string roots;
      for (const auto& r : ctx.roots.roots()) roots += (roots.empty() ? "" : ", ") + r.string();
      const std::string why = "model_path '" + update.model_path + "' resolves to '" + model_root_policy::resolve(update.model_path).string() +
                              "', which is outside the allowed model roots (" + roots + ")";
      spdlog::warn("refit serve: update request refused (403): {}", why);
      reply(res, 403, error_json(why));
      return;
    }
    update.model_path = admitted->string();  // load what was checked, even if a symlink changes afterwards
  }
  for (auto& a : update.adapters) a.path = update.model_path;  // lora_merge: the adapter is what model_path resolved to
  run_update(ctx, update, update.model_path, res);
}

// Runs a parsed update and answers SGLang's way: 200 on success, 400 with {success: false, message} on
// failure; the reply carries refit's report too. `label` names the source in logs.
void run_update(bridge_context& ctx, const msg::update_request& update, const std::string& label, http::response& res) {
  const auto t0 = clock::now();
  auto r = ask<msg::update_result>(ctx, ctx.config.request_timeout, msg::update_atom::value, update);
  const double seconds = std::chrono::duration<double>(clock::now() - t0).count();
  if (auto* e = std::get_if<caf::error>(&r)) {
    const std::string why = "update request failed: " + describe(*e, ctx.config.request_timeout);
    spdlog::warn("refit serve: update from {} failed after {:.3f} s: {}", label, seconds, why);
    reply(res, status_for(*e) == 504 ? 504 : 500, failed_update_json(why, current_identity(ctx).weight_version));
    return;
  }
  auto& result = std::get<msg::update_result>(r);
  uint64_t bytes = 0;
  for (const auto& m : result.modules) bytes += m.bytes;
  const double total = result.timings.count("total") ? result.timings.at("total") : seconds;
  if (result.success) {
    if (update.source == msg::source_kind::checkpoint) remember(ctx, {update.model_path, result.weight_version});
    else current_identity(ctx);
    spdlog::info("refit serve: update from {} succeeded: weight_version {}, {} module report(s), {:.3f} GB in {:.3f} s ({:.2f} GB/s), {}",
                 label, result.weight_version, result.modules.size(), bytes / 1e9, total, gigabytes_per_second(bytes, total),
                 msg::to_string(result.mode));
  } else {
    spdlog::warn("refit serve: update from {} failed: weight_version stays {}, {:.3f} s: {}", label, result.weight_version, total,
                 result.message);
  }
  reply(res, result.success ? 200 : 400, update_result_json(result));
}

void update_weights_from_distributed(bridge_context& ctx, const http::request& req, http::response& res) {
  if (reject_unauthorized(ctx, req, res)) return;
  msg::update_request update;
  try {
    update = parse_distributed_update_request(req.body);
  } catch (const bad_request& e) {
    // Not even the group is known: nothing can take the trainer's broadcast.
    spdlog::warn("refit serve: distributed update rejected (400): {}", e.what());
    reply(res, 400, failed_update_json(std::string(e.what()) + ". No worker took the trainer's broadcast for this request",
                                       current_identity(ctx).weight_version));
    return;
  }
  run_update(ctx, update, "distributed group '" + update.group_name + "'", res);
}

// POST /init_weights_update_group and /destroy_weights_update_group: SGLang's {success, message}, 200 or 400.
void group_reply(const std::variant<msg::group_result, caf::error>& r, std::chrono::seconds timeout, http::response& res) {
  if (auto* e = std::get_if<caf::error>(&r)) {
    reply(res, status_for(*e) == 504 ? 504 : 500, group_result_json({false, describe(*e, timeout)}));
    return;
  }
  const auto& g = std::get<msg::group_result>(r);
  reply(res, g.success ? 200 : 400, group_result_json(g));
}

void init_weights_update_group(bridge_context& ctx, const http::request& req, http::response& res) {
  if (reject_unauthorized(ctx, req, res)) return;
  msg::group_request g;
  try {
    g = parse_group_request(req.body);
  } catch (const bad_request& e) {
    reply(res, 400, group_result_json({false, std::string("Failed to initialize custom process group: ") + e.what() + "."}));
    return;
  }
  group_reply(ask<msg::group_result>(ctx, ctx.config.request_timeout, msg::join_group_atom::value, g), ctx.config.request_timeout, res);
}

void destroy_weights_update_group(bridge_context& ctx, const http::request& req, http::response& res) {
  if (reject_unauthorized(ctx, req, res)) return;
  std::string name;
  try {
    name = parse_destroy_group_request(req.body);
  } catch (const bad_request& e) {
    reply(res, 400, group_result_json({false, std::string("Failed to destroy custom process group: ") + e.what() + "."}));
    return;
  }
  group_reply(ask<msg::group_result>(ctx, ctx.config.request_timeout, msg::leave_group_atom::value, name), ctx.config.request_timeout, res);
}

void weights_checksum(bridge_context& ctx, const http::request& req, http::response& res) {
  if (reject_unauthorized(ctx, req, res)) return;
  checksum_request q;
  try {
    q = parse_checksum_request(req.body);
  } catch (const bad_request& e) {
    reply(res, 400, error_json(e.what()));
    return;
  }
  // The protocol reads an empty list as "all"; a client asking for no module gets none.
  if (q.module_names && q.module_names->empty()) {
    reply(res, 200, checksums_json({}));
    return;
  }
  msg::checksum_request request{q.module_names.value_or(std::vector<std::string>{}), q.worker, q.format};
  auto r = ask<std::map<std::string, std::string>>(ctx, ctx.config.request_timeout, msg::checksum_atom::value, request);
  if (auto* e = std::get_if<caf::error>(&r)) {
    reply(res, status_for(*e), error_json(describe(*e, ctx.config.request_timeout)));
    return;
  }
  auto loras = ask<msg::lora_status>(ctx, query_timeout, msg::list_loras_atom::value);
  if (auto* status = std::get_if<msg::lora_status>(&loras); status && !status->active.empty()) {
    reply(res, 200, checksums_with_loras_json(std::get<0>(r), *status));
    return;
  }
  reply(res, 200, checksums_json(std::get<0>(r)));
}

void model_info(bridge_context& ctx, const http::request&, http::response& res) {
  auto r = ask<msg::model_info>(ctx, query_timeout, msg::info_atom::value);
  if (auto* e = std::get_if<caf::error>(&r)) {
    reply(res, status_for(*e), error_json(describe(*e, query_timeout)));
    return;
  }
  auto& info = std::get<msg::model_info>(r);
  remember(ctx, {info.model_path, info.weight_version});
  reply(res, 200, model_info_json(info));
}

// A random id for an image response (as SGLang's: 32 hex digits of a UUID4's randomness).
std::string new_response_id() {
  thread_local std::mt19937_64 rng{std::random_device{}()};
  char buf[33];
  std::snprintf(buf, sizeof buf, "%016llx%016llx", static_cast<unsigned long long>(rng()), static_cast<unsigned long long>(rng()));
  return buf;
}

// Served model ids: the model path served now, and the one the server started with.
bool serves_model(bridge_context& ctx, const std::string& model) {
  return model == ctx.started_with || model == current_identity(ctx).model_path;
}

void generate_images(bridge_context& ctx, const http::request& req, http::response& res) {
  image_request q;
  try {
    q = parse_image_request(req.body);
  } catch (const bad_request& e) {
    reply(res, 400, openai_error_json(e.what(), "invalid_request_error"));
    return;
  }
  if (q.model && !serves_model(ctx, *q.model)) {
    reply(res, 404, model_not_found_json(*q.model));
    return;
  }
  if (!q.seed_given) {
    thread_local std::mt19937_64 rng{std::random_device{}()};
    q.generation.seed = rng();
  }
  auto ticket = admit_generation(ctx, res, true);
  if (!ticket) return;
  if (!q.user.empty()) spdlog::info("http POST /v1/images/generations for user '{}'", q.user);
  const auto created = static_cast<int64_t>(std::time(nullptr));
  auto r = ask<msg::generation_result>(ctx, ctx.config.request_timeout, msg::generate_atom::value, q.generation);
  if (auto* e = std::get_if<caf::error>(&r)) {
    const int status = status_for(*e);
    reply(res, status, openai_error_json(describe(*e, ctx.config.request_timeout), status == 400 ? "invalid_request_error" : "server_error"));
    return;
  }
  auto& result = std::get<msg::generation_result>(r);
  const std::string id = new_response_id();
  std::vector<std::string> urls;
  if (q.url) {
    const std::string mime = result.format == msg::image_format::jpeg ? "image/jpeg" : result.format == msg::image_format::webp ? "image/webp" : "image/png";
    urls = ctx.images.put(id, result.images, mime);
  }
  reply(res, 200, image_result_json(result, created, id, urls));
}

// POST /rollout/generate: SGLang's RolloutRequest in, an msgpack list of RolloutResponse out.
void rollout(bridge_context& ctx, const http::request& req, http::response& res) {
  rollout_http_request q;
  try {
    q = parse_rollout_request(req.body);
  } catch (const bad_request& e) {
    reply(res, 400, detail_error_json(e.what()));
    return;
  }
  if (!q.seed_given) {
    thread_local std::mt19937_64 rng{std::random_device{}()};
    q.rollout.generation.seed = rng() >> 1;
  }
  q.rollout.request_id = new_response_id();
  auto ticket = admit_generation(ctx, res, false);
  if (!ticket) return;
  auto r = ask<msg::rollout_result>(ctx, ctx.config.request_timeout, msg::rollout_atom::value, q.rollout);
  if (auto* e = std::get_if<caf::error>(&r)) {
    reply(res, status_for(*e), detail_error_json(describe(*e, ctx.config.request_timeout)));
    return;
  }
  const auto& result = std::get<msg::rollout_result>(r);
  spdlog::info("http POST /rollout/generate {}: {} sample(s) with weight_version {} in {:.3f} s", result.request_id, result.samples.size(),
               result.weight_version, result.inference_time_s);
  res.set(200, rollout_response_msgpack(result), "application/msgpack");
}

// GET /v1/images/<id>/content[?variant=i]: an image of a response_format "url" reply, while it is kept.
void image_content(bridge_context& ctx, const http::request& req, http::response& res) {
  const std::string id = req.matches[1];
  size_t variant = 0;
  if (req.has_param("variant")) {
    const std::string v = req.param("variant");
    if (v.empty() || v.size() > 3 || v.find_first_not_of("0123456789") != std::string::npos) {
      reply(res, 400, openai_error_json("query parameter 'variant' must be an image index (0, 1, ...)", "invalid_request_error", "variant"));
      return;
    }
    variant = std::stoul(v);
  }
  auto found = ctx.images.get(id, variant);
  if (!found) {
    reply(res, 404, openai_error_json("image '" + id + "' (variant " + std::to_string(variant) + ") is not available: unknown, or no longer kept (images stay " +
                                          std::to_string(ctx.config.image_url_ttl.count()) + " s, at most " +
                                          std::to_string(ctx.config.image_store_bytes >> 20) + " MiB)",
                                      "invalid_request_error", "image_id", "image_not_found"));
    return;
  }
  res.set(200, std::string(reinterpret_cast<const char*>(found->bytes->data()), found->bytes->size()), found->mime);
}

void model_card(bridge_context& ctx, const http::request& req, http::response& res) {
  const std::string model = req.matches[1];
  if (serves_model(ctx, model)) reply(res, 200, model_card_json(model));
  else reply(res, 404, model_not_found_json(model));
}

void metrics(bridge_context& ctx, const http::request&, http::response& res) {
  auto r = ask<msg::scheduler_stats>(ctx, query_timeout, msg::stats_atom::value);
  if (auto* e = std::get_if<caf::error>(&r)) {
    reply(res, status_for(*e), error_json(describe(*e, query_timeout)));
    return;
  }
  const identity id = current_identity(ctx);
  res.set(200, prometheus_text(std::get<msg::scheduler_stats>(r), id.model_path, id.weight_version), "text/plain; version=0.0.4; charset=utf-8");
}

std::string reason_for(int status) {
  switch (status) {
    case 400: return "bad request";
    case 404: return "no such endpoint";
    case 405: return "method not allowed";
    case 408: return "request timeout";
    case 413: return "request body too large";
    case 414: return "request URI too long";
    case 431: return "request header fields too large";
    case 503: return "service unavailable";
    default: return "HTTP error " + std::to_string(status);
  }
}

void install_routes(http::server& srv, std::shared_ptr<bridge_context> ctx) {
  auto route = [ctx](void (*fn)(bridge_context&, const http::request&, http::response&)) {
    return [ctx, fn](const http::request& req, http::response& res) { fn(*ctx, req, res); };
  };
  srv.route("POST", "/update_weights_from_disk", route(update_weights));
  srv.route("POST", "/init_weights_update_group", route(init_weights_update_group));
  srv.route("POST", "/update_weights_from_distributed", route(update_weights_from_distributed));
  srv.route("POST", "/update_weights_from_tensor", route(update_weights_from_tensor));
  srv.route("POST", "/release_memory_occupation", route(release_memory_occupation));
  srv.route("POST", "/resume_memory_occupation", route(resume_memory_occupation));
  srv.route("POST", "/update_weights_from_tensor_checker", route(update_weights_from_tensor_checker));
  srv.route("POST", "/destroy_weights_update_group", route(destroy_weights_update_group));
  srv.route("POST", "/get_weights_checksum", route(weights_checksum));
  srv.route("POST", "/v1/set_lora", route(set_lora));
  srv.route("POST", "/v1/merge_lora_weights", route(merge_lora));
  srv.route("POST", "/v1/unmerge_lora_weights", route(unmerge_lora));
  srv.route("GET", "/v1/list_loras", route(list_loras));
  srv.route("GET", "/get_model_info", route(model_info));
  srv.route("GET", "/v1/model_info", route(model_info));
  srv.route("POST", "/v1/images/generations", route(generate_images));
  srv.route("POST", "/rollout/generate", route(rollout));
  srv.route("GET", R"(/v1/images/([0-9A-Za-z_-]+)/content)", route(image_content));
  srv.route("GET", R"(/v1/models/(.+))", route(model_card));
  srv.route("GET", "/metrics", route(metrics));
  srv.route("GET", "/v1/models", [ctx](const http::request&, http::response& res) {
    reply(res, 200, models_list_json(current_identity(*ctx).model_path));
  });
  // Answered on an I/O thread: a probe gets its answer even while every handler thread waits on generations.
  srv.route("GET", "/health", [](const http::request&, http::response& res) { reply(res, 200, health_json()); },
            http::server::dispatch::inline_io);

  // Errors the server produces itself get a JSON body in the OpenAI error shape the other errors use.
  srv.on_error([](int status, const http::request& req, const std::string& detail, http::response& res) {
    std::string message = reason_for(status);
    if (status == 404 || status == 405) message += ": " + req.method + " " + req.path;
    if (status == 405) message += " (allowed: " + detail + ")";
    else if (status != 404) message += ": " + detail;
    if (status >= 400 && status != 404 && status != 405)
      spdlog::warn("http {} {} from {}: {} {}", req.method.empty() ? "-" : req.method, req.path.empty() ? "-" : req.path, req.remote_addr,
                   status, message);
    reply(res, status, openai_error_json(message, "invalid_request_error"));
  });
  // Handlers catch what a client can cause; this keeps anything else from taking the server down.
  srv.on_exception([](const http::request& req, const std::string& what, http::response& res) {
    spdlog::error("http {} {}: internal error: {}", req.method, req.path, what);
    reply(res, 500, error_json("internal error: " + what));
  });
  srv.on_request([](const http::request& req, int status, double ms) {
    // Probes and scrapes arrive every few seconds; keep them out of the info log.
    const bool routine = req.method == "GET" && (req.path == "/health" || req.path == "/metrics");
    spdlog::log(routine ? spdlog::level::debug : spdlog::level::info, "http {} {} {} {:.1f} ms", req.method, req.path, status, ms);
  });
}

struct bridge_state {
  std::shared_ptr<http::server> server;
  std::shared_ptr<bridge_context> ctx;
  std::string url;
  // The actor's exit closes every connection, whoever else still holds the server.
  ~bridge_state() {
    if (ctx) ctx->closing = true;
    if (server) server->stop();
  }
  static inline const char* name = "refit.http_bridge";
};

}  // namespace bridge

using namespace bridge;

http_bridge spawn_http_bridge(caf::actor_system& sys, msg::client_api_actor scheduler, http_bridge_config config) {
  auto ctx = std::make_shared<bridge_context>(sys, scheduler, config);
  {
    auto r = ask<msg::model_info>(*ctx, query_timeout, msg::info_atom::value);
    if (auto* info = std::get_if<msg::model_info>(&r)) ctx->known = {info->model_path, info->weight_version};
    ctx->started_with = ctx->known.model_path;
  }
  http::server_config sc;
  sc.max_body_bytes = config.max_request_bytes;
  sc.read_timeout = config.read_timeout;
  sc.max_connections = config.max_connections;
  // Generations hold a handler thread while they wait: room for all that admission lets in, plus queries.
  sc.max_handler_threads = static_cast<unsigned>(std::min<size_t>(config.workers + config.max_queued_requests + 64, 4096));
  auto server = std::make_shared<http::server>(sc);
  install_routes(*server, ctx);
  const uint16_t port = server->listen(config.host, config.port);
  const std::string url = "http://" + config.host + ":" + std::to_string(port);
  // Detached: shutdown_atom waits for in-flight requests, which must not hold a thread of CAF's shared pool
  // (the scheduler needs it to answer them).
  auto actor = sys.spawn<caf::detached>(
      [server, ctx, scheduler, url](msg::http_bridge_actor::stateful_pointer<bridge_state> self) -> msg::http_bridge_actor::behavior_type {
        self->state.server = server;
        self->state.ctx = ctx;
        self->state.url = url;
        self->monitor(scheduler);
        self->set_down_handler([self](caf::down_msg& dm) {
          spdlog::error("http bridge: the scheduler went down ({}); stopping the HTTP server", caf::to_string(dm.reason));
          self->quit(dm.reason);
        });
        return {[self](msg::info_atom) { return self->state.url; },
                [self](msg::shutdown_atom, int64_t wait_ms) -> uint64_t {
                  return self->state.server->drain(std::chrono::milliseconds(std::max<int64_t>(0, wait_ms)));
                }};
      });
  return {actor, port};
}

}  // namespace refit::net
