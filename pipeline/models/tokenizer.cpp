// Byte-level BPE as the `tokenizers` library runs it for Qwen2: added-token extraction, NFC,
// regex split (Isolated), byte-to-unicode mapping, rank-ordered merges; ByteLevel decoding. The text
// steps are in tokenizer_text.cpp, the Klein prompt batch in klein_prompt.cpp, the make-model
// tokenizer in tokenizer_writer.cpp.
#include "pipeline/models/tokenizer.hpp"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <array>
#include <fstream>
#include <map>
#include <mutex>
#include <queue>
#include <unordered_map>

#include "pipeline/models/tokenizer_text.hpp"

namespace refit::models {
namespace {

using json = nlohmann::json;
using namespace text;

[[noreturn]] void fail(const std::filesystem::path& file, const std::string& what) {
  throw tokenizer_error(file.string() + ": " + what);
}

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
bool bpe_tokenizer::pads_left() const { return impl_->pad_left; }
bool bpe_tokenizer::truncates_left() const { return impl_->truncate_left; }
const std::filesystem::path& bpe_tokenizer::file() const { return impl_->file; }

}  // namespace refit::models
