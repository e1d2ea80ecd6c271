// refit's HTTP/1.1 server: asynchronous I/O (Boost.Beast on Asio, a few I/O threads for every connection)
// and a pool of handler threads that only ever sees requests that were read whole. A connection costs
// a socket and a buffer, never a thread, so slow or idle clients cannot starve anyone; each request must
// arrive whole (headers and body) within `read_timeout`, else it gets 408 and the connection is closed.
// Handlers are plain blocking functions (the bridge's ask the scheduler and wait); "inline" routes
// (no blocking, e.g. /health) run on an I/O thread and answer even when every handler thread is busy.
// No Beast or Asio in this header: the handler files include it.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace refit::net::http {

struct request {
  std::string method;       // "GET", "POST", ...
  std::string path;         // percent-decoded, without the query
  std::string query;        // raw, after '?'
  std::string body;
  std::string remote_addr;  // "IP:port"
  std::vector<std::pair<std::string, std::string>> headers;
  std::vector<std::string> matches;  // the route pattern's capture groups, [0] = the whole path

  // Case-insensitive; empty when absent.
  std::string header(std::string_view name) const;
  bool has_param(std::string_view key) const;
  std::string param(std::string_view key) const;  // percent-decoded; empty when absent
};

struct response {
  int status = 200;
  std::string body;
  std::string content_type = "application/json";
  std::vector<std::pair<std::string, std::string>> headers;

  void set(int code, std::string content, std::string type = "application/json") {
    status = code;
    body = std::move(content);
    content_type = std::move(type);
  }
  void set_header(std::string name, std::string value) { headers.emplace_back(std::move(name), std::move(value)); }
  std::string header(std::string_view name) const;
};

using handler = std::function<void(const request&, response&)>;

// %XX escapes decoded (and '+' as a space when `plus_is_space`); nullopt for a malformed escape or an encoded
// NUL (which would cut the text short wherever it is used).
std::optional<std::string> percent_decode(std::string_view s, bool plus_is_space);

struct server_config {
  size_t max_body_bytes = 1 << 20;     // larger bodies: 413
  size_t max_header_bytes = 16 << 10;  // request line + headers; larger: 431
  // A request (its headers and body) must arrive within this from its first byte; an idle keep-alive
  // connection is closed after it.
  std::chrono::milliseconds read_timeout{30000};
  std::chrono::milliseconds write_timeout{60000};
  size_t max_connections = 4096;  // beyond: accepted and closed at once
  unsigned io_threads = 2;
  unsigned max_handler_threads = 256;  // beyond: requests wait for a free handler thread
};

// What the server says about a request it answers itself (400, 404, 405, 408, 413, 431, 503): the
// bridge renders these in its error shape. `allow` is set for 405.
using error_renderer = std::function<void(int status, const request& req, const std::string& reason, response& res)>;
// After every answered request: method, path, status, milliseconds from its first byte to the reply.
using request_logger = std::function<void(const request& req, int status, double ms)>;

class server {
 public:
  explicit server(server_config config);
  ~server();  // stop(): closes connections; a handler still running past stop() keeps only its own state alive
  server(const server&) = delete;
  server& operator=(const server&) = delete;

  enum class dispatch { pool, inline_io };
  // `pattern`: an ECMAScript regex the whole path must match; its groups land in request::matches.
  void route(std::string method, std::string pattern, handler h, dispatch d = dispatch::pool);
  void on_error(error_renderer r);
  void on_request(request_logger l);
  // Handlers throw only on bugs; this renders the 500.
  void on_exception(std::function<void(const request&, const std::string& what, response&)> f);

  // Binds (port 0: an ephemeral one) and starts serving; returns the bound port. Throws std::runtime_error.
  uint16_t listen(const std::string& host, uint16_t port);
  // Stops accepting; requests that arrive later on open connections get 503 and the connection closes;
  // waits at most `wait` for the requests being handled. Returns how many still run.
  size_t drain(std::chrono::milliseconds wait);
  // drain(0), then closes every connection and stops the I/O threads.
  void stop();
  // Requests being handled now (read whole, not yet answered), and open connections.
  size_t in_flight() const;
  size_t connections() const;

  struct impl;  // defined in http_server.cpp

 private:
  std::shared_ptr<impl> impl_;
};

}  // namespace refit::net::http
