#include "net/http_server.hpp"

#include "net/handler_pool.hpp"

#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/dispatch.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/strand.hpp>
#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <spdlog/spdlog.h>
#include <sys/resource.h>

#include <atomic>
#include <cstdio>
#include <system_error>
#include <condition_variable>
#include <deque>
#include <future>
#include <mutex>
#include <optional>
#include <regex>
#include <set>
#include <thread>

namespace refit::net::http {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace bhttp = boost::beast::http;
using tcp = asio::ip::tcp;
using clock = std::chrono::steady_clock;

namespace {

// Request targets longer than this get 414 before any route pattern sees them.
constexpr size_t max_target_bytes = 4096;

std::string seconds_text(std::chrono::milliseconds ms) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", static_cast<double>(ms.count()) / 1000.0);
  return buf;
}

}  // namespace

namespace {

struct route_entry {
  std::string method;
  std::regex pattern;
  handler fn;
  server::dispatch how;
};

}  // namespace

struct session;

// ---------------------------------------------------------------------------------------------
// The server's state, shared by its connections and the handler tasks, so that a handler still
// running when the server is destroyed finds what it needs.

struct server::impl : std::enable_shared_from_this<server::impl> {
  explicit impl(server_config c) : config(std::move(c)), pool(std::make_shared<handler_pool>(config.max_handler_threads)) {}

  server_config config;
  asio::io_context io{static_cast<int>(std::max(1u, config.io_threads))};
  std::optional<tcp::acceptor> acceptor;
  // Keeps the I/O threads running while no operation is pending (the acceptor closed, replies still to come).
  std::optional<asio::executor_work_guard<asio::io_context::executor_type>> keep_running;
  std::vector<std::thread> io_threads;
  std::shared_ptr<handler_pool> pool;
  std::vector<route_entry> routes;
  error_renderer render_error;
  request_logger log_request;
  std::function<void(const request&, const std::string&, response&)> render_exception;

  std::atomic<bool> draining{false};
  mutable std::mutex mu;
  std::condition_variable idle;
  size_t handling = 0;   // guarded by mu
  bool stopped = false;  // guarded by mu: stop() closed the connections; nothing more is posted to the I/O threads
  std::set<std::shared_ptr<session>> sessions;  // guarded by mu; so stop() can close them
  std::optional<asio::steady_timer> accept_retry;  // after an accept error (out of descriptors): retry later, not at once

  void accept();
  void finished_handling() {
    std::lock_guard lock(mu);
    --handling;
    idle.notify_all();
  }
};

namespace {

std::string allowed_methods(const std::vector<route_entry>& routes, const std::string& path) {
  std::string allow;
  for (const auto& r : routes)
    if (std::regex_match(path, r.pattern) && allow.find(r.method) == std::string::npos) allow += (allow.empty() ? "" : ", ") + r.method;
  return allow;
}

}  // namespace

struct session : std::enable_shared_from_this<session> {
  session(tcp::socket s, std::shared_ptr<server::impl> owner) : stream(std::move(s)), srv(std::move(owner)) {
    beast::error_code ec;
    const auto ep = stream.socket().remote_endpoint(ec);
    if (!ec) remote = ep.address().to_string() + ":" + std::to_string(ep.port());
  }

  beast::tcp_stream stream;
  std::shared_ptr<server::impl> srv;
  // The read deadline cancels the read rather than closing the socket (as the stream's own timeout
  // would), so the client still gets its 408. `deadline_armed` tells a stale expiry (one already queued when
  // the read finished) from the current one.
  asio::steady_timer read_deadline{stream.get_executor()};
  uint64_t deadline_armed = 0;
  bool read_timed_out = false;
  bool counted = false;  // a pooled request of this connection is in impl::handling until its reply is written
  std::shared_ptr<bhttp::response<bhttp::empty_body>> continue_reply;
  beast::flat_buffer buffer;
  std::optional<bhttp::request_parser<bhttp::string_body>> parser;
  bhttp::response<bhttp::string_body> reply;
  std::string remote;
  request current;
  clock::time_point started{};
  bool keep_alive = false;

  void start() { read_next(); }

