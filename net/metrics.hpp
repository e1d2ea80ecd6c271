// /metrics: Prometheus text exposition format 0.0.4 from the scheduler's counters. Metric names are
// fixed by the shared contract; dashboards and the integration tests depend on them.
#pragma once

#include <string>

#include "messages/protocol.hpp"

namespace refit::net {

// model_path and weight_version label refit_model_info.
std::string prometheus_text(const msg::scheduler_stats& stats, const std::string& model_path, const std::string& weight_version);

// The last update's throughput: bytes of every module report over the whole transaction (0 if unknown).
double gigabytes_per_second(uint64_t bytes, double total_seconds);

}  // namespace refit::net
