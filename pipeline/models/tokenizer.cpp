// Byte-level BPE as the `tokenizers` library runs it for Qwen2: added-token extraction, NFC,
// regex split (Isolated), byte-to-unicode mapping, rank-ordered merges; ByteLevel decoding.
#include "pipeline/models/tokenizer.hpp"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#include <unicode/unorm2.h>
#include <unicode/ustring.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <array>
#include <fstream>
#include <map>
#include <mutex>
#include <queue>
#include <unordered_map>

namespace refit::models {
namespace {

using json = nlohmann::json;

[[noreturn]] void fail(const std::filesystem::path& file, const std::string& what) {
  throw tokenizer_error(file.string() + ": " + what);
}

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

// GPT-2's bytes_to_unicode: printable bytes map to themselves, the rest to U+0100 upwards, in this order.
struct byte_level_table {
  std::array<std::string, 256> byte_to_char;
  std::array<int, 324> char_to_byte;  // code points 0..0x143, -1 where no byte maps
  std::array<uint8_t, 256> order;     // bytes in bytes_to_unicode order (the base vocabulary's ids)

  byte_level_table() {
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
};

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
      fail(file, "pre_tokenizer Split pattern does not compile at offset " + std::to_string(at) + ": " +
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

// ---------------------------------------------------------------- added tokens

struct added_token {
  std::string content;  // as matched: normalised when `normalized`
  int32_t id;
  bool special, lstrip, rstrip, normalized;
};

struct piece {
  std::string text;
  int32_t token = -1;  // >= 0: an added token, already final
};

// Leftmost-longest, non-overlapping matches (the library's Aho-Corasick MatchKind::LeftmostLongest),
// then lstrip/rstrip widening, as AddedVocabulary::find_matches does it.
void split_added(std::string_view s, const std::vector<const added_token*>& tokens, std::vector<piece>& out) {
  if (tokens.empty()) {
    if (!s.empty()) out.push_back({std::string(s)});
    return;
  }
  std::size_t start_offset = 0, pos = 0;
  while (pos < s.size()) {
    const added_token* best = nullptr;
    for (const added_token* t : tokens)
      if (s.compare(pos, t->content.size(), t->content) == 0 && (!best || t->content.size() > best->content.size()))
        best = t;
    if (!best) {
      pos += std::max<std::size_t>(1, utf8_valid_len(s, pos));
      continue;
    }
    std::size_t start = pos, stop = pos + best->content.size();
    pos = stop;
    if (best->lstrip) start = std::max(white_space_run_start_at_end(s.substr(0, start)), start_offset);
    if (best->rstrip) stop += white_space_run_len_at_start(s.substr(stop));
    if (start_offset < start) out.push_back({std::string(s.substr(start_offset, start - start_offset))});
    out.push_back({std::string(s.substr(start, stop - start)), best->id});
    start_offset = stop;
  }
  if (start_offset < s.size()) out.push_back({std::string(s.substr(start_offset))});
}

std::string read_text(const std::filesystem::path& p) {
  std::ifstream f(p, std::ios::binary);
  if (!f) throw tokenizer_error(p.string() + ": cannot open");
  return {std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>()};
}

constexpr std::string_view qwen2_split_pattern =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";

}  // namespace

// ---------------------------------------------------------------- the tokenizer

struct bpe_tokenizer::impl {
  std::filesystem::path file;
  bool use_nfc = false;
  split_pattern split;
  std::unordered_map<std::string, int32_t> vocab;
  std::unordered_map<int32_t, std::string> tokens_by_id;       // vocab, then added tokens over it
  std::unordered_map<uint64_t, std::pair<int32_t, int32_t>> merges;  // (left, right) -> (rank, merged id)
  std::array<int32_t, 256> byte_ids;                            // -1: byte's char absent from vocab
  bool ignore_merges = false;
  std::vector<added_token> added;
  std::vector<const added_token*> raw_added, normalized_added;  // matched before / after NFC
  std::unordered_map<std::string, int32_t> added_by_content;    // original content -> id
  std::unordered_map<int32_t, bool> special_ids;
  int32_t pad_id = -1;
  bool pad_left = false, truncate_left = false;

  mutable std::mutex cache_mutex;
  mutable std::unordered_map<std::string, std::vector<int32_t>> cache;

  static uint64_t pair_key(int32_t a, int32_t b) { return static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32 | static_cast<uint32_t>(b); }