  void arm_deadline(std::chrono::milliseconds after) {
    const uint64_t armed = ++deadline_armed;
    read_timed_out = false;
    read_deadline.expires_after(after);
    read_deadline.async_wait([self = shared_from_this(), armed](beast::error_code ec) {
      if (ec || armed != self->deadline_armed) return;  // cancelled, or the read it was armed for is over
      self->read_timed_out = true;
      // cancel() only reaches a read that is pending right now; a composed read (header, body) between two of its
      // reads would go on reading a trickling client. Shutting the receive side ends that next read too (EOF),
      // and the 408 can still be written.
      beast::error_code ignored;
      self->stream.socket().cancel(ignored);
      self->stream.socket().shutdown(tcp::socket::shutdown_receive, ignored);
    });
  }

  void disarm_deadline() {
    ++deadline_armed;
    read_deadline.cancel();
  }

  // An idle connection waits for the first byte of its next request (at most read_timeout, then it closes
  // quietly); from that byte the whole request has read_timeout to arrive.
  void read_next() {
    parser.emplace();
    parser->body_limit(srv->config.max_body_bytes);
    parser->header_limit(static_cast<uint32_t>(srv->config.max_header_bytes));
    stream.expires_never();
    if (buffer.size() > 0) return read_request();  // a pipelined request is already here
    arm_deadline(srv->config.read_timeout);
    stream.async_read_some(buffer.prepare(4096), [self = shared_from_this()](beast::error_code ec, size_t n) {
      self->buffer.commit(n);
      // The idle deadline passed as this byte came (its receive side is shut): the read ends with the 408.
      if (ec || n == 0 || self->read_timed_out) return self->on_read(ec ? ec : bhttp::error::end_of_stream);
      self->read_request();
    });
  }

  void read_request() {
    started = clock::now();
    // One deadline for the whole request: a client trickling bytes cannot extend it.
    arm_deadline(srv->config.read_timeout);
    bhttp::async_read_header(stream, buffer, *parser, [self = shared_from_this()](beast::error_code ec, size_t) { self->on_header(ec); });
  }

  // A client that sent "Expect: 100-continue" (curl does, for larger bodies) waits for this before sending the
  // body; the read deadline still covers the whole request.
  void on_header(beast::error_code ec) {
    if (ec || parser->is_done()) return on_read(ec);
    const auto& h = parser->get();
    const auto expect = h[bhttp::field::expect];
    if (beast::iequals(expect, "100-continue") && !srv->draining) {
      continue_reply = std::make_shared<bhttp::response<bhttp::empty_body>>(bhttp::status::continue_, 11);
      bhttp::async_write(stream, *continue_reply, [self = shared_from_this()](beast::error_code ec, size_t) {
        if (ec) return self->on_read(ec);
        self->read_body();
      });
      return;
    }
    read_body();
  }

  void read_body() {
    bhttp::async_read(stream, buffer, *parser, [self = shared_from_this()](beast::error_code ec, size_t) { self->on_read(ec); });
  }

