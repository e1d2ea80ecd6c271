// A torch.distributed group created by a trainer (rank 0) that one refit worker joins as one rank, through
// libtorch's own c10d classes: a TCPStore client of the trainer's store, the PrefixStore chain that
// SGLang's init_custom_process_group makes (group name, group name + "/", then "cpu/" or "cuda/"), and a
// ProcessGroupGloo or ProcessGroupNCCL on it. The only collective is a broadcast from rank 0.
//
// This header has no c10d in it; broadcast_group.cpp is the one file that includes c10d (and the gloo
// declarations under third_party/gloo_shim).
#pragma once

#include <ATen/core/Tensor.h>

#include <chrono>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace refit::transfer {

struct group_spec {
  std::string master_address;
  int master_port = 0;
  int rank = 1;
  int world_size = 2;
  std::string group_name = "weight_update_group";
  std::string backend = "nccl";                // nccl or gloo
  std::chrono::milliseconds timeout{600000};   // joining, and each broadcast
  int cuda_device = -1;                        // nccl: the worker's GPU
};

// A transfer failed: the group is broken (NCCL: aborted) and must be destroyed.
struct transfer_error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Whether this build can join a group with `backend` ("gloo" always; "nccl" with CUDA).
bool backend_available(const std::string& backend);

class broadcast_group {
 public:
  // Joins: connects to the trainer's store (retrying until the timeout) and builds the process group,
  // which blocks until every rank has arrived. Throws std::runtime_error saying why it could not join.
  explicit broadcast_group(group_spec spec);
  ~broadcast_group();  // NCCL: aborts the communicator (local; a finalize would wait for the trainer)
  broadcast_group(const broadcast_group&) = delete;
  broadcast_group& operator=(const broadcast_group&) = delete;

  const group_spec& spec() const { return spec_; }
  // Where receive buffers live: the CPU for gloo, the worker's GPU for NCCL.
  at::Device device() const;
  // Receives, in order, one broadcast from rank 0 into each tensor (all are posted, then awaited), each
  // contiguous, on device(). Throws transfer_error when one fails or none completes within the timeout
  // counted from the previous completion; the group is then broken.
  void receive(const std::vector<at::Tensor>& into);
  bool broken() const { return broken_; }

 private:
  struct impl;
  group_spec spec_;
  std::unique_ptr<impl> impl_;
  bool broken_ = false;
};

}  // namespace refit::transfer