  // BPE of one pre-token, merges applied lowest rank first, leftmost first on ties (tokenizers' Word::merge_all).
  void bpe(std::string_view word, std::vector<int32_t>& out) const {
    if (ignore_merges) {
      std::string mapped;
      for (unsigned char b : word) mapped += byte_level().byte_to_char[b];
      if (auto it = vocab.find(mapped); it != vocab.end()) return out.push_back(it->second);
    }
    struct symbol { int32_t id; int prev, next; bool alive; };
    std::vector<symbol> sym;
    sym.reserve(word.size());
    for (unsigned char b : word) {
      if (byte_ids[b] < 0) continue;  // no unk token and no byte fallback: the library drops it too
      const int i = static_cast<int>(sym.size());
      sym.push_back({byte_ids[b], i - 1, i + 1, true});
    }
    if (sym.empty()) return;
    sym.back().next = -1;
    struct candidate { int32_t rank; int pos; int32_t new_id; };
    const auto later = [](const candidate& a, const candidate& b) { return a.rank != b.rank ? a.rank > b.rank : a.pos > b.pos; };
    std::priority_queue<candidate, std::vector<candidate>, decltype(later)> queue(later);
    const auto push_pair = [&](int pos) {
      if (pos < 0 || sym[pos].next < 0) return;
      if (auto it = merges.find(pair_key(sym[pos].id, sym[sym[pos].next].id)); it != merges.end())
        queue.push({it->second.first, pos, it->second.second});
    };
    for (int i = 0; i + 1 < static_cast<int>(sym.size()); ++i) push_pair(i);
    while (!queue.empty()) {
      const candidate top = queue.top();
      queue.pop();
      symbol& left = sym[top.pos];
      if (!left.alive || left.next < 0) continue;
      const auto it = merges.find(pair_key(left.id, sym[left.next].id));
      if (it == merges.end() || it->second.second != top.new_id) continue;  // a stale entry
      symbol& right = sym[left.next];
      left.id = top.new_id;
      right.alive = false;
      left.next = right.next;
      if (left.next >= 0) sym[left.next].prev = top.pos;
      push_pair(left.prev);
      push_pair(top.pos);
    }
    for (const symbol& s : sym)
      if (s.alive) out.push_back(s.id);
  }

  void encode_pretoken(std::string_view word, std::vector<int32_t>& out) const {
    constexpr std::size_t cache_word_limit = 256, cache_entries_limit = 100000;
    if (word.size() < cache_word_limit) {
      std::lock_guard lock(cache_mutex);
      if (auto it = cache.find(std::string(word)); it != cache.end()) {
        out.insert(out.end(), it->second.begin(), it->second.end());
        return;
      }
    }
    const std::size_t first = out.size();
    bpe(word, out);
    if (word.size() < cache_word_limit) {
      std::lock_guard lock(cache_mutex);
      if (cache.size() >= cache_entries_limit) cache.clear();
      cache.emplace(std::string(word), std::vector<int32_t>(out.begin() + first, out.end()));
    }
  }

