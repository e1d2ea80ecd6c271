// CAF 0.17's deserializer of a vector of enums (instantiated by registering update_mode and checksum_format) reads
// each element into an uninitialized local that GCC cannot prove is written first; it is.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include "messages/protocol.hpp"

#include <caf/all.hpp>


namespace refit::msg {

void add_types(caf::actor_system_config& cfg) {
  cfg.add_message_type<weight_source>("refit.weight_source");
  cfg.add_message_type<std::map<std::string, weight_source>>("refit.weight_sources");
  // Sent as message elements between the scheduler and joined workers (range-checked where they are used).
  cfg.add_message_type<update_mode>("refit.update_mode");
  cfg.add_message_type<checksum_format>("refit.checksum_format");
  cfg.add_message_type<update_request>("refit.update_request");
  cfg.add_message_type<shared_storage>("refit.shared_storage");
  cfg.add_message_type<std::vector<shared_storage>>("refit.shared_storages");
  cfg.add_message_type<shared_tensor>("refit.shared_tensor");
  cfg.add_message_type<std::vector<shared_tensor>>("refit.shared_tensors");
  cfg.add_message_type<shared_payload>("refit.shared_payload");
  cfg.add_message_type<std::vector<shared_payload>>("refit.shared_payloads");
  cfg.add_message_type<memory_result>("refit.memory_result");
  cfg.add_message_type<lora_entry>("refit.lora_entry");
  cfg.add_message_type<std::vector<lora_entry>>("refit.lora_entries");
  cfg.add_message_type<std::map<std::string, std::vector<lora_entry>>>("refit.lora_entries_by_module");
  cfg.add_message_type<lora_request>("refit.lora_request");
  cfg.add_message_type<lora_status>("refit.lora_status");
  cfg.add_message_type<announced_tensor>("refit.announced_tensor");
  cfg.add_message_type<std::vector<announced_tensor>>("refit.announced_tensors");
  cfg.add_message_type<group_request>("refit.group_request");
  cfg.add_message_type<group_result>("refit.group_result");
  cfg.add_message_type<routed_tensor>("refit.routed_tensor");
  cfg.add_message_type<std::vector<routed_tensor>>("refit.routed_tensors");
  cfg.add_message_type<receive_request>("refit.receive_request");
  cfg.add_message_type<receive_report>("refit.receive_report");
  cfg.add_message_type<checksum_request>("refit.checksum_request");
  cfg.add_message_type<module_report>("refit.module_report");
  cfg.add_message_type<std::vector<module_report>>("refit.module_reports");
  cfg.add_message_type<update_result>("refit.update_result");
  cfg.add_message_type<generation_request>("refit.generation_request");
  cfg.add_message_type<generation_result>("refit.generation_result");
  cfg.add_message_type<rollout_request>("refit.rollout_request");
  cfg.add_message_type<rollout_result>("refit.rollout_result");
  cfg.add_message_type<module_info>("refit.module_info");
  cfg.add_message_type<std::vector<module_info>>("refit.module_infos");
  cfg.add_message_type<model_info>("refit.model_info");
  cfg.add_message_type<scheduler_stats>("refit.scheduler_stats");
  cfg.add_message_type<teacache_counters>("refit.teacache_counters");
  cfg.add_message_type<std::vector<teacache_counters>>("refit.teacache_counters_list");
  cfg.add_message_type<offload_info>("refit.offload_info");
  cfg.add_message_type<std::vector<offload_info>>("refit.offload_infos");
  cfg.add_message_type<std::vector<int64_t>>("refit.indices");
  cfg.add_message_type<fault_spec>("refit.fault_spec");
  cfg.add_message_type<std::vector<std::string>>("refit.strings");
  cfg.add_message_type<std::map<std::string, std::string>>("refit.string_map");
  cfg.add_message_type<std::map<std::string, double>>("refit.timings");
  cfg.add_message_type<std::vector<std::vector<uint8_t>>>("refit.images");
  cfg.add_message_type<std::vector<double>>("refit.doubles");
  cfg.add_message_type<std::vector<uint64_t>>("refit.counts");
  cfg.add_message_type<module_actor>("refit.module_actor");
  cfg.add_message_type<std::map<std::string, module_actor>>("refit.module_actors");
  cfg.add_message_type<transfer_actor>("refit.transfer_actor");
  cfg.add_message_type<worker_actor>("refit.worker_actor");
  cfg.add_message_type<module_supervisor_actor>("refit.module_supervisor_actor");
  cfg.add_message_type<cache_actor>("refit.cache_actor");
  cfg.add_message_type<node_agent_actor>("refit.node_agent_actor");
  cfg.add_message_type<worker_offer>("refit.worker_offer");
  cfg.add_message_type<join_reply>("refit.join_reply");
  cfg.add_message_type<worker_info>("refit.worker_info");
  cfg.add_message_type<std::vector<worker_info>>("refit.worker_infos");
  cfg.add_error_category(error_category, [](uint8_t code, caf::atom_value, const caf::message& ctx) {
    std::string s = "refit_error(" + to_string(static_cast<refit_errc>(code)) + ")";
    if (ctx.match_elements<std::string>()) s += ": " + ctx.get_as<std::string>(0);
    return s;
  });
}

}  // namespace refit::msg
