// A hostile peer of `refit serve --actor-port`: connects like refit_remote_client (plain, or mutual TLS
// with --tls-*), then sends the scheduler's internal messages (pause generation, resume, fault
// injection) untyped, bypassing the client API's typed handle, and prints how the server answered each:
//   info: answered (weight_version V)      the client API works over this connection
//   pause: refused (ERROR)                  or "pause: ANSWERED" when the server obeyed
// Exit code 0 when it connected, info was answered and every control message was refused; 1 otherwise.
//
//   actor_port_probe HOST PORT [--tls-cert C --tls-key K --tls-ca CA]
#include <caf/all.hpp>

#include <CLI/CLI.hpp>

#include <iostream>
#include <string>
#include <utility>
#include <vector>

#include "messages/protocol.hpp"
#include "net/remote.hpp"

using namespace refit;

int main(int argc, char** argv) {
  std::string host;
  uint16_t port = 0;
  net::actor_port_tls tls;
  CLI::App app{"Sends the scheduler's control messages to a refit actor port and reports whether they were refused."};
  app.add_option("host", host)->required();
  app.add_option("port", port)->required();
  app.add_option("--tls-cert", tls.certificate);
  app.add_option("--tls-key", tls.key);
  app.add_option("--tls-ca", tls.ca);
  CLI11_PARSE(app, argc, argv);

  net::remote_system_config cfg{tls};
  caf::actor_system sys{cfg};
  net::actor_port_endpoint endpoint{sys, {size_t{64} << 20, size_t{64} << 20}};
  auto remote = endpoint.connect(host, port, std::chrono::seconds(60));
  if (!remote) {
    std::cout << "connect: failed (" << sys.render(remote.error()) << ")\n";
    return 1;
  }
  caf::scoped_actor self{sys};
  bool ok = true;
  self->request(*remote, std::chrono::seconds(60), msg::info_atom::value)
      .receive([&](msg::model_info& info) { std::cout << "info: answered (weight_version " << info.weight_version << ")\n"; },
               [&](caf::error& e) {
                 std::cout << "info: failed (" << sys.render(e) << ")\n";
                 ok = false;
               });
  const auto untyped = caf::actor_cast<caf::actor>(*remote);
  const std::vector<std::pair<std::string, caf::message>> attempts{
      {"pause", caf::make_message(msg::pause_atom::value, true)},
      {"resume", caf::make_message(msg::resume_atom::value, true)},
      {"fault", caf::make_message(msg::fault_atom::value, std::string("transformer"), int32_t{0}, msg::fault_spec{"commit", "error"})},
  };
  for (const auto& [name, attempt] : attempts)
    self->request(untyped, std::chrono::seconds(60), attempt)
        .receive(
            [&, name = name](caf::message&) {
              std::cout << name << ": ANSWERED\n";
              ok = false;
            },
            [&, name = name](caf::error& e) { std::cout << name << ": refused (" << sys.render(e) << ")\n"; });
  return ok ? 0 : 1;
}
