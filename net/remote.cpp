#include "net/remote.hpp"

#include <caf/io/all.hpp>
#include <caf/openssl/manager.hpp>

#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>

#include <stdexcept>
#include <thread>

namespace refit::net {

remote_system_config::remote_system_config(const actor_port_tls& tls) {
  msg::add_types(*this);
  load<caf::io::middleman>();
  if (tls.enabled()) {
    // CAF's OpenSSL sessions then use these files with SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT.
    openssl_certificate = tls.certificate;
    openssl_key = tls.key;
    openssl_cafile = tls.ca;
    load<caf::openssl::manager>();
  }
  // Module actors and workers run detached; the shared pool only carries the scheduler, update
  // transactions and cache actors, which must stay responsive while HTTP threads block on replies.
  set("scheduler.max-threads", static_cast<size_t>(std::max(4u, std::thread::hardware_concurrency())));
}

bool is_loopback_host(const std::string& host) {
  addrinfo hints{};
  hints.ai_flags = AI_PASSIVE;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* found = nullptr;
  if (host.empty() || getaddrinfo(host.c_str(), nullptr, &hints, &found) != 0) return false;
  bool loopback = found != nullptr;
  for (auto* a = found; a != nullptr; a = a->ai_next) {
    if (a->ai_family == AF_INET)
      loopback &= (ntohl(reinterpret_cast<const sockaddr_in*>(a->ai_addr)->sin_addr.s_addr) >> 24) == 127;
    else if (a->ai_family == AF_INET6)
      loopback &= IN6_IS_ADDR_LOOPBACK(&reinterpret_cast<const sockaddr_in6*>(a->ai_addr)->sin6_addr) != 0;
    else
      loopback = false;
  }
  freeaddrinfo(found);
  return loopback;
}

actor_port_endpoint::actor_port_endpoint(caf::actor_system& sys, const actor_port_limits& limits)
    : sys_(sys), middleman_(spawn_bounded_middleman(sys, limits)) {}

actor_port_endpoint::~actor_port_endpoint() {
  caf::scoped_actor self{sys_, true};
  self->send_exit(middleman_, caf::exit_reason::kill);
  self->wait_for(middleman_);
}

bool actor_port_endpoint::tls() const { return sys_.has_openssl_manager() && sys_.openssl_manager().authentication_enabled(); }

uint16_t actor_port_endpoint::publish(const msg::cluster_api_actor& gateway, const std::string& host, uint16_t port) {
  auto publish = caf::make_function_view(middleman_);
  auto bound = publish(caf::publish_atom::value, port, caf::actor_cast<caf::strong_actor_ptr>(gateway), sys_.message_types(gateway),
                       host, /*reuse_addr=*/true);
  if (!bound)
    throw std::runtime_error("cannot publish the client API on " + host + ":" + std::to_string(port) + ": " + sys_.render(bound.error()));
  return *bound;
}

void actor_port_endpoint::unpublish(const msg::cluster_api_actor& gateway, uint16_t port) {
  caf::scoped_actor self{sys_, true};
  self->request(middleman_, caf::infinite, caf::unpublish_atom::value, caf::actor_cast<caf::actor_addr>(gateway), port)
      .receive([] {}, [](caf::error&) {});
}

namespace {

template <class Handle>
caf::expected<Handle> connect_to(caf::actor_system& sys, const caf::io::middleman_actor& middleman, const std::string& host, uint16_t port,
                                 std::chrono::milliseconds timeout) {
  auto connect = caf::make_function_view(middleman, caf::duration{timeout});
  auto found = connect(caf::connect_atom::value, host, port);
  if (!found) return std::move(found.error());
  auto& published = std::get<1>(*found);
  if (!published) return caf::sec::no_actor_published_at_port;
  if (!sys.assignable(std::get<2>(*found), sys.message_types(caf::detail::type_list<Handle>{})))
    return caf::sec::unexpected_actor_messaging_interface;
  return caf::actor_cast<Handle>(std::move(published));
}

}  // namespace

caf::expected<msg::client_api_actor> actor_port_endpoint::connect(const std::string& host, uint16_t port,
                                                                  std::chrono::milliseconds timeout) {
  return connect_to<msg::client_api_actor>(sys_, middleman_, host, port, timeout);
}

caf::expected<msg::cluster_api_actor> actor_port_endpoint::connect_cluster(const std::string& host, uint16_t port,
                                                                           std::chrono::milliseconds timeout) {
  return connect_to<msg::cluster_api_actor>(sys_, middleman_, host, port, timeout);
}

}  // namespace refit::net
