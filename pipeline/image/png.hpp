// PNG encoding of 8-bit RGB images: deterministic bytes for the same pixels (fixed zlib level, filter 0),
// so same seed and same weights give byte-identical files.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

namespace refit::image {

// pixels: height * width * 3 bytes, row-major RGB; zlib_level 0-9.
std::vector<uint8_t> encode_png_rgb(const std::vector<uint8_t>& pixels, uint32_t width, uint32_t height, int zlib_level = 6);
void write_file(const std::filesystem::path& path, const std::vector<uint8_t>& bytes);

}  // namespace refit::image
