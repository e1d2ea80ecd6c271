// Text handling under the byte-level BPE tokenizer (internal to tokenizer*.cpp): UTF-8 as the Rust
// `tokenizers` library judges it, GPT-2's byte-to-unicode table, NFC, and the Split pre-tokenizer's
// regex (PCRE2, spelled to match Oniguruma's Unicode classes).
#pragma once

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <array>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <string>
#include <string_view>

#include "pipeline/models/tokenizer.hpp"

namespace refit::models::text {

// Length of the valid UTF-8 sequence at s[i], or 0 when it is not one (overlong, surrogate, > U+10FFFF,
// truncated). The second-byte ranges are the Unicode "well-formed" table.
std::size_t utf8_valid_len(std::string_view s, std::size_t i);
// The code point of the n-byte sequence at s[i].
char32_t utf8_at(std::string_view s, std::size_t i, std::size_t n);
void append_utf8(std::string& out, char32_t c);
bool is_valid_utf8(std::string_view s);
// Rust's String::from_utf8_lossy (what the ByteLevel decoder returns): each maximal prefix of a
// well-formed sequence that cannot be completed becomes one U+FFFD.
std::string utf8_lossy(std::string_view s);
// Rust's char::is_whitespace (Unicode White_Space), which added-token lstrip/rstrip use.
bool is_white_space(char32_t c);
// Byte offset where the run of white space ending s starts (s.size() when s ends otherwise).
std::size_t white_space_run_start_at_end(std::string_view s);
std::size_t white_space_run_len_at_start(std::string_view s);

// GPT-2's bytes_to_unicode: printable bytes map to themselves, the rest to U+0100 upwards, in this order.
struct byte_level_table {
  std::array<std::string, 256> byte_to_char;
  std::array<int, 324> char_to_byte;  // code points 0..0x143, -1 where no byte maps
  std::array<uint8_t, 256> order;     // bytes in bytes_to_unicode order (the base vocabulary's ids)

  byte_level_table();
};

const byte_level_table& byte_level();

// NFC normalisation (ICU).
std::string nfc(std::string_view s);

// A Split pattern in Oniguruma's syntax rewritten for PCRE2 (\s spelled out as White_Space).
std::string onig_compatible(std::string_view pattern);

// Qwen2's pre-tokenizer split pattern.
constexpr std::string_view qwen2_split_pattern =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";

// The Split pre-tokenizer (behavior Isolated, invert false).
class split_pattern {
 public:
  split_pattern() = default;
  split_pattern(const split_pattern&) = delete;
  split_pattern& operator=(const split_pattern&) = delete;
  ~split_pattern() { pcre2_code_free(code_); }

  void compile(const std::filesystem::path& file, std::string_view pattern, bool literal) {
    int err = 0;
    PCRE2_SIZE at = 0;
    const std::string p = literal ? std::string(pattern) : onig_compatible(pattern);
    code_ = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(p.data()), p.size(),
                          PCRE2_UTF | PCRE2_UCP | (literal ? PCRE2_LITERAL : 0), &err, &at, nullptr);
    if (!code_) {
      PCRE2_UCHAR msg[256];
      pcre2_get_error_message(err, msg, sizeof msg);
      throw tokenizer_error(file.string() + ": pre_tokenizer Split pattern does not compile at offset " + std::to_string(at) + ": " +
                            reinterpret_cast<const char*>(msg));
    }
    pcre2_jit_compile(code_, PCRE2_JIT_COMPLETE);  // the interpreter runs it where JIT is absent
  }

  // Calls f on every piece of valid UTF-8 s: each match and each gap between matches.
  template <class F>
  void for_each_piece(std::string_view s, F&& f) const {
    const std::unique_ptr<pcre2_match_data, decltype(&pcre2_match_data_free)> md(
        pcre2_match_data_create_from_pattern(code_, nullptr), &pcre2_match_data_free);
    std::size_t prev = 0, off = 0;
    while (off < s.size()) {
      const int rc = pcre2_match(code_, reinterpret_cast<PCRE2_SPTR>(s.data()), s.size(), off, PCRE2_NO_UTF_CHECK,
                                 md.get(), nullptr);
      if (rc == PCRE2_ERROR_NOMATCH) break;
      if (rc < 0) throw tokenizer_error("pre_tokenizer Split pattern failed to match (PCRE2 error " + std::to_string(rc) + ")");
      const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md.get());
      const std::size_t b = ov[0], e = ov[1];
      if (e == b) {  // an empty match splits nothing; step over one character
        off = e + std::max<std::size_t>(1, utf8_valid_len(s, e));
        continue;
      }
      if (b > prev) f(s.substr(prev, b - prev));
      f(s.substr(b, e - b));
      prev = off = e;
    }
    if (prev < s.size()) f(s.substr(prev));
  }

 private:
  pcre2_code* code_ = nullptr;
};

}  // namespace refit::models::text
