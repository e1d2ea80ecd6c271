// The agent of a `refit worker --join` process: offers the process's workers to a running server, stays
// joined, and when the connection goes (the server stopped, the network failed) settles every module as
// after a crash (a decided update is kept, anything else undone) and joins again. The server gives a
// worker that (re)joins the weights it serves before it sends it any request.
#pragma once

#include <chrono>
#include <functional>
#include <string>

#include "actors/engine.hpp"
#include "messages/protocol.hpp"

namespace refit::actors {

struct node_config {
  std::string name;    // how the server calls this process (logs, /get_model_info)
  std::string secret;  // the server's --worker-secret-file contents
  std::chrono::milliseconds retry{2000};  // between attempts to connect or join
  // Connects to the server's actor port (blocking; the error says why not).
  std::function<caf::expected<msg::cluster_api_actor>()> connect;
  // Called when the server refuses for good (wrong secret, another pipeline): the process should exit.
  std::function<void(const std::string&)> refused;
};

// Spawns the agent; it starts connecting at once. `workers` are this process's (spawn_workers).
msg::node_agent_actor spawn_node_agent(caf::actor_system& sys, worker_set workers, node_config config);

}  // namespace refit::actors
