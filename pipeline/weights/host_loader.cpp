#include "pipeline/weights/host_loader.hpp"

#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <sys/mman.h>
#include <unistd.h>

#include <memory>
#include <set>

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

// A whole shard mapped privately; tensors made over it keep it alive through their deleters.
struct private_mapping {
  void* base = nullptr;
  size_t size = 0;
  ~private_mapping() {
    if (base) ::munmap(base, size);
  }
};

std::shared_ptr<private_mapping> map_private(const safetensors_file& f) {
  auto m = std::make_shared<private_mapping>();
  m->size = f.file_size();
  void* p = ::mmap(nullptr, m->size, PROT_READ | PROT_WRITE, MAP_PRIVATE, f.fd(), 0);
  if (p == MAP_FAILED)
    throw weight_error(weight_errc::io_error, f.path().string() + ": cannot map: " + std::strerror(errno));
  m->base = p;
  return m;
}

}  // namespace

void read_into(const module_weights& weights, const named_tensors& out, const host_load_options& options) {
  std::vector<const tensor_location*> locs;
  std::vector<chunk> chunks;
  for (size_t i = 0; i < out.size(); ++i) {
    const auto& [name, dst] = out[i];
    auto it = weights.tensors.find(name);
    if (it == weights.tensors.end())
      throw weight_error(weight_errc::shard_mismatch, weights.dir.string() + ": no tensor '" + name + "' to read");
    const tensor_entry& t = *it->second.entry;
    const dtype held = held_dtype(t.type, options.float_dtype);
    if (!dst.is_contiguous() || !dst.device().is_cpu() || dst.sizes().vec() != t.shape || dst.scalar_type() != to_scalar_type(held))
      throw weight_error(weight_errc::bad_shape, weights.dir.string() + ": tensor '" + name +
                                                     "': destination is not a contiguous CPU tensor of its shape and dtype");
    const uint64_t elem = dtype_bits(t.type) / 8;
    const uint64_t per_chunk = std::max<uint64_t>(1, options.chunk_bytes / elem);
    const uint64_t n = t.numel();
    for (uint64_t e = 0; e < n; e += per_chunk) chunks.push_back({i, e, std::min(per_chunk, n - e)});
    locs.push_back(&it->second);
  }
  parallel_for_each(chunks.size(), options.threads, [&](size_t i) {
    const chunk& c = chunks[i];
    const tensor_location& loc = *locs[c.tensor];
    const tensor_entry& t = *loc.entry;
    const safetensors_file& f = weights.shards[loc.shard];
    const at::Tensor& dst = out[c.tensor].second;
    const dtype held = held_dtype(t.type, options.float_dtype);
    const uint64_t in_elem = dtype_bits(t.type) / 8, out_elem = dst.element_size();
    auto* dst_bytes = static_cast<std::byte*>(dst.data_ptr()) + c.first_elem * out_elem;
    const uint64_t at = f.file_offset(t) + c.first_elem * in_elem;
    if (held == t.type) {
      pread_fully(f, dst_bytes, c.elems * in_elem, at, t.name);
    } else {
      thread_local std::vector<std::byte> buf;
      buf.resize(c.elems * in_elem);
      pread_fully(f, buf.data(), buf.size(), at, t.name);
      convert_elements(t.type, buf.data(), held, dst_bytes, c.elems);
    }
  });
  std::set<size_t> shards;
  for (const auto* loc : locs) shards.insert(loc->shard);
  for (size_t s : shards) weights.shards[s].check_unchanged();
}

named_tensors load_to_host(const module_weights& weights, const host_load_options& options) {
  named_tensors out, to_copy;
  std::vector<std::shared_ptr<private_mapping>> maps(weights.shards.size());
  for (const auto& [name, loc] : weights.tensors) {
    const tensor_entry& t = *loc.entry;
    const dtype held = held_dtype(t.type, options.float_dtype);
    const auto options_for = at::TensorOptions().dtype(to_scalar_type(held));
    const uint64_t align = std::max<uint64_t>(1, dtype_bits(held) / 8);
    const safetensors_file& f = weights.shards[loc.shard];
    if (options.storage == host_load_options::backing::mapped && held == t.type && f.file_offset(t) % align == 0 && t.nbytes() > 0) {
      auto& m = maps[loc.shard];
      if (!m) m = map_private(f);
      void* data = static_cast<std::byte*>(m->base) + f.file_offset(t);
      out.emplace_back(name, at::from_blob(data, t.shape, [keep = m](void*) {}, options_for));
    } else {
      out.emplace_back(name, at::empty(t.shape, options_for));
      to_copy.push_back(out.back());
    }
  }
  read_into(weights, to_copy, options);
  return out;
}

}  // namespace refit::weights
