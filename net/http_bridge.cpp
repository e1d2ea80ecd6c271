#include "net/http_bridge.hpp"

#include <httplib.h>
#include <spdlog/spdlog.h>
#include <sys/socket.h>

#include <algorithm>
#include <ctime>
#include <mutex>
#include <random>
#include <regex>
#include <thread>
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

// httplib serves one request start to end on one pool thread, so the pre-routing handler can leave
// the start time here for the logger.
thread_local clock::time_point request_start{};

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

void reply(httplib::Response& res, int status, std::string body) {
  res.status = status;
  res.set_content(std::move(body), "application/json");
}

// Constant time, so the key cannot be guessed byte by byte from response latency.
bool authorized(const bridge_context& ctx, const httplib::Request& req) {
  if (ctx.config.api_key.empty()) return true;
  const std::string got = req.get_header_value("Authorization"), want = "Bearer " + ctx.config.api_key;
  unsigned diff = got.size() == want.size() ? 0u : 1u;
  for (size_t i = 0; i < got.size() && i < want.size(); ++i) diff |= static_cast<unsigned char>(got[i] ^ want[i]);
  return diff == 0;
}

bool reject_unauthorized(const bridge_context& ctx, const httplib::Request& req, httplib::Response& res) {
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


void update_weights(bridge_context& ctx, const httplib::Request& req, httplib::Response& res) {
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
void run_update(bridge_context& ctx, const msg::update_request& update, const std::string& label, httplib::Response& res) {
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

void update_weights_from_distributed(bridge_context& ctx, const httplib::Request& req, httplib::Response& res) {
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
void group_reply(const std::variant<msg::group_result, caf::error>& r, std::chrono::seconds timeout, httplib::Response& res) {
  if (auto* e = std::get_if<caf::error>(&r)) {
    reply(res, status_for(*e) == 504 ? 504 : 500, group_result_json({false, describe(*e, timeout)}));
    return;
  }
  const auto& g = std::get<msg::group_result>(r);
  reply(res, g.success ? 200 : 400, group_result_json(g));
}

void init_weights_update_group(bridge_context& ctx, const httplib::Request& req, httplib::Response& res) {
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

void destroy_weights_update_group(bridge_context& ctx, const httplib::Request& req, httplib::Response& res) {
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

void weights_checksum(bridge_context& ctx, const httplib::Request& req, httplib::Response& res) {
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

void model_info(bridge_context& ctx, const httplib::Request&, httplib::Response& res) {
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

void generate_images(bridge_context& ctx, const httplib::Request& req, httplib::Response& res) {
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
void rollout(bridge_context& ctx, const httplib::Request& req, httplib::Response& res) {
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
  auto r = ask<msg::rollout_result>(ctx, ctx.config.request_timeout, msg::rollout_atom::value, q.rollout);
  if (auto* e = std::get_if<caf::error>(&r)) {
    reply(res, status_for(*e), detail_error_json(describe(*e, ctx.config.request_timeout)));
    return;
  }
  const auto& result = std::get<msg::rollout_result>(r);
  spdlog::info("http POST /rollout/generate {}: {} sample(s) with weight_version {} in {:.3f} s", result.request_id, result.samples.size(),
               result.weight_version, result.inference_time_s);
  res.status = 200;
  res.set_content(rollout_response_msgpack(result), "application/msgpack");
}

// GET /v1/images/<id>/content[?variant=i]: an image of a response_format "url" reply, while it is kept.
void image_content(bridge_context& ctx, const httplib::Request& req, httplib::Response& res) {
  const std::string id = req.matches[1];
  size_t variant = 0;
  if (req.has_param("variant")) {
    const std::string v = req.get_param_value("variant");
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
  res.status = 200;
  res.set_content(reinterpret_cast<const char*>(found->bytes->data()), found->bytes->size(), found->mime);
}

void model_card(bridge_context& ctx, const httplib::Request& req, httplib::Response& res) {
  const std::string model = req.matches[1];
  if (serves_model(ctx, model)) reply(res, 200, model_card_json(model));
  else reply(res, 404, model_not_found_json(model));
}

void metrics(bridge_context& ctx, const httplib::Request&, httplib::Response& res) {
  auto r = ask<msg::scheduler_stats>(ctx, query_timeout, msg::stats_atom::value);
  if (auto* e = std::get_if<caf::error>(&r)) {
    reply(res, status_for(*e), error_json(describe(*e, query_timeout)));
    return;
  }
  const identity id = current_identity(ctx);
  res.status = 200;
  res.set_content(prometheus_text(std::get<msg::scheduler_stats>(r), id.model_path, id.weight_version), "text/plain; version=0.0.4; charset=utf-8");
}

std::string reason_for(int status) {
  switch (status) {
    case 400: return "bad request (malformed HTTP, or a POST without a body and Content-Length)";
    case 404: return "no such endpoint";
    case 405: return "method not allowed";
    case 413: return "request body too large";
    case 414: return "request URI too long";
    default: return "HTTP error " + std::to_string(status);
  }
}

// The methods each path answers, for 405 replies (the routes below).
std::string allowed_methods(const std::string& path) {
  static const std::vector<std::pair<std::regex, std::string>> table = {
      {std::regex("/update_weights_from_disk|/update_weights_from_distributed|/init_weights_update_group|/destroy_weights_update_group|"
                  "/get_weights_checksum|/v1/images/generations|/rollout/generate"),
       "POST"},
      {std::regex("/get_model_info|/v1/model_info|/metrics|/health|/v1/models|/v1/models/.+|/v1/images/[0-9A-Za-z_-]+/content"), "GET"},
  };
  for (const auto& [pattern, methods] : table)
    if (std::regex_match(path, pattern)) return methods;
  return {};
}

void install_routes(httplib::Server& srv, std::shared_ptr<bridge_context> ctx) {
  auto route = [ctx](void (*fn)(bridge_context&, const httplib::Request&, httplib::Response&)) {
    return [ctx, fn](const httplib::Request& req, httplib::Response& res) { fn(*ctx, req, res); };
  };
  srv.Post("/update_weights_from_disk", route(update_weights));
  srv.Post("/init_weights_update_group", route(init_weights_update_group));
  srv.Post("/update_weights_from_distributed", route(update_weights_from_distributed));
  srv.Post("/update_weights_from_tensor", route(update_weights_from_tensor));
  srv.Post("/release_memory_occupation", route(release_memory_occupation));
  srv.Post("/resume_memory_occupation", route(resume_memory_occupation));
  srv.Post("/update_weights_from_tensor_checker", route(update_weights_from_tensor_checker));
  srv.Post("/destroy_weights_update_group", route(destroy_weights_update_group));
  srv.Post("/get_weights_checksum", route(weights_checksum));
  srv.Post("/v1/set_lora", route(set_lora));
  srv.Post("/v1/merge_lora_weights", route(merge_lora));
  srv.Post("/v1/unmerge_lora_weights", route(unmerge_lora));
  srv.Get("/v1/list_loras", route(list_loras));
  srv.Get("/get_model_info", route(model_info));
  srv.Get("/v1/model_info", route(model_info));
  srv.Post("/v1/images/generations", route(generate_images));
  srv.Post("/rollout/generate", route(rollout));
  srv.Get(R"(/v1/images/([0-9A-Za-z_-]+)/content)", route(image_content));
  srv.Get(R"(/v1/models/(.+))", route(model_card));
  srv.Get("/metrics", route(metrics));
  srv.Get("/health", [](const httplib::Request&, httplib::Response& res) { reply(res, 200, health_json()); });
  srv.Get("/v1/models", [ctx](const httplib::Request&, httplib::Response& res) {
    reply(res, 200, models_list_json(current_identity(*ctx).model_path));
  });

  const size_t max_bytes = ctx->config.max_request_bytes;
  // Errors httplib produces itself (404, 405, 413, a malformed request line) get a JSON body too, in the
  // OpenAI error shape that the other errors use; a known path asked with another method is 405.
  srv.set_error_handler(httplib::Server::HandlerWithResponse([max_bytes](const httplib::Request& req, httplib::Response& res) {
    if (!res.body.empty()) return httplib::Server::HandlerResponse::Unhandled;  // a handler already answered
    if (res.status == 404) {
      if (const std::string allow = allowed_methods(req.path); !allow.empty()) {
        res.status = 405;
        res.set_header("Allow", allow);
      }
    }
    std::string message = reason_for(res.status);
    if (res.status == 413) message += ": the limit is " + std::to_string(max_bytes) + " bytes (--max-request-bytes)";
    if (res.status == 404 || res.status == 405) message += ": " + req.method + " " + req.path;
    if (res.status == 405) message += " (allowed: " + res.get_header_value("Allow") + ")";
    reply(res, res.status, openai_error_json(message, "invalid_request_error"));
    return httplib::Server::HandlerResponse::Handled;
  }));
  // Handlers catch what a client can cause; this keeps anything else from taking the server down.
  srv.set_exception_handler([](const httplib::Request& req, httplib::Response& res, std::exception_ptr ep) {
    std::string what = "unknown exception";
    try {
      std::rethrow_exception(ep);
    } catch (const std::exception& e) {
      what = e.what();
    } catch (...) {
    }
    spdlog::error("http {} {}: internal error: {}", req.method, req.path, what);
    reply(res, 500, error_json("internal error: " + what));
  });
  srv.set_pre_routing_handler([](const httplib::Request&, httplib::Response&) {
    request_start = clock::now();
    return httplib::Server::HandlerResponse::Unhandled;
  });
  srv.set_logger([](const httplib::Request& req, const httplib::Response& res) {
    const double ms = request_start == clock::time_point{} ? 0.0 : std::chrono::duration<double, std::milli>(clock::now() - request_start).count();
    request_start = {};
    // Probes and scrapes arrive every few seconds; keep them out of the info log.
    const bool routine = req.method == "GET" && (req.path == "/health" || req.path == "/metrics");
    spdlog::log(routine ? spdlog::level::debug : spdlog::level::info, "http {} {} {} {:.1f} ms", req.method, req.path, res.status, ms);
  });
  srv.set_payload_max_length(max_bytes);
  // httplib's default adds SO_REUSEPORT, which lets a second server bind the same port and silently
  // take half the traffic; SO_REUSEADDR alone still allows a restart over TIME_WAIT sockets.
  srv.set_socket_options([](socket_t sock) {
    int yes = 1;
    ::setsockopt(sock, SOL_SOCKET, SO_REUSEADDR, &yes, sizeof yes);
  });
  // Each generation holds a pool thread while it waits for its image; keep room for probes beside them.
  srv.new_task_queue = [] { return new httplib::ThreadPool(std::max(32u, 4 * std::thread::hardware_concurrency())); };
}

// Owns the server and its listening thread. stop() waits for in-flight requests to finish, then
// drops the handlers and with them the scheduler handle.
struct http_listener {
  std::unique_ptr<httplib::Server> server = std::make_unique<httplib::Server>();
  std::thread thread;
  void stop() {
    if (!server) return;
    server->stop();
    if (thread.joinable()) thread.join();
    server.reset();
  }
  ~http_listener() { stop(); }
};

struct bridge_state {
  std::shared_ptr<http_listener> listener;
  std::string url;
  // The actor's exit stops the server, whoever else still holds the listener.
  ~bridge_state() {
    if (listener) listener->stop();
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
  auto listener = std::make_shared<http_listener>();
  install_routes(*listener->server, ctx);
  int port = config.port;
  if (config.port == 0) port = listener->server->bind_to_any_port(config.host);
  else if (!listener->server->bind_to_port(config.host, config.port)) port = -1;
  if (port <= 0)
    throw std::runtime_error("cannot listen on " + config.host + ":" + std::to_string(config.port) + " (address in use or not local?)");
  listener->thread = std::thread([srv = listener->server.get()] { srv->listen_after_bind(); });
  // stop() is a no-op until the accept loop runs, so wait for it before anyone may stop us.
  const auto deadline = clock::now() + std::chrono::seconds(30);
  while (!listener->server->is_running()) {
    if (clock::now() > deadline) throw std::runtime_error("the HTTP server did not start within 30 s");
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  const std::string url = "http://" + config.host + ":" + std::to_string(port);
  // Detached: stopping the server blocks until in-flight requests finish, which must not hold a
  // thread of CAF's shared pool (the scheduler needs it to answer them).
  auto actor = sys.spawn<caf::detached>(
      [listener, scheduler, url](msg::http_bridge_actor::stateful_pointer<bridge_state> self) -> msg::http_bridge_actor::behavior_type {
        self->state.listener = listener;
        self->state.url = url;
        self->monitor(scheduler);
        self->set_down_handler([self](caf::down_msg& dm) {
          spdlog::error("http bridge: the scheduler went down ({}); stopping the HTTP server", caf::to_string(dm.reason));
          self->quit(dm.reason);
        });
        return {[self](msg::info_atom) { return self->state.url; }};
      });
  return {actor, static_cast<uint16_t>(port)};
}

}  // namespace refit::net
