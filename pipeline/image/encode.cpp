#include "pipeline/image/encode.hpp"

#include <cstdio>  // jpeglib.h needs FILE
#include <jpeglib.h>
#include <webp/encode.h>

#include <cmath>
#include <csetjmp>
#include <stdexcept>
#include <string>

#include "pipeline/image/png.hpp"

namespace refit::image {

namespace {

constexpr int default_quality = 75;

// libjpeg reports errors through a callback that must not return; jump back out of the encoder.
struct jpeg_failure {
  jpeg_error_mgr base;
  std::jmp_buf jump;
  char message[JMSG_LENGTH_MAX];
};

std::vector<uint8_t> encode_jpeg(const std::vector<uint8_t>& pixels, uint32_t width, uint32_t height, int quality) {
  jpeg_compress_struct c{};
  jpeg_failure err{};
  c.err = jpeg_std_error(&err.base);
  err.base.error_exit = [](j_common_ptr info) {
    auto* e = reinterpret_cast<jpeg_failure*>(info->err);
    info->err->format_message(info, e->message);
    std::longjmp(e->jump, 1);
  };
  unsigned char* out = nullptr;
  unsigned long out_size = 0;
  if (setjmp(err.jump)) {
    jpeg_destroy_compress(&c);
    std::free(out);
    throw std::runtime_error(std::string("JPEG encoding failed: ") + err.message);
  }
  jpeg_create_compress(&c);
  jpeg_mem_dest(&c, &out, &out_size);
  c.image_width = width;
  c.image_height = height;
  c.input_components = 3;
  c.in_color_space = JCS_RGB;
  jpeg_set_defaults(&c);
  jpeg_set_quality(&c, quality, TRUE);
  jpeg_start_compress(&c, TRUE);
  const size_t row = static_cast<size_t>(width) * 3;
  while (c.next_scanline < c.image_height) {
    JSAMPROW line = const_cast<JSAMPROW>(pixels.data() + c.next_scanline * row);
    jpeg_write_scanlines(&c, &line, 1);
  }
  jpeg_finish_compress(&c);
  jpeg_destroy_compress(&c);
  std::vector<uint8_t> bytes(out, out + out_size);
  std::free(out);
  return bytes;
}

std::vector<uint8_t> encode_webp(const std::vector<uint8_t>& pixels, uint32_t width, uint32_t height, int quality) {
  uint8_t* out = nullptr;
  const size_t size = WebPEncodeRGB(pixels.data(), static_cast<int>(width), static_cast<int>(height), static_cast<int>(width) * 3,
                                    static_cast<float>(quality), &out);
  if (size == 0) {
    WebPFree(out);
    throw std::runtime_error("WebP encoding failed (" + std::to_string(width) + "x" + std::to_string(height) + ")");
  }
  std::vector<uint8_t> bytes(out, out + size);
  WebPFree(out);
  return bytes;
}

}  // namespace

std::optional<format> parse_format(std::string_view name) {
  if (name == "png") return format::png;
  if (name == "jpeg" || name == "jpg") return format::jpeg;
  if (name == "webp") return format::webp;
  return std::nullopt;
}

std::string_view format_name(format f) {
  switch (f) {
    case format::png: return "png";
    case format::jpeg: return "jpeg";
    case format::webp: return "webp";
  }
  return "png";
}

std::string_view mime_type(format f) {
  switch (f) {
    case format::png: return "image/png";
    case format::jpeg: return "image/jpeg";
    case format::webp: return "image/webp";
  }
  return "application/octet-stream";
}

std::vector<uint8_t> encode(const std::vector<uint8_t>& pixels, uint32_t width, uint32_t height, format f, std::optional<int> compression) {
  if (compression && (*compression < 0 || *compression > 100)) throw std::invalid_argument("output_compression must be between 0 and 100");
  if (width == 0 || height == 0 || pixels.size() != static_cast<size_t>(width) * height * 3)
    throw std::invalid_argument("image encoding: the pixel buffer does not match width * height * 3");
  switch (f) {
    case format::png: return encode_png_rgb(pixels, width, height, compression ? static_cast<int>(std::lround(*compression * 9 / 100.0)) : 6);
    case format::jpeg: return encode_jpeg(pixels, width, height, compression.value_or(default_quality));
    case format::webp: return encode_webp(pixels, width, height, compression.value_or(default_quality));
  }
  throw std::invalid_argument("unknown image format");
}

}  // namespace refit::image
