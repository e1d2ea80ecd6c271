#include "tests/tools/tensor_io.hpp"

#include <ATen/ATen.h>

#include "pipeline/weights/host_loader.hpp"
#include "pipeline/weights/safetensors.hpp"

namespace refit::test {

using namespace refit::weights;

std::map<std::string, at::Tensor> read_tensors(const std::filesystem::path& file) {
  auto f = safetensors_file::open(file);
  std::map<std::string, at::Tensor> out;
  for (const auto& t : f.header().tensors) {
    at::Tensor dst = at::empty(t.shape, at::TensorOptions().dtype(to_scalar_type(t.type)));
    auto bytes = f.bytes(t);
    if (!bytes.empty()) std::memcpy(dst.data_ptr(), bytes.data(), bytes.size());
    out.emplace(t.name, dst);
  }
  return out;
}

void write_tensors(const std::filesystem::path& file, const std::map<std::string, at::Tensor>& tensors) {
  std::vector<tensor_spec> specs;
  std::map<std::string, at::Tensor> contiguous;
  for (const auto& [name, t] : tensors) {
    at::Tensor c = t.detach().to(at::kCPU).contiguous();
    specs.push_back({name, from_scalar_type(c.scalar_type()), c.sizes().vec()});
    contiguous.emplace(name, c);
  }
  safetensors_writer w(file, specs);
  for (const auto& [name, c] : contiguous)
    w.write(name, {static_cast<const std::byte*>(c.data_ptr()), c.nbytes()});
  w.finish();
}

}  // namespace refit::test