  void on_read(beast::error_code ec) {
    disarm_deadline();
    if (read_timed_out) ec = beast::error::timeout;
    if (ec == bhttp::error::end_of_stream || ec == asio::error::connection_reset || ec == asio::error::operation_aborted) return close();
    const bool got_bytes = parser && (parser->got_some() || buffer.size() > 0);
    if (ec) {
      current = request{};
      current.remote_addr = remote;
      if (parser && parser->is_header_done()) {
        current.method = std::string(parser->get().method_string());
        current.path = std::string(parser->get().target().substr(0, parser->get().target().find('?')));
      }
      keep_alive = false;
      if (ec == beast::error::timeout) {
        if (!got_bytes) return close();  // an idle keep-alive connection
        return answer_error(408, "the request did not arrive whole within " + seconds_text(srv->config.read_timeout) + " s of its first byte");
      }
      if (ec == bhttp::error::body_limit)
        return answer_error(413, "request body too large: the limit is " + std::to_string(srv->config.max_body_bytes) + " bytes (--max-request-bytes)");
      if (ec == bhttp::error::header_limit)
        return answer_error(431, "request header fields too large: the limit is " + std::to_string(srv->config.max_header_bytes) + " bytes");
      if (!got_bytes) return close();
      return answer_error(400, "malformed HTTP request (" + ec.message() + ")");
    }
    auto& msg = parser->get();
    keep_alive = msg.keep_alive();
    current = request{};
    current.remote_addr = remote;
    current.method = std::string(msg.method_string());
    const std::string_view target(msg.target().data(), msg.target().size());
    if (target.size() > max_target_bytes) {
      current.path = std::string(target.substr(0, 64)) + "...";
      keep_alive = false;
      return answer_error(414, "the request target is " + std::to_string(target.size()) + " bytes long; at most " +
                                   std::to_string(max_target_bytes) + " are allowed");
    }
    const size_t q = target.find('?');
    auto path = percent_decode(target.substr(0, q), false);
    if (q != std::string_view::npos) current.query = std::string(target.substr(q + 1));
    for (const auto& f : msg) current.headers.emplace_back(std::string(f.name_string()), std::string(f.value()));
    current.body = std::move(msg.body());
    if (!path || path->empty() || (*path)[0] != '/') {
      current.path = std::string(target.substr(0, q));
      keep_alive = false;
      return answer_error(400, "malformed request target");
    }
    current.path = std::move(*path);
    if (srv->draining) {
      keep_alive = false;
      return answer_error(503, "the server is shutting down");
    }
    const route_entry* found = nullptr;
    std::smatch m;
    for (const auto& r : srv->routes)
      if (r.method == current.method && std::regex_match(current.path, m, r.pattern)) {
        found = &r;
        current.matches.assign(m.begin(), m.end());
        break;
      }
    if (!found) {
      const std::string allow = allowed_methods(srv->routes, current.path);
      if (!allow.empty()) return answer_error(405, allow);
      return answer_error(404, "no such endpoint");
    }
    if (found->how == server::dispatch::inline_io) {
      response res;
      run_handler(*found, res);
      return write(std::move(res));
    }
    {
      std::lock_guard lock(srv->mu);
      if (srv->draining) {  // checked again with the count, so drain() cannot miss this request
        keep_alive = false;
        return answer_error(503, "the server is shutting down");
      }
      ++srv->handling;
    }
    counted = true;  // until its reply is written: drain() waits for that
    srv->pool->post([self = shared_from_this(), fn = found]() {
      response res;
      self->run_handler(*fn, res);
      std::lock_guard lock(self->srv->mu);
      if (self->srv->stopped) return;  // the connection is closed; nothing is posted to stopped I/O threads
      asio::post(self->stream.get_executor(), [self, res = std::move(res)]() mutable { self->write(std::move(res)); });
    });
  }

  void run_handler(const route_entry& r, response& res) {
    try {
      r.fn(current, res);
    } catch (const std::exception& e) {
      res = response{};
      if (srv->render_exception) srv->render_exception(current, e.what(), res);
      else res.set(500, "internal error");
    } catch (...) {
      res = response{};
      if (srv->render_exception) srv->render_exception(current, "unknown exception", res);
      else res.set(500, "internal error");
    }
  }

  // `reason` is the Allow list for 405.
  void answer_error(int status, const std::string& reason) {
    response res;
    res.status = status;
    if (status == 405) res.set_header("Allow", reason);
    if (srv->render_error) srv->render_error(status, current, reason, res);
    else res.set(status, reason, "text/plain");
    write(std::move(res));
  }

