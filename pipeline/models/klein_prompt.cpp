// The Klein prompt batch: each prompt in the Qwen3 chat template, tokenized, truncated and padded, as
// diffusers' Flux2KleinPipeline prepares it.
#include <algorithm>

#include "pipeline/models/tokenizer.hpp"

namespace refit::models {

std::string bpe_tokenizer::klein_chat_text(std::string_view prompt) {
  // What the Qwen3 template renders for [{"role": "user", "content": prompt}] with
  // add_generation_prompt=True and enable_thinking=False: no system turn, an empty think block.
  return "<|im_start|>user\n" + std::string(prompt) + "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n";
}

encoded_batch bpe_tokenizer::encode_klein_prompts(const std::vector<std::string>& prompts, int max_length) const {
  if (max_length <= 0) throw tokenizer_error("encode_klein_prompts: max_length must be positive, got " + std::to_string(max_length));
  if (pad_token_id() < 0) throw tokenizer_error(file().string() + ": no pad token in the vocabulary (tokenizer_config.json pad_token, default <|endoftext|>)");
  encoded_batch out;
  out.batch = static_cast<int64_t>(prompts.size());
  out.length = max_length;
  out.input_ids.reserve(prompts.size() * max_length);
  out.attention_mask.reserve(prompts.size() * max_length);
  for (const std::string& prompt : prompts) {
    std::vector<int32_t> ids = encode(klein_chat_text(prompt));
    const std::size_t keep = std::min<std::size_t>(ids.size(), max_length), pad = max_length - keep;
    const auto first = truncates_left() ? ids.end() - keep : ids.begin();
    if (pads_left()) {
      out.input_ids.insert(out.input_ids.end(), pad, pad_token_id());
      out.attention_mask.insert(out.attention_mask.end(), pad, 0);
    }
    out.input_ids.insert(out.input_ids.end(), first, first + keep);
    out.attention_mask.insert(out.attention_mask.end(), keep, 1);
    if (!pads_left()) {
      out.input_ids.insert(out.input_ids.end(), pad, pad_token_id());
      out.attention_mask.insert(out.attention_mask.end(), pad, 0);
    }
  }
  return out;
}

}  // namespace refit::models
