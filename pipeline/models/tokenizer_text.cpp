#include "pipeline/models/tokenizer_text.hpp"

#include <unicode/unorm2.h>
#include <unicode/ustring.h>

#include <algorithm>

namespace refit::models::text {

// ---------------------------------------------------------------- UTF-8

// Length of the valid UTF-8 sequence at s[i], or 0 when it is not one (overlong, surrogate, > U+10FFFF,
// truncated). The second-byte ranges are the Unicode "well-formed" table.
std::size_t utf8_valid_len(std::string_view s, std::size_t i) {
  const auto b = [&](std::size_t k) { return static_cast<unsigned char>(s[k]); };
  const unsigned char c = b(i);
  if (c < 0x80) return 1;
  std::size_t n;
  unsigned char lo = 0x80, hi = 0xBF;
  if (c >= 0xC2 && c <= 0xDF) n = 2;
  else if (c >= 0xE0 && c <= 0xEF) n = 3, lo = c == 0xE0 ? 0xA0 : 0x80, hi = c == 0xED ? 0x9F : 0xBF;
  else if (c >= 0xF0 && c <= 0xF4) n = 4, lo = c == 0xF0 ? 0x90 : 0x80, hi = c == 0xF4 ? 0x8F : 0xBF;
  else return 0;
  for (std::size_t k = 1; k < n; ++k) {
    if (i + k >= s.size()) return 0;
    const unsigned char x = b(i + k);
    if (k == 1 ? (x < lo || x > hi) : (x < 0x80 || x > 0xBF)) return 0;
  }
  return n;
}

char32_t utf8_at(std::string_view s, std::size_t i, std::size_t n) {
  const auto b = [&](std::size_t k) { return static_cast<char32_t>(static_cast<unsigned char>(s[i + k])); };
  switch (n) {
    case 1: return b(0);
    case 2: return (b(0) & 0x1F) << 6 | (b(1) & 0x3F);
    case 3: return (b(0) & 0x0F) << 12 | (b(1) & 0x3F) << 6 | (b(2) & 0x3F);
    default: return (b(0) & 0x07) << 18 | (b(1) & 0x3F) << 12 | (b(2) & 0x3F) << 6 | (b(3) & 0x3F);
  }
}

void append_utf8(std::string& out, char32_t c) {
  if (c < 0x80) {
    out += static_cast<char>(c);
  } else if (c < 0x800) {
    out += static_cast<char>(0xC0 | c >> 6), out += static_cast<char>(0x80 | (c & 0x3F));
  } else if (c < 0x10000) {
    out += static_cast<char>(0xE0 | c >> 12), out += static_cast<char>(0x80 | (c >> 6 & 0x3F));
    out += static_cast<char>(0x80 | (c & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | c >> 18), out += static_cast<char>(0x80 | (c >> 12 & 0x3F));
    out += static_cast<char>(0x80 | (c >> 6 & 0x3F)), out += static_cast<char>(0x80 | (c & 0x3F));
  }
}

bool is_valid_utf8(std::string_view s) {
  for (std::size_t i = 0; i < s.size();) {
    const std::size_t n = utf8_valid_len(s, i);
    if (n == 0) return false;
    i += n;
  }
  return true;
}

// Rust's String::from_utf8_lossy (what the ByteLevel decoder returns): each maximal prefix of a
// well-formed sequence that cannot be completed becomes one U+FFFD.
std::string utf8_lossy(std::string_view s) {
  std::string out;
  out.reserve(s.size());
  for (std::size_t i = 0; i < s.size();) {
    if (const std::size_t n = utf8_valid_len(s, i)) {
      out.append(s.substr(i, n));
      i += n;
      continue;
    }
    const unsigned char c = static_cast<unsigned char>(s[i]);
    std::size_t need = c >= 0xC2 && c <= 0xDF ? 2 : c >= 0xE0 && c <= 0xEF ? 3 : c >= 0xF0 && c <= 0xF4 ? 4 : 1;
    std::size_t k = 1;
    for (; k < need && i + k < s.size(); ++k) {
      const unsigned char x = static_cast<unsigned char>(s[i + k]);
      const unsigned char lo = k == 1 && c == 0xE0 ? 0xA0 : k == 1 && c == 0xF0 ? 0x90 : 0x80;
      const unsigned char hi = k == 1 && c == 0xED ? 0x9F : k == 1 && c == 0xF4 ? 0x8F : 0xBF;
      if (x < lo || x > hi) break;
    }
    out += "\xEF\xBF\xBD";
    i += k;
  }
  return out;
}

// Rust's char::is_whitespace (Unicode White_Space), which added-token lstrip/rstrip use.
bool is_white_space(char32_t c) {
  return (c >= 0x09 && c <= 0x0D) || c == 0x20 || c == 0x85 || c == 0xA0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F ||
         c == 0x3000;
}

// Byte offset where the run of white space ending s starts (s.size() when s ends otherwise).
std::size_t white_space_run_start_at_end(std::string_view s) {
  std::size_t start = s.size();
  bool in_run = false;
  for (std::size_t i = 0; i < s.size();) {
    const std::size_t n = utf8_valid_len(s, i);
    const bool ws = is_white_space(utf8_at(s, i, n));
    if (ws && !in_run) start = i;
    in_run = ws;
    i += n;
  }
  return in_run ? start : s.size();
}

std::size_t white_space_run_len_at_start(std::string_view s) {
  std::size_t i = 0;
  while (i < s.size()) {
    const std::size_t n = utf8_valid_len(s, i);
    if (!is_white_space(utf8_at(s, i, n))) break;
    i += n;
  }
  return i;
}

// ---------------------------------------------------------------- byte level

byte_level_table::byte_level_table() {
  char_to_byte.fill(-1);
  std::array<bool, 256> printable{};
  int k = 0;
  for (int b = 0; b < 256; ++b) printable[b] = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE;
  for (int b = 0; b < 256; ++b)
    if (printable[b]) order[k++] = static_cast<uint8_t>(b);
  for (int b = 0; b < 256; ++b)
    if (!printable[b]) order[k++] = static_cast<uint8_t>(b);
  int extra = 0;
  for (int b = 0; b < 256; ++b) {
    const char32_t c = printable[b] ? static_cast<char32_t>(b) : static_cast<char32_t>(256 + extra++);
    append_utf8(byte_to_char[b], c);
    char_to_byte[c] = b;
  }
}

const byte_level_table& byte_level() {
  static const byte_level_table t;
  return t;
}

// ---------------------------------------------------------------- NFC

std::string nfc(std::string_view s) {
  if (std::all_of(s.begin(), s.end(), [](char c) { return static_cast<unsigned char>(c) < 0x80; }))
    return std::string(s);
  UErrorCode err = U_ZERO_ERROR;
  const UNormalizer2* n = unorm2_getNFCInstance(&err);
  std::u16string in(s.size(), u'\0'), out;
  int32_t len = 0;
  u_strFromUTF8(in.data(), static_cast<int32_t>(in.size()), &len, s.data(), static_cast<int32_t>(s.size()), &err);
  in.resize(len);
  out.resize(in.size() * 3 + 16);
  len = unorm2_normalize(n, in.data(), static_cast<int32_t>(in.size()), out.data(), static_cast<int32_t>(out.size()), &err);
  out.resize(len);
  std::string res(out.size() * 3, '\0');
  u_strToUTF8(res.data(), static_cast<int32_t>(res.size()), &len, out.data(), static_cast<int32_t>(out.size()), &err);
  if (U_FAILURE(err)) throw tokenizer_error(std::string("NFC normalisation failed: ") + u_errorName(err));
  res.resize(len);
  return res;
}

// ---------------------------------------------------------------- regex split

// `tokenizers` compiles Split patterns with Oniguruma, whose Unicode \s is exactly White_Space; PCRE2's
// \s also takes U+180E. Spelling \s out keeps the two engines in step.
constexpr std::string_view white_space_set =
    R"(\t\n\x{0B}\f\r \x{85}\x{A0}\x{1680}\x{2000}-\x{200A}\x{2028}\x{2029}\x{202F}\x{205F}\x{3000})";

std::string onig_compatible(std::string_view pattern) {
  std::string out;
  bool in_class = false;
  for (std::size_t i = 0; i < pattern.size(); ++i) {
    const char c = pattern[i];
    if (c == '\\' && i + 1 < pattern.size()) {
      const char e = pattern[++i];
      if (e == 's') out += in_class ? std::string(white_space_set) : "[" + std::string(white_space_set) + "]";
      else if (e == 'S' && !in_class) out += "[^" + std::string(white_space_set) + "]";
      else out += c, out += e;
      continue;
    }
    if (c == '[' && !in_class) {
      in_class = true;
      out += c;
      if (i + 1 < pattern.size() && pattern[i + 1] == '^') out += pattern[++i];
      if (i + 1 < pattern.size() && pattern[i + 1] == ']') out += pattern[++i];  // a leading ] is literal
      continue;
    }
    if (c == ']' && in_class) in_class = false;
    out += c;
  }
  return out;
}

}  // namespace refit::models::text
