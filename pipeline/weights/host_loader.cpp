#include "pipeline/weights/host_loader.hpp"

#include <ATen/ops/empty.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "pipeline/weights/convert.hpp"
#include "pipeline/weights/parallel.hpp"

namespace refit::weights {

c10::ScalarType to_scalar_type(dtype t) {
  switch (t) {
    case dtype::BOOL: return c10::ScalarType::Bool;
    case dtype::U8: return c10::ScalarType::Byte;
    case dtype::I8: return c10::ScalarType::Char;
    case dtype::I16: return c10::ScalarType::Short;
    case dtype::U16: return c10::ScalarType::UInt16;
    case dtype::I32: return c10::ScalarType::Int;
    case dtype::U32: return c10::ScalarType::UInt32;
    case dtype::I64: return c10::ScalarType::Long;
    case dtype::U64: return c10::ScalarType::UInt64;
    case dtype::F16: return c10::ScalarType::Half;
    case dtype::BF16: return c10::ScalarType::BFloat16;
    case dtype::F32: return c10::ScalarType::Float;
    case dtype::F64: return c10::ScalarType::Double;
    case dtype::C64: return c10::ScalarType::ComplexFloat;
    case dtype::F8_E4M3: return c10::ScalarType::Float8_e4m3fn;
    case dtype::F8_E5M2: return c10::ScalarType::Float8_e5m2;
    case dtype::F8_E8M0: return c10::ScalarType::Float8_e8m0fnu;
    case dtype::F8_E4M3FNUZ: return c10::ScalarType::Float8_e4m3fnuz;
    case dtype::F8_E5M2FNUZ: return c10::ScalarType::Float8_e5m2fnuz;
    default:
      throw weight_error(weight_errc::unconvertible_dtype,
                         "dtype " + std::string(dtype_name(t)) + " has no libtorch tensor type");
  }
}

dtype from_scalar_type(c10::ScalarType t) {
  for (dtype d : all_dtypes) {
    if (dtype_bits(d) < 8) continue;
    try {
      if (to_scalar_type(d) == t) return d;
    } catch (const weight_error&) {
    }
  }
  throw weight_error(weight_errc::unconvertible_dtype, "libtorch type " + std::string(c10::toString(t)) + " has no safetensors dtype");
}

namespace {

void pread_fully(const safetensors_file& f, std::byte* dst, uint64_t len, uint64_t at, const std::string& tensor) {
  uint64_t done = 0;
  while (done < len) {
    ssize_t r = ::pread(f.fd(), dst + done, len - done, static_cast<off_t>(at + done));
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0)
      throw weight_error(weight_errc::io_error, f.path().string() + ": tensor '" + tensor + "': read failed" +
                                                    (r < 0 ? std::string(": ") + std::strerror(errno) : ": file shrank"));
    done += static_cast<uint64_t>(r);
  }
}

struct chunk {
  size_t tensor;
  uint64_t first_elem, elems;
};

}  // namespace

std::vector<std::pair<std::string, at::Tensor>> load_to_host(const module_weights& weights,
                                                             const host_load_options& options) {
  std::vector<std::pair<std::string, at::Tensor>> out;
  std::vector<const tensor_location*> locs;
  std::vector<chunk> chunks;
  for (const auto& [name, loc] : weights.tensors) {
    const tensor_entry& t = *loc.entry;
    const dtype held = held_dtype(t.type, options.float_dtype);
    at::Tensor dst = at::empty(t.shape, at::TensorOptions().dtype(to_scalar_type(held)));
    const uint64_t elem = dtype_bits(t.type) / 8;
    const uint64_t per_chunk = std::max<uint64_t>(1, options.chunk_bytes / elem);
    const uint64_t n = t.numel();
    for (uint64_t e = 0; e < n; e += per_chunk) chunks.push_back({out.size(), e, std::min(per_chunk, n - e)});
    out.emplace_back(name, std::move(dst));
    locs.push_back(&loc);
  }
  parallel_for_each(chunks.size(), options.threads, [&](size_t i) {
    const chunk& c = chunks[i];
    const tensor_location& loc = *locs[c.tensor];
    const tensor_entry& t = *loc.entry;
    const safetensors_file& f = weights.shards[loc.shard];
    at::Tensor& dst = out[c.tensor].second;
    const uint64_t in_elem = dtype_bits(t.type) / 8, out_elem = dst.element_size();
    auto* dst_bytes = static_cast<std::byte*>(dst.data_ptr()) + c.first_elem * out_elem;
    const uint64_t at = f.file_offset(t) + c.first_elem * in_elem;
    if (in_elem == out_elem && held_dtype(t.type, options.float_dtype) == t.type) {
      pread_fully(f, dst_bytes, c.elems * in_elem, at, t.name);
    } else {
      thread_local std::vector<std::byte> buf;
      buf.resize(c.elems * in_elem);
      pread_fully(f, buf.data(), buf.size(), at, t.name);
      convert_elements(t.type, buf.data(), held_dtype(t.type, options.float_dtype), dst_bytes, c.elems);
    }
  });
  return out;
}

}  // namespace refit::weights