  void write(response res) {
    reply = {};
    reply.version(11);
    reply.result(static_cast<unsigned>(res.status >= 100 && res.status <= 599 ? res.status : 500));
    reply.set(bhttp::field::content_type, res.content_type);
    for (auto& [k, v] : res.headers) reply.insert(k, v);
    if (srv->draining) keep_alive = false;
    reply.keep_alive(keep_alive);
    reply.body() = std::move(res.body);
    reply.prepare_payload();
    if (srv->log_request) {
      const double ms = started == clock::time_point{} ? 0.0 : std::chrono::duration<double, std::milli>(clock::now() - started).count();
      srv->log_request(current, res.status, ms);
    }
    stream.expires_after(srv->config.write_timeout);
    bhttp::async_write(stream, reply, [self = shared_from_this()](beast::error_code ec, size_t) {
      if (self->counted) {
        self->counted = false;
        self->srv->finished_handling();
      }
      // An idle connection keeps neither its last request nor its reply (a body, an image) in memory.
      self->reply = {};
      self->current = request{};
      if (self->buffer.capacity() > 64 * 1024 && self->buffer.size() == 0) self->buffer = beast::flat_buffer{};
      if (ec || !self->keep_alive || self->srv->draining) return self->close();
      self->read_next();
    });
  }

  void close() {
    disarm_deadline();
    beast::error_code ec;
    stream.socket().shutdown(tcp::socket::shutdown_both, ec);
    stream.close();
    std::lock_guard lock(srv->mu);
    srv->sessions.erase(shared_from_this());
  }
};

// The acceptor lives on its own strand (drain() closes it there). An accept error (out of descriptors, say)
// is retried 100 ms later, not at once: the failing connection stays in the backlog and would fail again.
void server::impl::accept() {
  acceptor->async_accept(asio::make_strand(io), [self = shared_from_this()](beast::error_code ec, tcp::socket socket) {
    if (ec == asio::error::operation_aborted || !self->acceptor->is_open()) return;
    if (ec) {
      static std::atomic<uint64_t> failures{0};
      if (failures++ % 100 == 0) spdlog::warn("http: accept failed ({} so far): {}; retrying in 100 ms", failures.load(), ec.message());
      self->accept_retry.emplace(self->acceptor->get_executor(), std::chrono::milliseconds(100));
      self->accept_retry->async_wait([self](beast::error_code e) {
        if (!e && self->acceptor->is_open()) self->accept();
      });
      return;
    }
    std::shared_ptr<session> s;
    {
      std::lock_guard lock(self->mu);
      if (self->stopped || self->sessions.size() >= self->config.max_connections) {
        static std::atomic<uint64_t> refused{0};
        if (!self->stopped && refused++ % 1000 == 0)
          spdlog::warn("http: {} connections open (--max-connections); closing new ones", self->sessions.size());
        beast::error_code ignored;
        socket.close(ignored);
      } else {
        s = std::make_shared<session>(std::move(socket), self);
        self->sessions.insert(s);
      }
    }
    if (s) asio::dispatch(s->stream.get_executor(), [s] { s->start(); });  // on the session's strand
    self->accept();
  });
}

// ---------------------------------------------------------------------------------------------

server::server(server_config config) : impl_(std::make_shared<impl>(std::move(config))) {}

server::~server() { stop(); }

void server::route(std::string method, std::string pattern, handler h, dispatch d) {
  impl_->routes.push_back({std::move(method), std::regex(pattern), std::move(h), d});
}
void server::on_error(error_renderer r) { impl_->render_error = std::move(r); }
void server::on_request(request_logger l) { impl_->log_request = std::move(l); }
void server::on_exception(std::function<void(const request&, const std::string&, response&)> f) { impl_->render_exception = std::move(f); }

namespace {

// Each connection holds a descriptor; CAF, libtorch and weight files need theirs. Raise the soft limit to the
// hard one when --max-connections needs it, and lower the connection limit when even that is short.
size_t connections_within_fd_limit(size_t wanted) {
  constexpr size_t reserve = 512;
  rlimit lim{};
  if (::getrlimit(RLIMIT_NOFILE, &lim) != 0) return wanted;
  if (lim.rlim_cur != RLIM_INFINITY && lim.rlim_cur < wanted + reserve && lim.rlim_cur < lim.rlim_max) {
    rlimit raised = lim;
    raised.rlim_cur = lim.rlim_max == RLIM_INFINITY ? wanted + reserve : std::min<rlim_t>(lim.rlim_max, wanted + reserve);
    if (::setrlimit(RLIMIT_NOFILE, &raised) == 0) lim = raised;
  }
  if (lim.rlim_cur == RLIM_INFINITY || lim.rlim_cur >= wanted + reserve) return wanted;
  const size_t fit = lim.rlim_cur > reserve + 16 ? static_cast<size_t>(lim.rlim_cur) - reserve : 16;
  spdlog::warn("http: the descriptor limit ({}) allows {} connections, not the {} of --max-connections; using {}", lim.rlim_cur, fit,
               wanted, fit);
  return fit;
}

}  // namespace

