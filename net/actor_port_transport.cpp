#include "net/actor_port_transport.hpp"

#include <caf/actor_system.hpp>
#include <caf/actor_system_config.hpp>
#include <caf/io/basp_broker.hpp>
#include <caf/io/middleman.hpp>
#include <caf/io/middleman_actor_impl.hpp>
#include <caf/io/network/default_multiplexer.hpp>
#include <caf/io/network/doorman_impl.hpp>
#include <caf/io/network/stream_impl.hpp>
#include <caf/io/scribe.hpp>
#include <caf/openssl/manager.hpp>
#include <caf/openssl/session.hpp>
#include <caf/policy/tcp.hpp>
#include <openssl/err.h>
#include <spdlog/spdlog.h>

#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <exception>
#include <memory>
#include <string>
#include <utility>

namespace refit::net {

namespace {

namespace io = caf::io;
namespace network = caf::io::network;
using network::native_socket;
using network::rw_state;

std::string peer_of(native_socket fd) {
  auto addr = network::remote_addr_of_fd(fd);
  auto port = network::remote_port_of_fd(fd);
  if (!addr || !port) return "a peer";
  return *addr + ":" + std::to_string(*port);
}

// CAF logs OpenSSL's reasons only in its debug builds; this says why a peer never got through.
void log_tls_refusal(native_socket fd) {
  std::string why;
  while (auto code = ERR_get_error()) {
    char text[256];
    ERR_error_string_n(code, text, sizeof text);
    why += (why.empty() ? "" : "; ") + std::string(text);
  }
  spdlog::warn("actor port: TLS with {} failed before any message ({}); connection closed", peer_of(fd),
               why.empty() ? "closed during the handshake" : why);
}

// What every connection of one middleman actor may hold; shared with the connections, which can outlive it.
struct buffer_budget {
  explicit buffer_budget(const actor_port_limits& l) : limits(l) {}
  const actor_port_limits limits;
  std::atomic<size_t> reserved{0};

  bool try_reserve(size_t bytes) {
    size_t now = reserved.load();
    do {
      if (bytes > limits.max_buffered_bytes - std::min(now, limits.max_buffered_bytes)) return false;
    } while (!reserved.compare_exchange_weak(now, now + bytes));
    return true;
  }
  void release(size_t bytes) { reserved -= bytes; }
};
using budget_ptr = std::shared_ptr<buffer_budget>;

// The bytes of one connection: plain TCP, or CAF's OpenSSL session (its reads drive the handshake, so
// nothing is read for BASP before the peer's certificate was verified).
// Reads and writes both drive the handshake, so either can be where it fails.
struct tls_transport {
  caf::openssl::session_ptr session;
  bool received = false, failed = false;

  rw_state read_some(size_t& result, native_socket fd, void* buf, size_t len) {
    auto state = session->read_some(result, fd, buf, len);
    if (state == rw_state::success && result > 0) received = true;
    return checked(state, fd);
  }
  rw_state write_some(size_t& result, native_socket fd, const void* buf, size_t len) {
    return checked(session->write_some(result, fd, buf, len), fd);
  }
  rw_state checked(rw_state state, native_socket fd) {
    if (state == rw_state::failure && !received && !failed) log_tls_refusal(fd);
    failed |= state == rw_state::failure;
    return state;
  }
  bool must_read_more(native_socket fd, size_t threshold) { return session->must_read_more(fd, threshold); }
};

// Once a connection is refused every read fails, so the stream reports an I/O failure and the BASP broker
// closes the connection and drops its state through its usual path.
template <class Transport>
class refusable {
 public:
  refusable(const bool* refused, Transport transport) : refused_(refused), transport_(std::move(transport)) {}

  rw_state read_some(size_t& result, native_socket fd, void* buf, size_t len) {
    result = 0;
    if (*refused_) return rw_state::failure;
    return transport_.read_some(result, fd, buf, len);
  }
  rw_state write_some(size_t& result, native_socket fd, const void* buf, size_t len) {
    return transport_.write_some(result, fd, buf, len);
  }
  bool must_read_more(native_socket fd, size_t threshold) { return !*refused_ && transport_.must_read_more(fd, threshold); }

 private:
  const bool* refused_;
  Transport transport_;
};

// A connection whose read buffer never exceeds the limits: the BASP broker asks for each frame's size
// here (configure_read) before the stream allocates it.
template <class Transport>
class bounded_scribe final : public io::scribe {
 public:
  bounded_scribe(network::default_multiplexer& mpx, native_socket fd, budget_ptr budget, Transport transport)
      : io::scribe(network::conn_hdl_from_socket(fd)), budget_(std::move(budget)), stream_(mpx, fd, &refused_, std::move(transport)) {}

  ~bounded_scribe() override { budget_->release(reserved_); }

  void configure_read(io::receive_policy::config config) override {
    if (!refused_) admit(config.second);
    if (refused_) config = io::receive_policy::at_most(1);
    stream_.configure_read(config);
    if (!launched_) launch();
  }

  void ack_writes(bool enable) override { stream_.ack_writes(enable); }
  std::vector<char>& wr_buf() override { return stream_.wr_buf(); }
  std::vector<char>& rd_buf() override { return stream_.rd_buf(); }
  void graceful_shutdown() override {
    stream_.graceful_shutdown();
    detach(&stream_.backend(), false);
  }
  void flush() override { stream_.flush(this); }
  std::string addr() const override {
    auto x = network::remote_addr_of_fd(stream_.fd());
    return x ? *x : std::string{};
  }
  uint16_t port() const override {
    auto x = network::remote_port_of_fd(stream_.fd());
    return x ? *x : 0;
  }
  void add_to_loop() override { stream_.activate(this); }
  void remove_from_loop() override { stream_.passivate(); }

