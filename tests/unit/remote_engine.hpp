// A server with one local worker and one worker joined from another actor system over the actor port (loopback
// TCP, the same BASP connection and relays as `refit worker --join`): the fault tests' remote participant.
#pragma once

#include <chrono>
#include <memory>
#include <thread>

#include "actors/client_gateway.hpp"
#include "actors/node_agent.hpp"
#include "net/remote.hpp"
#include "tests/unit/engine_fixture.hpp"

namespace refit::test {

class remote_engine {
 public:
  remote_engine(const std::filesystem::path& model, bool offload) {
    actors::engine_config server{model, {test_device()}, "fp32", offload, 1};
    server.worker_secret = secret;
    scheduler_ = actors::spawn_engine(server_sys_, server);
    gateway_ = actors::spawn_client_gateway(server_sys_, scheduler_);
    server_port_ = std::make_unique<net::actor_port_endpoint>(server_sys_, net::actor_port_limits{});
    port_ = server_port_->publish(gateway_, "127.0.0.1", 0);
    client_ = std::make_unique<engine_client>(server_sys_, scheduler_);

    actors::engine_config node{model, {test_device()}, "fp32", offload, 1};
    node_port_ = std::make_unique<net::actor_port_endpoint>(node_sys_, net::actor_port_limits{});
    actors::node_config config;
    config.name = "node-b";
    config.secret = secret;
    config.retry = std::chrono::milliseconds(100);
    config.connect = [this] { return node_port_->connect_cluster("127.0.0.1", port_, std::chrono::seconds(10)); };
    node_workers_ = actors::spawn_workers(node_sys_, node);
    agent_ = actors::spawn_node_agent(node_sys_, node_workers_, config);
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
    while (!joined()) {
      if (std::chrono::steady_clock::now() > deadline) throw std::runtime_error("the remote worker did not join within 60 s");
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
  }
  ~remote_engine() {
    // The server first (its relays release the proxies of the node's actors), then the node's actors.
    caf::anon_send_exit(scheduler_, caf::exit_reason::user_shutdown);
    caf::anon_send_exit(gateway_, caf::exit_reason::user_shutdown);
    caf::anon_send_exit(agent_, caf::exit_reason::user_shutdown);
    for (auto& a : node_workers_.workers) {
      for (const caf::actor& x : {caf::actor_cast<caf::actor>(a.worker), caf::actor_cast<caf::actor>(a.supervisor),
                                  caf::actor_cast<caf::actor>(a.cache), caf::actor_cast<caf::actor>(a.transfer)})
        caf::anon_send_exit(x, caf::exit_reason::user_shutdown);
      for (auto& o : a.offloads) caf::anon_send_exit(o, caf::exit_reason::user_shutdown);
    }
  }
  engine_client& client() { return *client_; }

 private:
  static constexpr const char* secret = "a-secret-of-the-fault-tests";
  bool joined() {
    for (const auto& w : client_->info().workers)
      if (!w.host.empty() && w.status == "serving") return true;
    return false;
  }
  net::remote_system_config server_cfg_, node_cfg_;
  caf::actor_system server_sys_{server_cfg_}, node_sys_{node_cfg_};
  msg::scheduler_actor scheduler_;
  msg::cluster_api_actor gateway_;
  std::unique_ptr<net::actor_port_endpoint> server_port_, node_port_;
  uint16_t port_ = 0;
  std::unique_ptr<engine_client> client_;
  actors::worker_set node_workers_;
  msg::node_agent_actor agent_;
};

}  // namespace refit::test