  std::vector<int32_t> encode(std::string_view text) const {
    if (!is_valid_utf8(text)) throw tokenizer_error("tokenizer input is not valid UTF-8");
    std::vector<piece> raw, pieces;
    split_added(text, raw_added, raw);
    for (piece& p : raw) {
      if (p.token >= 0) pieces.push_back(std::move(p));
      else split_added(use_nfc ? nfc(p.text) : p.text, normalized_added, pieces);
    }
    std::vector<int32_t> ids;
    for (const piece& p : pieces) {
      if (p.token >= 0) ids.push_back(p.token);
      else split.for_each_piece(p.text, [&](std::string_view w) { encode_pretoken(w, ids); });
    }
    return ids;
  }
};


namespace {

bool null_or(const json& j, const char* key, const json& value) {
  return !j.contains(key) || j[key].is_null() || j[key] == value;
}

std::string describe(const json& component) {
  if (component.is_object() && component.contains("type")) return component["type"].dump();
  const std::string s = component.dump();
  return s.size() > 120 ? s.substr(0, 120) + "..." : s;
}

std::string config_token(const json& v) {
  if (v.is_string()) return v.get<std::string>();
  if (v.is_object() && v.contains("content")) return v["content"].get<std::string>();
  return {};
}

}  // namespace

bpe_tokenizer::bpe_tokenizer(std::unique_ptr<impl> p) : impl_(std::move(p)) {}
bpe_tokenizer::bpe_tokenizer(bpe_tokenizer&&) noexcept = default;
bpe_tokenizer& bpe_tokenizer::operator=(bpe_tokenizer&&) noexcept = default;
bpe_tokenizer::~bpe_tokenizer() = default;

bpe_tokenizer bpe_tokenizer::from_file(const std::filesystem::path& path) {
  auto t = std::make_unique<impl>();
  t->file = path;
  json j;
  try {
    j = json::parse(read_text(path));
  } catch (const json::exception& e) {
    fail(path, std::string("not valid JSON: ") + e.what());
  }
  if (!j.is_object()) fail(path, "expected a JSON object");
  try {
    for (const auto& [key, value] : j.items()) {
      static const std::array<std::string_view, 9> known = {"version", "truncation", "padding", "added_tokens", "normalizer",
                                                            "pre_tokenizer", "model", "decoder", "post_processor"};
      if (std::find(known.begin(), known.end(), key) == known.end()) fail(path, "unsupported component '" + key + "'");
    }
    for (const char* key : {"truncation", "padding"})
      if (j.contains(key) && !j[key].is_null())
        fail(path, std::string("unsupported component ") + key + ": must be null (refit pads and truncates in encode_klein_prompts)");

    const json normalizer = j.value("normalizer", json());
    if (normalizer.is_object() && normalizer.value("type", "") == "NFC") t->use_nfc = true;
    else if (!normalizer.is_null()) fail(path, "unsupported normalizer " + describe(normalizer) + " (supported: NFC or null)");

    const json pre = j.value("pre_tokenizer", json());
    const auto bad_pre = [&](const std::string& why) {
      fail(path, "unsupported pre_tokenizer (" + why + "); supported: Sequence[Split(Regex or String, behavior Isolated, "
                 "invert false), ByteLevel(add_prefix_space false, use_regex false)]");
    };
    if (!pre.is_object() || pre.value("type", "") != "Sequence" || !pre.contains("pretokenizers") ||
        !pre["pretokenizers"].is_array() || pre["pretokenizers"].size() != 2)
      bad_pre("found " + describe(pre));
    const json& split = pre["pretokenizers"][0];
    const json& bytes = pre["pretokenizers"][1];
    if (split.value("type", "") != "Split") bad_pre("first step is " + describe(split));
    if (split.value("behavior", "") != "Isolated") bad_pre("Split behavior " + split.value("behavior", json()).dump());
    if (split.value("invert", false)) bad_pre("Split invert true");
    const json pattern = split.value("pattern", json());
    if (pattern.contains("Regex")) t->split.compile(path, pattern["Regex"].get<std::string>(), false);
    else if (pattern.contains("String")) t->split.compile(path, pattern["String"].get<std::string>(), true);
    else bad_pre("Split pattern " + pattern.dump());
    if (bytes.value("type", "") != "ByteLevel") bad_pre("second step is " + describe(bytes));
    if (bytes.value("add_prefix_space", false)) bad_pre("ByteLevel add_prefix_space true");
    if (bytes.value("use_regex", true)) bad_pre("ByteLevel use_regex true");

    const json& model = j.at("model");
    if (!null_or(model, "type", "BPE")) fail(path, "unsupported model " + describe(model) + " (supported: BPE)");
    for (const char* key : {"dropout", "unk_token"})
      if (!null_or(model, key, json())) fail(path, std::string("unsupported model BPE option ") + key + " = " + model[key].dump());
    for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix"})
      if (!null_or(model, key, "")) fail(path, std::string("unsupported model BPE option ") + key + " = " + model[key].dump());
    if (!null_or(model, "byte_fallback", false)) fail(path, "unsupported model BPE option byte_fallback = true");
    t->ignore_merges = model.value("ignore_merges", false);
    for (const auto& [token, id] : model.at("vocab").items()) {
      t->vocab.emplace(token, id.get<int32_t>());
      t->tokens_by_id[id.get<int32_t>()] = token;
    }
    const json& merges = model.at("merges");
    for (std::size_t rank = 0; rank < merges.size(); ++rank) {
      const json& m = merges[rank];
      std::string a, b;
      if (m.is_array() && m.size() == 2) {
        a = m[0].get<std::string>(), b = m[1].get<std::string>();
      } else if (m.is_string()) {
        const std::string s = m.get<std::string>();
        const std::size_t sp = s.find(' ');
        if (sp == std::string::npos || s.find(' ', sp + 1) != std::string::npos)
          fail(path, "model merge " + std::to_string(rank) + " " + m.dump() + " is not two tokens separated by one space");
        a = s.substr(0, sp), b = s.substr(sp + 1);
      } else {
        fail(path, "model merge " + std::to_string(rank) + " " + m.dump() + " is neither \"a b\" nor [\"a\", \"b\"]");
      }
      const auto ia = t->vocab.find(a), ib = t->vocab.find(b), iab = t->vocab.find(a + b);
      if (ia == t->vocab.end() || ib == t->vocab.end() || iab == t->vocab.end())
        fail(path, "model merge " + std::to_string(rank) + " " + m.dump() + " uses a token missing from the vocab");
      t->merges.insert_or_assign(impl::pair_key(ia->second, ib->second),
                                 std::pair{static_cast<int32_t>(rank), iab->second});  // a repeated pair keeps the later rank, as the library's HashMap does
    }
    for (int b = 0; b < 256; ++b) {
      const auto it = t->vocab.find(byte_level().byte_to_char[b]);
      t->byte_ids[b] = it == t->vocab.end() ? -1 : it->second;
    }

    const json decoder = j.value("decoder", json());
    if (!decoder.is_object() || decoder.value("type", "") != "ByteLevel")
      fail(path, "unsupported decoder " + describe(decoder) + " (supported: ByteLevel)");
    const json post = j.value("post_processor", json());
    if (!post.is_null() && post.value("type", "") != "ByteLevel")
      fail(path, "unsupported post_processor " + describe(post) + " (supported: ByteLevel or null)");

    // The library ignores the ids the file gives added tokens: a token in the model vocab keeps that
    // id, the n-th other one gets (model vocab entries + n), whatever the file says.
    const auto model_size = static_cast<int32_t>(t->vocab.size());
    int32_t new_tokens = 0;
    for (const json& a : j.value("added_tokens", json::array())) {
      if (a.value("single_word", false))
        fail(path, "unsupported added_tokens option single_word = true (token " + a.at("content").dump() + ")");
      added_token tok{a.at("content").get<std::string>(), 0, a.value("special", false), a.value("lstrip", false),
                      a.value("rstrip", false), a.value("normalized", false)};
      if (tok.content.empty() || t->added_by_content.count(tok.content)) continue;
      const auto in_vocab = t->vocab.find(tok.content);
      tok.id = in_vocab != t->vocab.end() ? in_vocab->second : model_size + new_tokens++;
      t->added_by_content[tok.content] = tok.id;
      t->tokens_by_id[tok.id] = tok.content;
      t->special_ids[tok.id] = tok.special;
      if (tok.normalized && t->use_nfc) tok.content = nfc(tok.content);
      if (!tok.content.empty()) t->added.push_back(std::move(tok));
    }
    for (const added_token& a : t->added) (a.normalized ? t->normalized_added : t->raw_added).push_back(&a);
  } catch (const json::exception& e) {
    fail(path, std::string("malformed tokenizer.json: ") + e.what());
  }

  std::string pad = "<|endoftext|>";
  const auto config_path = path.parent_path() / "tokenizer_config.json";
  if (std::filesystem::exists(config_path)) {
    try {
      const json c = json::parse(read_text(config_path));
      if (c.contains("pad_token")) pad = config_token(c["pad_token"]);
      t->pad_left = c.value("padding_side", "right") == "left";
      t->truncate_left = c.value("truncation_side", "right") == "left";
    } catch (const json::exception& e) {
      fail(config_path, std::string("malformed tokenizer_config.json: ") + e.what());
    }
  }
  bpe_tokenizer result(std::move(t));
  result.impl_->pad_id = result.token_to_id(pad).value_or(-1);
  return result;
}

std::vector<int32_t> bpe_tokenizer::encode(std::string_view utf8_text) const { return impl_->encode(utf8_text); }

std::string bpe_tokenizer::decode(std::span<const int32_t> ids, bool skip_special_tokens) const {
  const byte_level_table& bl = byte_level();
  std::string bytes;
  for (const int32_t id : ids) {
    const auto it = impl_->tokens_by_id.find(id);
    if (it == impl_->tokens_by_id.end())
      throw tokenizer_error(impl_->file.string() + ": cannot decode id " + std::to_string(id) + ": not in the vocabulary");
    if (skip_special_tokens) {
      const auto s = impl_->special_ids.find(id);
      if (s != impl_->special_ids.end() && s->second) continue;
    }
    // A token with a character outside the byte alphabet is taken as its own UTF-8, as the library does.
    const std::string& tok = it->second;
    std::string mapped;
    bool all_mapped = true;
    for (std::size_t i = 0; i < tok.size() && all_mapped;) {
      const std::size_t n = utf8_valid_len(tok, i);
      const char32_t c = utf8_at(tok, i, n);
      all_mapped = c < bl.char_to_byte.size() && bl.char_to_byte[c] >= 0;
      if (all_mapped) mapped += static_cast<char>(bl.char_to_byte[c]);
      i += n;
    }
    bytes += all_mapped ? mapped : tok;
  }
  return utf8_lossy(bytes);
}

std::optional<int32_t> bpe_tokenizer::token_to_id(std::string_view token) const {
  if (auto it = impl_->added_by_content.find(std::string(token)); it != impl_->added_by_content.end()) return it->second;
  if (auto it = impl_->vocab.find(std::string(token)); it != impl_->vocab.end()) return it->second;
  return std::nullopt;
}

std::optional<std::string_view> bpe_tokenizer::id_to_token(int32_t id) const {
  if (auto it = impl_->tokens_by_id.find(id); it != impl_->tokens_by_id.end()) return it->second;
  return std::nullopt;
}

std::size_t bpe_tokenizer::vocab_size() const {
  std::size_t n = impl_->vocab.size();
  for (const auto& [content, id] : impl_->added_by_content) n += impl_->vocab.count(content) ? 0 : 1;
  return n;
}

int32_t bpe_tokenizer::pad_token_id() const { return impl_->pad_id; }

std::string bpe_tokenizer::klein_chat_text(std::string_view prompt) {
  // What the Qwen3 template renders for [{"role": "user", "content": prompt}] with
  // add_generation_prompt=True and enable_thinking=False: no system turn, an empty think block.
  return "<|im_start|>user\n" + std::string(prompt) + "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n";
}

encoded_batch bpe_tokenizer::encode_klein_prompts(const std::vector<std::string>& prompts, int max_length) const {
  if (max_length <= 0) throw tokenizer_error("encode_klein_prompts: max_length must be positive, got " + std::to_string(max_length));
  if (impl_->pad_id < 0) throw tokenizer_error(impl_->file.string() + ": no pad token in the vocabulary (tokenizer_config.json pad_token, default <|endoftext|>)");
  encoded_batch out;
  out.batch = static_cast<int64_t>(prompts.size());
  out.length = max_length;
  out.input_ids.reserve(prompts.size() * max_length);
  out.attention_mask.reserve(prompts.size() * max_length);
  for (const std::string& prompt : prompts) {
    std::vector<int32_t> ids = encode(klein_chat_text(prompt));
    const std::size_t keep = std::min<std::size_t>(ids.size(), max_length), pad = max_length - keep;
    const auto first = impl_->truncate_left ? ids.end() - keep : ids.begin();
    if (impl_->pad_left) {
      out.input_ids.insert(out.input_ids.end(), pad, impl_->pad_id);
      out.attention_mask.insert(out.attention_mask.end(), pad, 0);
    }
    out.input_ids.insert(out.input_ids.end(), first, first + keep);
    out.attention_mask.insert(out.attention_mask.end(), keep, 1);
    if (!impl_->pad_left) {
      out.input_ids.insert(out.input_ids.end(), pad, impl_->pad_id);
      out.attention_mask.insert(out.attention_mask.end(), pad, 0);
    }
  }
  return out;
}

// ---------------------------------------------------------------- Qwen3 chat template

const std::string_view qwen3_chat_template = R"TPL({%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %})TPL";

// ---------------------------------------------------------------- make-model tokenizer

namespace {

// Training text for the make-model tokenizer: prompts of the kind the pipeline sees, in English,
// Chinese and Japanese, so that merges cover Latin words, spaces, digits and CJK byte sequences.
constexpr std::string_view merge_training_sample = R"TXT(A photograph of a red fox sitting in the snow at sunrise, soft golden light, shallow depth of field.
A watercolor painting of a quiet harbor with small fishing boats, early morning fog, muted blue and grey tones.
An astronaut riding a horse across the surface of the moon, cinematic lighting, highly detailed, 35mm film.
A bowl of ramen with a soft boiled egg, green onions and chili oil, steam rising, top-down view on a wooden table.
A cozy reading room with tall bookshelves, a fireplace, a sleeping cat on an armchair, warm evening light.
The city skyline at night after the rain, neon signs reflected in the wet streets, people with umbrellas walking past.
A portrait of an old fisherman with a white beard, wearing a yellow raincoat, dramatic side lighting, black background.
A field of sunflowers under a clear blue sky, a small white farmhouse in the distance, summer afternoon.
A futuristic train station made of glass and steel, travellers waiting on the platform, clean minimalist architecture.
A macro photograph of a dragonfly on a green leaf covered with morning dew, every detail of the wings visible.
A pencil sketch of a mountain village with stone houses and narrow streets, drawn in the style of an old travel journal.
Two children flying a kite on a windy beach, the waves breaking behind them, bright colors, joyful mood.
A still life of lemons, a glass bottle and a blue ceramic jug on a linen cloth, painted in oil, classical composition.
The interior of a bakery in the morning, fresh bread on the shelves, flour in the air, sunlight through the window.
A lighthouse on a rocky cliff during a storm, huge waves crashing against the rocks, dark clouds and lightning.
A robot gardener watering tomato plants in a greenhouse, soft diffuse light, photorealistic, 4k, 8k, 1024x1024.
It's a beautiful day: we're going to the market, they've already left, I'm sure you'll like it, he'd agree.
Step 1: mix 250 grams of flour with 2 eggs. Step 2: add 100 ml of milk. Step 3: bake for 35 minutes at 180 degrees.
一只橘色的小猫坐在窗台上，窗外是下雪的城市夜景，温暖的灯光，电影感构图。
一座古老的寺庙隐藏在山间的云雾之中，清晨的阳光穿过松树，中国水墨画风格。
一碗热气腾腾的牛肉面，上面放着香菜和辣椒油，放在木桌上，俯视角度，高清摄影。
夜晚的上海外滩，霓虹灯倒映在黄浦江上，游客在江边散步，城市的天际线非常壮观。
春天的公园里开满了樱花，孩子们在草地上放风筝，老人坐在长椅上聊天，画面温馨明亮。
一位穿着汉服的女孩站在竹林中，手里拿着一把油纸伞，细雨蒙蒙，画面安静而优美。
桜の花が満開の公園で、子供たちが遊んでいる。春の柔らかい光、写真のような高画質。
夜の東京の街並み、雨に濡れた道路にネオンが映っている。映画のワンシーンのような構図。
富士山の前を走る新幹線、青い空と白い雲、夏の午後、鮮やかな色彩。
古い木造の家の縁側で猫が昼寝をしている。静かな田舎の風景、水彩画のスタイル。
)TXT";

}  // namespace

void write_tokenizer_files(const std::filesystem::path& dir, int num_merges) {
  using ojson = nlohmann::ordered_json;
  const byte_level_table& bl = byte_level();

  // The base vocabulary: the 256 byte characters in bytes_to_unicode order, as in Qwen2's vocab.
  std::vector<std::string> token_of;
  std::unordered_map<std::string, int32_t> id_of;
  std::array<int32_t, 256> byte_id{};
  for (int k = 0; k < 256; ++k) {
    byte_id[bl.order[k]] = k;
    token_of.push_back(bl.byte_to_char[bl.order[k]]);
    id_of.emplace(token_of.back(), k);
  }

  // Pre-tokenise the sample exactly as encoding will (NFC, Qwen2's split), then learn merges:
  // the most frequent adjacent pair each round, ties broken by the pair's token strings.
  split_pattern splitter;
  splitter.compile("<built-in merge sample>", qwen2_split_pattern, false);
  std::map<std::string, int64_t> word_counts;
  splitter.for_each_piece(nfc(merge_training_sample), [&](std::string_view w) { ++word_counts[std::string(w)]; });
  std::vector<std::pair<std::vector<int32_t>, int64_t>> words;
  for (const auto& [w, n] : word_counts) {
    std::vector<int32_t> symbols;
    for (unsigned char b : w) symbols.push_back(byte_id[b]);
    words.emplace_back(std::move(symbols), n);
  }
  std::vector<std::pair<int32_t, int32_t>> merges;
  for (int m = 0; m < num_merges; ++m) {
    std::map<std::pair<int32_t, int32_t>, int64_t> pair_counts;
    for (const auto& [symbols, n] : words)
      for (std::size_t i = 0; i + 1 < symbols.size(); ++i) pair_counts[{symbols[i], symbols[i + 1]}] += n;
    const std::pair<int32_t, int32_t>* best = nullptr;
    int64_t best_count = 1;  // a pair seen once teaches nothing
    for (const auto& [pair, count] : pair_counts) {
      const auto key = [&](const std::pair<int32_t, int32_t>& p) { return std::tie(token_of[p.first], token_of[p.second]); };
      if (count > best_count || (best && count == best_count && key(pair) < key(*best))) best = &pair, best_count = count;
    }
    if (!best) break;
    const auto [a, b] = *best;
    const std::string merged = token_of[a] + token_of[b];
    auto [it, fresh] = id_of.emplace(merged, static_cast<int32_t>(token_of.size()));
    if (fresh) token_of.push_back(merged);
    merges.emplace_back(a, b);
    for (auto& [symbols, n] : words) {
      std::vector<int32_t> next;
      for (std::size_t i = 0; i < symbols.size(); ++i) {
        if (i + 1 < symbols.size() && symbols[i] == a && symbols[i + 1] == b) next.push_back(it->second), ++i;
        else next.push_back(symbols[i]);
      }
      symbols = std::move(next);
    }
  }

  struct special { const char* content; int32_t id; bool special; };
  static constexpr special specials[] = {{"<|endoftext|>", 151643, true}, {"<|im_start|>", 151644, true},
                                         {"<|im_end|>", 151645, true},    {"<think>", 151667, false},
                                         {"</think>", 151668, false}};
  ojson added = ojson::array(), decoder_entries = ojson::object();
  for (const special& s : specials) {
    ojson e = {{"id", s.id}, {"content", s.content}, {"single_word", false}, {"lstrip", false},
               {"rstrip", false}, {"normalized", false}, {"special", s.special}};
    added.push_back(e);
    e.erase("id");
    decoder_entries[std::to_string(s.id)] = e;
  }
  const ojson byte_level_step = {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", false}, {"use_regex", false}};
  ojson vocab = ojson::object(), merge_list = ojson::array();
  for (std::size_t id = 0; id < token_of.size(); ++id) vocab[token_of[id]] = id;
  // Qwen's ids are past the learned vocabulary; only ids the model vocab holds survive loading.
  for (const special& s : specials) vocab[s.content] = s.id;
  for (const auto& [a, b] : merges) merge_list.push_back(ojson::array({token_of[a], token_of[b]}));
  const ojson tokenizer = {
      {"version", "1.0"}, {"truncation", nullptr}, {"padding", nullptr}, {"added_tokens", added},
      {"normalizer", {{"type", "NFC"}}},
      {"pre_tokenizer", {{"type", "Sequence"}, {"pretokenizers", ojson::array({
           {{"type", "Split"}, {"pattern", {{"Regex", qwen2_split_pattern}}}, {"behavior", "Isolated"}, {"invert", false}},
           byte_level_step})}}},
      {"post_processor", byte_level_step},
      {"decoder", byte_level_step},
      {"model", {{"type", "BPE"}, {"dropout", nullptr}, {"unk_token", nullptr}, {"continuing_subword_prefix", ""},
                 {"end_of_word_suffix", ""}, {"fuse_unk", false}, {"byte_fallback", false}, {"ignore_merges", false},
                 {"vocab", vocab}, {"merges", merge_list}}}};
  const ojson config = {
      {"add_bos_token", false}, {"add_prefix_space", false}, {"added_tokens_decoder", decoder_entries},
      {"bos_token", nullptr}, {"chat_template", qwen3_chat_template}, {"clean_up_tokenization_spaces", false},
      {"eos_token", "<|im_end|>"}, {"errors", "replace"}, {"model_max_length", 131072}, {"pad_token", "<|endoftext|>"},
      {"split_special_tokens", false}, {"tokenizer_class", "Qwen2Tokenizer"}, {"unk_token", nullptr}};

  std::filesystem::create_directories(dir);
  for (const auto& [name, doc] : {std::pair{"tokenizer.json", &tokenizer}, std::pair{"tokenizer_config.json", &config}}) {
    std::ofstream f(dir / name, std::ios::binary | std::ios::trunc);
    f << doc->dump(2) << "\n";
    if (!f) throw tokenizer_error((dir / name).string() + ": cannot write");
  }
}

}  // namespace refit::models
