// Rollback benchmark (test build with fault injection): on a running engine, an update whose last module
// fails in commit must roll the others back. Measures the rollback time and the generation pause in staged
// mode, and the device memory held before, after a successful update and after a rolled-back one.
//   bench_rollback MODEL_A MODEL_B [--device cuda]
#include <ATen/ATen.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <nlohmann/json.hpp>

#include <iostream>

#include "tests/unit/engine_fixture.hpp"

using namespace refit;

static int64_t allocated(int device) {
  return c10::cuda::CUDACachingAllocator::getDeviceStats(static_cast<c10::DeviceIndex>(device))
      .allocated_bytes[static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE)]
      .current;
}

int main(int argc, char** argv) {
  if (argc < 3) {
    std::cerr << "usage: bench_rollback MODEL_A MODEL_B [--device cuda]\n";
    return 2;
  }
  const std::string device = argc >= 5 ? argv[4] : "cuda";
  test::engine_system_config cfg;
  caf::actor_system sys{cfg};
  test::engine_client client(sys, actors::spawn_engine(sys, {argv[1], {device}, "bf16"}));
  nlohmann::json out;
  const int64_t base = allocated(0);
  msg::update_request ok;
  ok.model_path = argv[2];
  ok.mode = msg::update_mode::staged;
  auto r1 = client.update(ok);
  out["update_ok"] = {{"success", r1.success}, {"timings", r1.timings}, {"allocated_before", base}, {"allocated_after", allocated(0)}};
  client.fault("vae", 0, {"commit", "error"});
  msg::update_request back = ok;
  back.model_path = argv[1];
  const auto before = client.checksums();
  auto r2 = client.update(back);
  out["update_rolled_back"] = {{"success", r2.success}, {"message", r2.message}, {"timings", r2.timings},
                               {"checksums_unchanged", client.checksums() == before}, {"allocated_after", allocated(0)}};
  std::cout << out.dump(1) << "\n";
  caf::anon_send_exit(client.scheduler(), caf::exit_reason::user_shutdown);
  return r1.success && !r2.success ? 0 : 1;
}
