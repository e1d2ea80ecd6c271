// Byte-level BPE tokenizer read from a Hugging Face `tokenizer.json` (Qwen2TokenizerFast, the
// FLUX.2-klein text path), giving the ids the `tokenizers` library gives, and the Klein prompt
// preparation (Qwen3 chat template, padding and truncation) that diffusers' Flux2KleinPipeline does.
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <span>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

namespace refit::models {

// A tokenizer file refit cannot read or does not support; the message names the file and component.
struct tokenizer_error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Token ids and attention mask of a prompt batch, row-major [batch, length].
struct encoded_batch {
  std::vector<int64_t> input_ids, attention_mask;
  int64_t batch = 0, length = 0;
};

class bpe_tokenizer {
 public:
  // Reads `tokenizer.json`, and the pad token and padding/truncation sides from the
  // `tokenizer_config.json` next to it when there is one (default pad "<|endoftext|>", right).
  static bpe_tokenizer from_file(const std::filesystem::path& tokenizer_json);

  bpe_tokenizer(bpe_tokenizer&&) noexcept;
  bpe_tokenizer& operator=(bpe_tokenizer&&) noexcept;
  ~bpe_tokenizer();

  // Ids of valid UTF-8 text (invalid UTF-8 throws tokenizer_error); added tokens in the text are
  // matched as the library does, before normalisation and pre-tokenisation.
  std::vector<int32_t> encode(std::string_view utf8_text) const;
  // The text of `ids`; an id outside the vocabulary throws tokenizer_error.
  std::string decode(std::span<const int32_t> ids, bool skip_special_tokens = false) const;

  std::optional<int32_t> token_to_id(std::string_view token) const;
  std::optional<std::string_view> id_to_token(int32_t id) const;
  // Number of distinct tokens, added tokens included (`get_vocab_size(with_added_tokens=True)`).
  std::size_t vocab_size() const;
  int32_t pad_token_id() const;  // -1 when the vocabulary has no pad token
  // tokenizer_config.json's padding_side and truncation_side are "left".
  bool pads_left() const;
  bool truncates_left() const;
  const std::filesystem::path& file() const;  // the tokenizer.json read

  // The Qwen3 chat template rendering of one user turn with add_generation_prompt=True and
  // enable_thinking=False, as Flux2KleinPipeline builds it for every prompt.
  static std::string klein_chat_text(std::string_view prompt);
  // Each prompt in the chat template, tokenized, truncated and padded to exactly max_length.
  encoded_batch encode_klein_prompts(const std::vector<std::string>& prompts, int max_length = 512) const;

 private:
  struct impl;
  explicit bpe_tokenizer(std::unique_ptr<impl> p);
  std::unique_ptr<impl> impl_;
};

// The real Qwen3 chat template (as shipped in Qwen3's tokenizer_config.json).
extern const std::string_view qwen3_chat_template;

// Writes tokenizer.json and tokenizer_config.json of a small but real Qwen2-style byte-level BPE
// tokenizer into `dir`: the 256 byte tokens, `num_merges` merges learned deterministically from a
// built-in English/CJK sample, and Qwen's special tokens at their real ids (151643...151668), so that
// `tokenizers` and `transformers` load it and agree with bpe_tokenizer.
void write_tokenizer_files(const std::filesystem::path& dir, int num_merges = 400);

}  // namespace refit::models
