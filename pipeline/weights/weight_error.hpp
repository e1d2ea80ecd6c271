// The one exception type of the weight store: which rule a file broke, and where.
#pragma once

#include <cstdint>
#include <iosfwd>
#include <stdexcept>
#include <string>
#include <string_view>

namespace refit::weights {

// Each rule of the safetensors format and of the Diffusers layout that refit enforces.
enum class weight_errc : uint8_t {
  io_error,                 // open/stat/read/mmap failed
  file_too_small,           // fewer than 8 bytes
  header_too_large,         // header length above the 100 MB bound
  header_out_of_file,       // header length runs past the end of the file
  header_not_utf8,
  header_bad_start,         // does not start with '{'
  header_bad_json,
  header_not_object,
  duplicate_tensor,
  entry_not_object,
  unknown_dtype,
  bad_shape,
  bad_offsets,
  length_mismatch,          // data_offsets length != numel * element size
  offsets_out_of_data,      // end beyond the data area
  tiling_gap,               // a hole between tensors (or before the first)
  tiling_overlap,
  trailing_bytes,           // data area longer than the tensors cover
  bad_metadata,             // __metadata__ not a map of strings
  unknown_entry_field,
  // Diffusers layout
  bad_model_index,
  missing_component,
  bad_shard_index,
  missing_shard,
  shard_mismatch,           // weight_map and shard contents disagree
  tensor_in_two_shards,
  no_weights,
  unknown_module,
  unconvertible_dtype,
  file_changed,             // written while it was read
  outside_root,             // resolves outside the allowed model roots (refit serve --allowed-model-root)
};

std::string_view to_string(weight_errc code);
std::ostream& operator<<(std::ostream& os, weight_errc code);

class weight_error : public std::runtime_error {
 public:
  weight_error(weight_errc code, std::string message)
      : std::runtime_error(std::move(message)), code_(code) {}
  weight_errc code() const noexcept { return code_; }

 private:
  weight_errc code_;
};

}  // namespace refit::weights
