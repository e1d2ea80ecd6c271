// Encoding generated images for clients: PNG (deterministic bytes: refit's own writer over zlib), JPEG
// (libjpeg-turbo) and WebP (libwebp), with OpenAI's output_compression (0-100) for the lossy formats.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace refit::image {

enum class format : uint8_t { png, jpeg, webp };

std::optional<format> parse_format(std::string_view name);  // png, jpeg (or jpg), webp
std::string_view format_name(format f);                     // png, jpeg, webp
std::string_view mime_type(format f);                       // image/png, image/jpeg, image/webp

// pixels: height * width * 3 bytes, row-major RGB. compression: 0-100 (quality for JPEG and WebP; PNG
// maps it to the zlib level as SGLang does, round(c / 100 * 9)); nullopt: the format's default (PNG zlib
// level 6, JPEG and WebP quality 75, SGLang's). Throws std::invalid_argument on bad input.
std::vector<uint8_t> encode(const std::vector<uint8_t>& pixels, uint32_t width, uint32_t height, format f,
                            std::optional<int> compression = std::nullopt);

}  // namespace refit::image
