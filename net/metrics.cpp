#include "net/metrics.hpp"

#include <fmt/format.h>

#include <array>
#include <iterator>

namespace refit::net {

namespace {

// Label values escape backslash, double quote and newline (exposition format 0.0.4).
std::string label(const std::string& v) {
  std::string out;
  for (char c : v) {
    if (c == '\\') out += "\\\\";
    else if (c == '"') out += "\\\"";
    else if (c == '\n') out += "\\n";
    else out += c;
  }
  return out;
}

void header(std::string& out, const char* name, const char* type, const char* help) {
  fmt::format_to(std::back_inserter(out), "# HELP {} {}\n# TYPE {} {}\n", name, help, name, type);
}

// Prometheus floats: shortest round-trip form.
std::string num(double v) { return fmt::format("{}", v); }

}  // namespace

double gigabytes_per_second(uint64_t bytes, double total_seconds) { return total_seconds > 0 ? bytes / 1e9 / total_seconds : 0.0; }

std::string prometheus_text(const msg::scheduler_stats& s, const std::string& model_path, const std::string& weight_version) {
  std::string out;
  auto line = [&out](const std::string& series, const std::string& value) { out += series + " " + value + "\n"; };

  header(out, "refit_updates_total", "counter", "Weight updates by outcome.");
  line("refit_updates_total{result=\"success\"}", std::to_string(s.updates_ok));
  line("refit_updates_total{result=\"failure\"}", std::to_string(s.updates_failed));

  header(out, "refit_update_phase_seconds", "gauge", "Seconds spent in each phase of the last weight update.");
  for (const auto& [phase, secs] : s.last_timings) line("refit_update_phase_seconds{phase=\"" + label(phase) + "\"}", num(secs));

  header(out, "refit_update_bytes", "gauge", "Bytes of weights the last update moved (every module on every worker).");
  line("refit_update_bytes", std::to_string(s.last_update_bytes));

  header(out, "refit_update_bytes_per_second", "gauge", "Last update: bytes over its total seconds.");
  auto total = s.last_timings.find("total");
  line("refit_update_bytes_per_second",
       num(1e9 * gigabytes_per_second(s.last_update_bytes, total == s.last_timings.end() ? 0.0 : total->second)));

  header(out, "refit_update_pause_seconds", "gauge", "Seconds generation was paused by the last update.");
  line("refit_update_pause_seconds", num(s.last_pause_s));

  header(out, "refit_generations_total", "counter", "Generation requests by outcome.");
  line("refit_generations_total{result=\"ok\"}", std::to_string(s.generations_ok));
  line("refit_generations_total{result=\"failed\"}", std::to_string(s.generations_failed));
  line("refit_generations_total{result=\"cancelled\"}", std::to_string(s.generations_cancelled));

  header(out, "refit_generation_latency_seconds", "histogram", "Seconds from admission to reply of successful generations.");
  const auto& bounds = msg::latency_bucket_bounds_s();
  uint64_t cumulative = 0;
  for (size_t b = 0; b < bounds.size(); ++b) {
    cumulative += b < s.latency_bucket_counts.size() ? s.latency_bucket_counts[b] : 0;
    line("refit_generation_latency_seconds_bucket{le=\"" + num(bounds[b]) + "\"}", std::to_string(cumulative));
  }
  line("refit_generation_latency_seconds_bucket{le=\"+Inf\"}", std::to_string(s.latency_count));
  line("refit_generation_latency_seconds_sum", num(s.latency_sum_s));
  line("refit_generation_latency_seconds_count", std::to_string(s.latency_count));

  header(out, "refit_requests_in_flight", "gauge", "Generation requests running on a worker.");
  line("refit_requests_in_flight", std::to_string(s.in_flight));
  header(out, "refit_requests_queued", "gauge", "Generation requests waiting for a worker.");
  line("refit_requests_queued", std::to_string(s.queued));

  header(out, "refit_model_info", "gauge", "The served checkpoint and weight version.");
  line("refit_model_info{model_path=\"" + label(model_path) + "\",weight_version=\"" + label(weight_version) + "\"}", "1");
  return out;
}

}  // namespace refit::net
