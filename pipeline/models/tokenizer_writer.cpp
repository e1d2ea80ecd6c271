// `make-model`'s tokenizer: a small but real Qwen2-style byte-level BPE, learned deterministically
// from a built-in sample, written as tokenizer.json and tokenizer_config.json.
#include <nlohmann/json.hpp>

#include <array>
#include <fstream>
#include <map>
#include <unordered_map>

#include "pipeline/models/tokenizer.hpp"
#include "pipeline/models/tokenizer_text.hpp"

namespace refit::models {

using namespace text;

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