 private:
  void launch() {
    launched_ = true;
    stream_.start(this);
    stream_.force_empty_write(this);  // lets a TLS handshake proceed before anything is written
  }

  // The buffer keeps its largest size while the connection lives, so that is what counts against the budget.
  void admit(size_t wanted) {
    const auto& limits = budget_->limits;
    if (wanted > limits.max_message_bytes)
      return refuse(wanted, "over the " + std::to_string(limits.max_message_bytes) + "-byte limit of one message");
    if (wanted <= reserved_) return;
    if (!budget_->try_reserve(wanted - reserved_))
      return refuse(wanted, "the actor port's connections already hold " + std::to_string(budget_->reserved.load()) + " of " +
                                std::to_string(limits.max_buffered_bytes) + " buffer bytes");
    reserved_ = wanted;
  }

  void refuse(size_t wanted, const std::string& why) {
    refused_ = true;
    spdlog::warn("actor port: {} announced a {}-byte message ({}); connection closed", peer_of(stream_.fd()), wanted, why);
    // Readable at once, so the failing read comes even if the peer sends nothing more.
    ::shutdown(stream_.fd(), SHUT_RD);
  }

  bool launched_ = false;
  bool refused_ = false;
  size_t reserved_ = 0;
  budget_ptr budget_;
  network::stream_impl<refusable<Transport>> stream_;
};

bool uses_tls(caf::actor_system& sys) { return sys.has_openssl_manager() && sys.openssl_manager().authentication_enabled(); }

// Null when TLS cannot even start (the fd is then the caller's to close).
io::scribe_ptr make_bounded_scribe(caf::actor_system& sys, network::default_multiplexer& mpx, native_socket fd, bool accepted,
                                   const budget_ptr& budget) {
  network::nonblocking(fd, true);
  if (!uses_tls(sys)) return caf::make_counted<bounded_scribe<caf::policy::tcp>>(mpx, fd, budget, caf::policy::tcp{});
  caf::openssl::session_ptr session;
  try {
    session = caf::openssl::make_session(sys, fd, accepted);  // reads the certificate files for each connection
  } catch (const std::exception& e) {
    spdlog::error("actor port: cannot set up TLS for {}: {}", peer_of(fd), e.what());
    return nullptr;
  }
  if (!session) {
    log_tls_refusal(fd);
    return nullptr;
  }
  return caf::make_counted<bounded_scribe<tls_transport>>(mpx, fd, budget, tls_transport{std::move(session)});
}

class bounded_doorman final : public network::doorman_impl {
 public:
  bounded_doorman(network::default_multiplexer& mpx, native_socket fd, budget_ptr budget)
      : network::doorman_impl(mpx, fd), budget_(std::move(budget)) {}

  bool new_connection() override {
    if (detached()) return false;  // the broker let go while the multiplexer still had events for us
    auto& mpx = acceptor_.backend();
    const native_socket fd = acceptor_.accepted_socket();
    auto scribe = make_bounded_scribe(parent()->system(), mpx, fd, /*accepted=*/true, budget_);
    if (!scribe) {
      ::close(fd);
      return false;
    }
    auto hdl = scribe->hdl();
    parent()->add_scribe(std::move(scribe));
    return io::doorman::new_connection(&mpx, hdl);
  }

 private:
  budget_ptr budget_;
};

class bounded_middleman_actor final : public io::middleman_actor_impl {
 public:
  bounded_middleman_actor(caf::actor_config& cfg, caf::actor basp, budget_ptr budget)
      : io::middleman_actor_impl(cfg, std::move(basp)), budget_(std::move(budget)) {}

  const char* name() const override { return "refit.bounded_middleman"; }

 protected:
  caf::expected<io::scribe_ptr> connect(const std::string& host, uint16_t port) override {
    auto fd = network::new_tcp_connection(host, port);
    if (!fd) return std::move(fd.error());
    auto scribe = make_bounded_scribe(system(), mpx(), *fd, /*accepted=*/false, budget_);
    if (!scribe) {
      ::close(*fd);
      return caf::sec::cannot_connect_to_node;
    }
    return scribe;
  }

  caf::expected<io::doorman_ptr> open(uint16_t port, const char* addr, bool reuse) override {
    auto fd = network::new_tcp_acceptor_impl(port, addr, reuse);
    if (!fd) return std::move(fd.error());
    return caf::make_counted<bounded_doorman>(mpx(), *fd, budget_);
  }

 private:
  network::default_multiplexer& mpx() { return static_cast<network::default_multiplexer&>(system().middleman().backend()); }

  budget_ptr budget_;
};

}  // namespace

caf::io::middleman_actor spawn_bounded_middleman(caf::actor_system& sys, const actor_port_limits& limits) {
  if (limits.max_message_bytes == 0 || limits.max_buffered_bytes < limits.max_message_bytes)
    throw std::invalid_argument("actor port limits: a message must fit (0 < max message bytes <= max buffered bytes)");
  if (dynamic_cast<network::default_multiplexer*>(&sys.middleman().backend()) == nullptr)
    throw std::logic_error("the actor port needs CAF's default network backend");
  auto basp = sys.middleman().named_broker<io::basp_broker>(caf::atom("BASP"));
  // Detached: connect() blocks in connect(2), which must not hold a thread of the shared pool.
  return sys.spawn<bounded_middleman_actor, caf::detached + caf::hidden>(std::move(basp), std::make_shared<buffer_budget>(limits));
}

}  // namespace refit::net
