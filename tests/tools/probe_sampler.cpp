// Oracle probe: prints the flow-match schedule refit computes, as JSON.
//   probe_sampler SCHEDULER_CONFIG.json STEPS IMAGE_SEQ_LEN
#include <nlohmann/json.hpp>

#include <cstdio>
#include <iostream>

#include "pipeline/sampling/flow_match.hpp"

int main(int argc, char** argv) {
  if (argc != 4) {
    std::fprintf(stderr, "usage: probe_sampler SCHEDULER_CONFIG.json STEPS IMAGE_SEQ_LEN\n");
    return 2;
  }
  try {
    auto cfg = refit::sampling::flow_match_config::from_file(argv[1]);
    const int64_t steps = std::stoll(argv[2]), seq = std::stoll(argv[3]);
    auto s = refit::sampling::klein_schedule(cfg, steps, seq);
    std::cout << nlohmann::json{{"sigmas", s.sigmas}, {"timesteps", s.timesteps},
                                {"mu", refit::sampling::compute_empirical_mu(seq, steps)}}.dump() << "\n";
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 1;
  }
  return 0;
}