uint16_t server::listen(const std::string& host, uint16_t port) {
  auto& s = *impl_;
  s.config.max_connections = connections_within_fd_limit(s.config.max_connections);
  beast::error_code ec;
  tcp::resolver resolver(s.io);
  auto results = resolver.resolve(host, std::to_string(port), ec);
  if (ec || results.empty()) throw std::runtime_error("cannot listen on " + host + ":" + std::to_string(port) + ": " + (ec ? ec.message() : "no address"));
  const tcp::endpoint ep = *results.begin();
  s.acceptor.emplace(asio::make_strand(s.io));
  s.acceptor->open(ep.protocol(), ec);
  // SO_REUSEADDR (a restart over TIME_WAIT sockets), never SO_REUSEPORT (a second server would take half the traffic).
  if (!ec) s.acceptor->set_option(asio::socket_base::reuse_address(true), ec);
  if (!ec) s.acceptor->bind(ep, ec);
  if (!ec) s.acceptor->listen(asio::socket_base::max_listen_connections, ec);
  if (ec)
    throw std::runtime_error("cannot listen on " + host + ":" + std::to_string(port) + " (" + ec.message() + ")");
  const uint16_t bound = s.acceptor->local_endpoint().port();
  s.accept();
  s.keep_running.emplace(s.io.get_executor());
  for (unsigned i = 0; i < std::max(1u, s.config.io_threads); ++i) s.io_threads.emplace_back([&s] { s.io.run(); });
  return bound;
}

size_t server::drain(std::chrono::milliseconds wait) {
  auto& s = *impl_;
  if (!s.draining.exchange(true) && s.acceptor) {
    std::promise<void> closed;
    auto done = closed.get_future();
    asio::post(s.acceptor->get_executor(), [&s, &closed] {
      beast::error_code ec;
      s.acceptor->close(ec);
      if (s.accept_retry) s.accept_retry->cancel();
      closed.set_value();
    });
    if (!s.io_threads.empty()) done.wait();
  }
  std::unique_lock lock(s.mu);
  s.idle.wait_for(lock, wait, [&s] { return s.handling == 0; });
  return s.handling;
}

void server::stop() {
  auto& s = *impl_;
  if (s.io_threads.empty()) return;
  drain(std::chrono::milliseconds(0));
  std::vector<std::shared_ptr<session>> open;
  {
    std::lock_guard lock(s.mu);
    s.stopped = true;  // no session is accepted, and no reply posted, after this snapshot
    open.assign(s.sessions.begin(), s.sessions.end());
  }
  // Close every connection on its strand and wait (bounded) until that happened: a client waiting for a reply
  // sees the connection close rather than hang until the process exits.
  auto left = std::make_shared<std::atomic<size_t>>(open.size());
  auto all_closed = std::make_shared<std::promise<void>>();
  auto closed = all_closed->get_future();
  if (open.empty()) all_closed->set_value();
  for (auto& c : open)
    asio::post(c->stream.get_executor(), [c, left, all_closed] {
      c->close();
      if (--*left == 0) all_closed->set_value();
    });
  closed.wait_for(std::chrono::seconds(5));
  s.keep_running.reset();
  s.io.stop();
  for (auto& t : s.io_threads) t.join();
  s.io_threads.clear();
  {
    std::lock_guard lock(s.mu);
    s.sessions.clear();
  }
  // Handlers still running keep impl_ (and their session) alive through their task; they finish on their own.
  s.pool->stop(std::chrono::milliseconds(0));
}

size_t server::in_flight() const {
  std::lock_guard lock(impl_->mu);
  return impl_->handling;
}

size_t server::connections() const {
  std::lock_guard lock(impl_->mu);
  return impl_->sessions.size();
}

}  // namespace refit::net::http
