// Test helpers: whole safetensors files to and from name -> CPU tensor maps (for probes that exchange
// inputs and outputs with the Python oracle tests).
#pragma once

#include <ATen/core/Tensor.h>

#include <filesystem>
#include <map>
#include <string>

namespace refit::test {

std::map<std::string, at::Tensor> read_tensors(const std::filesystem::path& file);
void write_tensors(const std::filesystem::path& file, const std::map<std::string, at::Tensor>& tensors);

}  // namespace refit::test
