// The first weight source: one module's folder of a Diffusers checkpoint (config.json and one
// safetensors file or shards with an index), validated strictly from its headers.
#pragma once

#include <c10/core/Device.h>

#include <filesystem>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <utility>
#include <vector>

#include "pipeline/update/weight_source.hpp"
#include "pipeline/weights/beneath.hpp"

namespace refit::weights {
struct module_weights;
}

namespace refit::update {

class module_updater;

class checkpoint_source final : public module_source {
 public:
  // Every file is opened through `scope`: beneath the allowed model roots for a client's update, anywhere
  // for the operator's start model.
  explicit checkpoint_source(std::filesystem::path module_dir, weights::file_scope scope = {});
  ~checkpoint_source() override;

  std::string origin() const override { return dir_.string(); }
  // Opens the folder's files and checks their headers: every slot present with its shape and a
  // convertible dtype, no tensor the module lacks. Plans every slot.
  source_plan plan(const module_context& module) override;
  // Reads the planned slots (through the files plan opened, or opened anew), converting floats to the
  // held dtype; a file that changed since it was opened fails the read (file_changed).
  void fill(const module_context& module, const fill_target& target) override;
  bool repeatable() const override { return true; }
  // Read once per host: fill copies the values `sibling` (the same module on another worker of this process) staged
  // from this folder, when it holds them, instead of reading the files again (a device-to-device copy: NVLink
  // between GPUs). The headers are still checked at plan.
  void copy_staged_from(std::shared_ptr<const module_updater> sibling, int32_t worker) {
    sibling_ = std::move(sibling);
    sibling_worker_ = worker;
  }
  // Read once per host, on GPUs: fill also writes a replica of every value on each of these workers' devices, each chunk
  // copied on device to device (NVLink) as soon as it arrived here. A worker copying from this stage adopts its replicas
  // (take_replica) as its shadows. Replicas that do not fit in a device's memory are left out (that worker copies or reads).
  void fan_out_to(std::vector<std::pair<int32_t, c10::Device>> workers) { fan_out_ = std::move(workers); }
  // The replica of `slot` this source made for `worker`, handed over once (undefined when there is none).
  at::Tensor take_replica(int32_t worker, size_t slot);
  // The sibling's replica of `slot` for this worker, when it made one: a staged update keeps it as its shadow.
  at::Tensor adopt(const module_context& module, size_t slot, const at::Tensor& current) override;

 private:
  bool fill_from_sibling(const module_context& module, const fill_target& target);

  std::filesystem::path dir_;
  weights::file_scope scope_;
  std::unique_ptr<weights::module_weights> opened_;  // by plan, for the next fill
  std::shared_ptr<const module_updater> sibling_;
  int32_t sibling_worker_ = -1;
  std::vector<std::pair<int32_t, c10::Device>> fan_out_;
  std::mutex replicas_mutex_;
  std::map<int32_t, std::map<size_t, at::Tensor>> replicas_;  // worker -> slot -> replica on its device
};

}  // namespace refit::update
