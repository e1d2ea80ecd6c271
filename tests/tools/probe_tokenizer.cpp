// Oracle probe for the tokenizer: reads one JSON request on stdin, answers one JSON object on stdout.
//   {"write": DIR}                       -> writes the make-model tokenizer files into DIR
//   {"tokenizer": PATH/tokenizer.json,   -> loads it; then, each optional:
//    "texts": [str],                        "ids": [[int]] and "decoded": [str] (round trip, specials kept)
//    "decode": [[int]], "skip_special": b   "decoded_ids": [str]
//    "tokens": [str], "token_ids": [int]    "token_to_id": [int|null], "id_to_token": [str|null]
//    "klein": {"prompts": [str], "max_length": n}   "klein": {input_ids, attention_mask, batch, length, texts}
//    "bench": {"text": str, "repeat": n}    "bench_seconds"}
// Errors go to stderr with exit status 1.
#include <nlohmann/json.hpp>

#include <chrono>
#include <iostream>
#include <iterator>

#include "pipeline/models/tokenizer.hpp"

using nlohmann::json;
using refit::models::bpe_tokenizer;

int main() {
  try {
    const json req = json::parse(std::string(std::istreambuf_iterator<char>(std::cin), {}));
    json out = json::object();
    if (req.contains("write")) refit::models::write_tokenizer_files(req["write"].get<std::string>());
    if (req.contains("tokenizer")) {
      const auto tok = bpe_tokenizer::from_file(req["tokenizer"].get<std::string>());
      out["vocab_size"] = tok.vocab_size();
      out["pad_token_id"] = tok.pad_token_id();
      for (const auto& text : req.value("texts", json::array())) {
        const auto ids = tok.encode(text.get<std::string>());
        out["ids"].push_back(ids);
        out["decoded"].push_back(tok.decode(ids));
      }
      for (const auto& ids : req.value("decode", json::array()))
        out["decoded_ids"].push_back(tok.decode(ids.get<std::vector<int32_t>>(), req.value("skip_special", false)));
      for (const auto& t : req.value("tokens", json::array())) {
        const auto id = tok.token_to_id(t.get<std::string>());
        out["token_to_id"].push_back(id ? json(*id) : json());
      }
      for (const auto& i : req.value("token_ids", json::array())) {
        const auto t = tok.id_to_token(i.get<int32_t>());
        out["id_to_token"].push_back(t ? json(std::string(*t)) : json());
      }
      if (req.contains("klein")) {
        const auto prompts = req["klein"]["prompts"].get<std::vector<std::string>>();
        const auto b = tok.encode_klein_prompts(prompts, req["klein"].value("max_length", 512));
        json texts = json::array();
        for (const auto& p : prompts) texts.push_back(bpe_tokenizer::klein_chat_text(p));
        out["klein"] = {{"input_ids", b.input_ids}, {"attention_mask", b.attention_mask},
                        {"batch", b.batch}, {"length", b.length}, {"texts", texts}};
      }
      if (req.contains("bench")) {
        const auto text = req["bench"]["text"].get<std::string>();
        const int repeat = req["bench"].value("repeat", 1);
        std::size_t n = 0;
        const auto t0 = std::chrono::steady_clock::now();
        for (int r = 0; r < repeat; ++r) n += tok.encode(text).size();
        out["bench_seconds"] = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        out["bench_tokens"] = n;
      }
    }
    std::cout << out.dump() << "\n";
  } catch (const std::exception& e) {
    std::cerr << e.what() << "\n";
    return 1;
  }
  return 0;
}
