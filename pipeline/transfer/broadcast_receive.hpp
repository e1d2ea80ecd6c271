// Receiving an update a trainer announced (names, dtypes, shapes, in broadcast order) over a broadcast
// group: the announcement is checked against the modules before any byte moves, then received into
// fresh buffers (received_weights); an announcement refit refuses is drained (received and dropped) so
// that the trainer's broadcasts complete and the group stays usable.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace refit::pipeline {
class diffusion_pipeline;
}

namespace refit::transfer {

class broadcast_group;
class received_weights;

struct announced_tensor {
  std::string module;      // the target module it belongs to
  std::string name;        // its name in that module
  std::string wire_name;   // as the trainer named it (messages quote this)
  c10::ScalarType dtype = c10::ScalarType::Float;
  std::vector<int64_t> shape;
};

struct announcement {
  std::vector<announced_tensor> tensors;  // in broadcast order
  bool flattened_bucket = false;          // one uint8 broadcast of the tensors back to back, in order
  bool lora = false;                      // LoRA A/B weights of the modules' 2-D weights (lora_merge)
  uint64_t bytes() const;
};

// Byte size of one announced tensor; throws std::invalid_argument for a negative dimension or a size
// past 2^63.
uint64_t announced_bytes(const announced_tensor& t);

// Before any byte moves: every tensor exists in its module with that shape and a dtype that converts to
// the held one (LoRA: is an A or B weight whose shape fits the weight it targets), none is announced twice, and (flattened_bucket) each starts at a multiple of its element
// size. Throws std::invalid_argument naming the tensor as the trainer named it.
void check_announcement(pipeline::diffusion_pipeline& pipe, const announcement& a);

// Receives into fresh buffers of the announced dtypes on the group's device. Throws transfer_error when
// the transfer fails (the group is broken); an allocation that fails throws before anything is posted.
std::shared_ptr<received_weights> receive_announced(broadcast_group& group, const announcement& a, const std::string& origin);

// Receives the announced broadcasts into scratch memory and drops them. Throws transfer_error (the group
// is broken), or an allocation error before anything is posted.
void drain_announced(broadcast_group& group, const announcement& a);

}  // namespace refit::transfer
