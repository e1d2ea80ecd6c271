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

  header(out, "refit_teacache_requests_total", "counter", "Generations that used TeaCache, per worker.");
  for (size_t w = 0; w < s.teacache.size(); ++w)
    line(fmt::format("refit_teacache_requests_total{{worker=\"{}\"}}", w), std::to_string(s.teacache[w].requests));
  header(out, "refit_teacache_steps_total", "counter", "TeaCache DiT calls per worker: computed, or skipped (residual reused).");
  for (size_t w = 0; w < s.teacache.size(); ++w) {
    line(fmt::format("refit_teacache_steps_total{{worker=\"{}\",result=\"computed\"}}", w), std::to_string(s.teacache[w].steps_computed));
    line(fmt::format("refit_teacache_steps_total{{worker=\"{}\",result=\"skipped\"}}", w), std::to_string(s.teacache[w].steps_skipped));
  }
  header(out, "refit_teacache_resets_total", "counter", "TeaCache resets by weight updates (flush_cache), per worker.");
  for (size_t w = 0; w < s.teacache.size(); ++w)
    line(fmt::format("refit_teacache_resets_total{{worker=\"{}\"}}", w), std::to_string(s.teacache[w].resets));

  if (!s.offload.empty()) {
    auto each = [&](const char* name, auto value) {
      for (const auto& o : s.offload) line(fmt::format("{}{{worker=\"{}\"}}", name, o.worker), std::to_string(value(o)));
    };
    header(out, "refit_offload_host_bytes", "gauge", "Layerwise offload: bytes of offloaded blocks in host memory (live store).");
    each("refit_offload_host_bytes", [](const msg::offload_info& o) { return o.host_bytes; });
    header(out, "refit_offload_spare_host_bytes", "gauge", "Layerwise offload: bytes of the second host store that staged updates write.");
    each("refit_offload_spare_host_bytes", [](const msg::offload_info& o) { return o.spare_host_bytes; });
    header(out, "refit_offload_device_bytes", "gauge", "Layerwise offload: bytes of the device slots blocks are prefetched into.");
    each("refit_offload_device_bytes", [](const msg::offload_info& o) { return o.device_bytes; });
    header(out, "refit_offload_resident_blocks", "gauge", "Layerwise offload: offloaded blocks in a device slot now.");
    each("refit_offload_resident_blocks", [](const msg::offload_info& o) { return o.resident_blocks.size(); });
    header(out, "refit_offload_prefetches_total", "counter", "Layerwise offload: block copies to the device for compute.");
    each("refit_offload_prefetches_total", [](const msg::offload_info& o) { return o.prefetches; });
    header(out, "refit_offload_prefetched_bytes_total", "counter", "Layerwise offload: bytes of those block copies.");
    each("refit_offload_prefetched_bytes_total", [](const msg::offload_info& o) { return o.prefetched_bytes; });
    header(out, "refit_offload_refreshes_total", "counter", "Layerwise offload: resident blocks rewritten by weight updates.");
    each("refit_offload_refreshes_total", [](const msg::offload_info& o) { return o.refreshes; });
  }

  header(out, "refit_model_info", "gauge", "The served checkpoint and weight version.");
  line("refit_model_info{model_path=\"" + label(model_path) + "\",weight_version=\"" + label(weight_version) + "\"}", "1");
  return out;
}

}  // namespace refit::net
