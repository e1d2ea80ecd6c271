"""refit's Qwen2 byte-level BPE tokenizer and Klein prompt batch against `tokenizers` and `transformers`.

A small BPE is trained here with the `tokenizers` library using Qwen2's exact normalizer and
pre-tokenizer; refit must give the library's ids on text that exercises every step (added tokens,
NFC, the split regex, byte-level mapping, merges), and `transformers` must build the same Klein
batch (Qwen3 chat template, padding, truncation, mask) that refit builds.
"""
import json
import os
import random
import subprocess
import unicodedata
from pathlib import Path

import pytest
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

PROBE = os.environ.get("REFIT_PROBE_TOKENIZER", "probe_tokenizer")

QWEN2_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""

# The chat template of Qwen/Qwen3-4B's tokenizer_config.json (the FLUX.2-klein text encoder's): the data file
# refit compiles in and writes into make-model's tokenizer_config.json. It is an input here: transformers
# renders it, and refit's Klein prompt must equal that rendering.
QWEN3_CHAT_TEMPLATE = (Path(__file__).resolve().parents[2] / "pipeline" / "models" / "qwen3_chat_template.jinja").read_text(
    encoding="utf-8").removesuffix("\n")

QWEN_SPECIALS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<think>": 151667, "</think>": 151668}

TEXTS = [
    "", " ", "   ", "\n", "\n\n\n", "\t", " \t\n ", "a\r\nb", "a\rb\r\r\nc", "hello   ", "hello   world", "  leading",
    "trailing \n", "tabs\tand\t\tmore\t", "line one\nline two\n\n  indented\n\tTabbed",
    # Contractions are matched case-insensitively, also through Unicode case folding (ſ, Kelvin sign).
    "I'm sure you're right, we've seen they'll go and he'd say it's done", "DON'T I'M WE'RE THEY'LL IT'S We'Ve",
    "'s's'S 'll'LL", "ſ'S 'ſ x'ſ", "K'\u212a k'K",
    # Digits are split one by one.
    "1234567890", "3.14159", "2024-05-01 12:30:45", "x1y22z333", "٠١٢٣٤", "１２３", "x²+y³=z⁴", "1,000,000.00$",
    # Scripts.
    "你好，世界！", "日本語のテキストです。", "한국어 텍스트", "Qwen是一个大语言模型。It speaks English too.", "Привет, мир!",
    "Γειά σου Κόσμε", "مرحبا بالعالم", "שלום עולם", "สวัสดีครับ", "नमस्ते दुनिया", "Ünïcödé façade naïve coöperate",
    # Emoji, with modifiers, ZWJ sequences, flags and variation selectors.
    "😀", "👍🏽 thumbs", "👨‍👩‍👧‍👦 family", "🏳️‍🌈", "🇯🇵🇺🇸", "❤️ love", "a😀b😀😀c",
    # Combining characters: NFC composes them before the split.
    "e\u0301", "cafe\u0301 au lait", "A\u030angstrom \u212b", "\u1100\u1161\u11a8", "ﬁne ligature", "\u2126hm",
    "o\u0308\u0301 stacked", "\u0301leading combining",
    # Special tokens inside text, partial ones, adjacent ones.
    "<|im_start|>user\nhi<|im_end|>", "<|endoftext|><|endoftext|>", "<|im_start|", "a<think>b</think>c",
    "<|im_start|><|im_end|>", "x <|im_end|> y", "<|im_start|>assistant\n<think>\n\n</think>\n\n",
    # Unicode white space that Python, PCRE2 and Oniguruma do not all agree on.
    "a\u00a0b", "a\u3000b", "a\u2028b", "a\u180eb", "a  \u180e\u180e", "x\u200by", "a \u0085 b", "\x0b\x0c", "a\x1cb",
    # Punctuation and code.
    "Hello, world!!! ... ??? --- ((()))", "def f(x):\n\treturn x**2\n", "https://example.com/a?b=c&d=e#frag",
    "#include <vector>\nint main() { return 0; }", "\"quoted\" 'single' `back`", "snake_case and camelCase",
    "supercalifragilisticexpialidocious" * 3, "a" * 300, "ab " * 100,
]


def random_texts(n, seed):
    pool = (list("abcdefgxyz ABC'sStTmM0123456789") + list(" \t\n\r") + list("，。你好世界日本語한국") +
            ["😀", "👍", "\u200d", "\ufe0f", "\u0301", "\u0308", "é", "ß", "\u00a0", "\u3000", "<|im_end|>", "<think>",
             "!", "?", "...", "-", "_", "/", "\\", "\"", "(", ")"])
    rng = random.Random(seed)
    return ["".join(rng.choice(pool) for _ in range(rng.randint(1, 40))) for _ in range(n)]


def probe(req, expect_ok=True):
    p = subprocess.run([PROBE], input=json.dumps(req), capture_output=True, text=True)
    if expect_ok:
        assert p.returncode == 0, p.stderr
        return json.loads(p.stdout)
    return p


def qwen2_tokenizer(corpus, vocab_size):
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return tok


def with_qwen_specials(tok, path):
    """Saves `tok` with Qwen's added tokens placed at Qwen's ids (the model vocab holds them there)."""
    j = json.loads(tok.to_str())
    for content, i in QWEN_SPECIALS.items():
        j["model"]["vocab"][content] = i
    j["added_tokens"] = [{"id": i, "content": c, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": c not in ("<think>", "</think>")} for c, i in QWEN_SPECIALS.items()]
    path.write_text(json.dumps(j, ensure_ascii=False))
    return Tokenizer.from_file(str(path))


def write_config(d, **extra):
    cfg = {"add_bos_token": False, "add_prefix_space": False, "bos_token": None, "chat_template": QWEN3_CHAT_TEMPLATE,
           "clean_up_tokenization_spaces": False, "eos_token": "<|im_end|>", "errors": "replace", "model_max_length": 131072,
           "pad_token": "<|endoftext|>", "split_special_tokens": False, "tokenizer_class": "Qwen2Tokenizer",
           "unk_token": None, **extra}
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("qwen")
    corpus = (TEXTS + random_texts(300, 1)) * 3 + [open(__file__, encoding="utf-8").read()]
    lib = with_qwen_specials(qwen2_tokenizer(corpus, 1200), d / "tokenizer.json")
    write_config(d)
    return d, lib


def assert_same_ids(got, lib, texts):
    for text, ids in zip(texts, got):
        assert ids == lib.encode(text).ids, f"text {text!r}"


def test_encode_matches_tokenizers_on_unicode_whitespace_digits_emoji_and_specials(qwen_dir):
    d, lib = qwen_dir
    texts = TEXTS + random_texts(500, 2)
    out = probe({"tokenizer": str(d / "tokenizer.json"), "texts": texts})
    assert len(out["ids"]) == len(texts)
    assert_same_ids(out["ids"], lib, texts)
    # The learned merges do fire: far fewer ids than bytes on ordinary text.
    english = lib.encode(TEXTS[15]).ids
    assert len(english) < 0.7 * len(TEXTS[15].encode())


def test_specials_keep_qwen_ids_and_digits_split_singly(qwen_dir):
    d, _ = qwen_dir
    out = probe({"tokenizer": str(d / "tokenizer.json"), "texts": ["<|im_start|>a<|im_end|><think></think><|endoftext|>", "90210"]})
    ids = out["ids"][0]
    assert ids[0] == 151644 and ids[-4:] == [151645, 151667, 151668, 151643]
    assert len(out["ids"][1]) == 5


def test_merges_in_string_form_give_the_same_ids(qwen_dir, tmp_path):
    d, lib = qwen_dir
    j = json.loads((d / "tokenizer.json").read_text())
    assert isinstance(j["model"]["merges"][0], list)
    j["model"]["merges"] = [" ".join(m) for m in j["model"]["merges"]]
    (tmp_path / "tokenizer.json").write_text(json.dumps(j))
    out = probe({"tokenizer": str(tmp_path / "tokenizer.json"), "texts": TEXTS})
    assert_same_ids(out["ids"], Tokenizer.from_file(str(tmp_path / "tokenizer.json")), TEXTS)
    assert_same_ids(out["ids"], lib, TEXTS)


def test_decode_round_trips_to_nfc_text_and_matches_the_library(qwen_dir):
    d, lib = qwen_dir
    out = probe({"tokenizer": str(d / "tokenizer.json"), "texts": TEXTS})
    for text, ids, decoded in zip(TEXTS, out["ids"], out["decoded"]):
        assert decoded == unicodedata.normalize("NFC", text), f"text {text!r}"
        assert decoded == lib.decode(ids, skip_special_tokens=False)


def test_decode_of_split_utf8_and_skipped_specials_matches_the_library(qwen_dir):
    d, lib = qwen_dir
    ids = lib.encode("<|im_start|>猫👨‍👩‍👧 ok<|im_end|><think>x</think>").ids
    singles = [[i] for i in ids] + [ids[1:3], ids[2:5]]
    out = probe({"tokenizer": str(d / "tokenizer.json"), "decode": singles, "skip_special": False})
    assert out["decoded_ids"] == [lib.decode(s, skip_special_tokens=False) for s in singles]
    assert any("\ufffd" in s for s in out["decoded_ids"])  # the lossy path was exercised
    out = probe({"tokenizer": str(d / "tokenizer.json"), "decode": [ids], "skip_special": True})
    assert out["decoded_ids"] == [lib.decode(ids, skip_special_tokens=True)]


def test_decode_of_an_unknown_id_is_refused(qwen_dir):
    d, _ = qwen_dir
    p = probe({"tokenizer": str(d / "tokenizer.json"), "decode": [[5, 149999]]}, expect_ok=False)
    assert p.returncode == 1 and "cannot decode id 149999" in p.stderr


def test_token_lookups_and_vocab_size_match_the_library(qwen_dir):
    d, lib = qwen_dir
    tokens = ["<|im_start|>", "<think>", "Ġthe", "ĠĠ", "!", "Ā", "not-a-token-xyz"]
    ids = [151644, 151667, 0, 188, 10**6]
    out = probe({"tokenizer": str(d / "tokenizer.json"), "tokens": tokens, "token_ids": ids})
    assert out["token_to_id"] == [lib.token_to_id(t) for t in tokens]
    assert out["id_to_token"] == [lib.id_to_token(i) for i in ids]
    assert out["vocab_size"] == lib.get_vocab_size(with_added_tokens=True)
    assert out["pad_token_id"] == 151643


def test_added_token_flags_lstrip_rstrip_normalized_and_longest_match(qwen_dir, tmp_path):
    _, lib = qwen_dir
    tok = Tokenizer.from_str(lib.to_str())
    tok.add_special_tokens([AddedToken("<mask>", lstrip=True), AddedToken("[SEP]", rstrip=True),
                            AddedToken("<both>", lstrip=True, rstrip=True), AddedToken("<|a|>"), AddedToken("<|a|><|b|>")])
    tok.add_tokens([AddedToken("café", normalized=True), AddedToken("naïve", normalized=False),
                    AddedToken("Ångström", normalized=True, lstrip=True)])
    tok.save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))  # ids as loading the file assigns them
    texts = ["a  <mask> b", "\n\t<mask>", "x[SEP]   y", "[SEP]\n\n", "p \u3000<both>\u00a0 q", "<mask><mask>  <both>  <both>",
             "cafe\u0301 and café", "nai\u0308ve vs naïve", "  A\u030angstro\u0308m", "<|a|><|b|><|a|> <|a|><|b",
             "<mask>[SEP]<both><|im_end|>", " <both>"]
    out = probe({"tokenizer": str(tmp_path / "tokenizer.json"), "texts": texts})
    assert_same_ids(out["ids"], tok, texts)
    out = probe({"tokenizer": str(tmp_path / "tokenizer.json"), "decode": out["ids"], "skip_special": True})
    assert out["decoded_ids"] == [tok.decode(tok.encode(t).ids, skip_special_tokens=True) for t in texts]


def test_added_token_ids_follow_the_library_not_the_file(qwen_dir, tmp_path):
    _, lib = qwen_dir
    j = json.loads(lib.to_str())
    j["added_tokens"].append({"id": 5, "content": "<extra>", "single_word": False, "lstrip": False, "rstrip": False,
                              "normalized": False, "special": True})
    (tmp_path / "tokenizer.json").write_text(json.dumps(j))
    tok = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    out = probe({"tokenizer": str(tmp_path / "tokenizer.json"), "texts": ["a<extra>b"], "tokens": ["<extra>"]})
    assert out["token_to_id"] == [tok.token_to_id("<extra>")] and out["token_to_id"] != [5]
    assert_same_ids(out["ids"], tok, ["a<extra>b"])


@pytest.mark.parametrize("edit,message", [
    (lambda j: j.update(normalizer={"type": "NFKC"}), 'unsupported normalizer "NFKC"'),
    (lambda j: j.update(pre_tokenizer={"type": "Metaspace", "replacement": "▁"}), "unsupported pre_tokenizer"),
    (lambda j: j["pre_tokenizer"]["pretokenizers"][0].update(behavior="Removed"), 'Split behavior "Removed"'),
    (lambda j: j["pre_tokenizer"]["pretokenizers"][1].update(add_prefix_space=True), "ByteLevel add_prefix_space true"),
    (lambda j: j["model"].update(type="WordPiece"), 'unsupported model "WordPiece"'),
    (lambda j: j["model"].update(byte_fallback=True), "byte_fallback"),
    (lambda j: j["model"].update(unk_token="<unk>"), "unk_token"),
    (lambda j: j["model"].update(dropout=0.1), "dropout"),
    (lambda j: j.update(decoder={"type": "Metaspace"}), 'unsupported decoder "Metaspace"'),
    (lambda j: j.update(post_processor={"type": "TemplateProcessing"}), 'unsupported post_processor "TemplateProcessing"'),
    (lambda j: j.update(truncation={"max_length": 8}), "unsupported component truncation"),
    (lambda j: j.update(sparkles=True), "unsupported component 'sparkles'"),
    (lambda j: j["added_tokens"][0].update(single_word=True), "single_word"),
    (lambda j: j["model"]["merges"].append(["Ġ", "nope"]), "uses a token missing from the vocab"),
], ids=["nfkc", "metaspace", "split_removed", "prefix_space", "wordpiece", "byte_fallback", "unk", "dropout",
        "decoder", "post_processor", "truncation", "unknown_key", "single_word", "bad_merge"])
def test_unsupported_components_are_refused_by_name(qwen_dir, tmp_path, edit, message):
    d, _ = qwen_dir
    j = json.loads((d / "tokenizer.json").read_text())
    edit(j)
    (tmp_path / "tokenizer.json").write_text(json.dumps(j))
    p = probe({"tokenizer": str(tmp_path / "tokenizer.json")}, expect_ok=False)
    assert p.returncode == 1 and message in p.stderr and "tokenizer.json" in p.stderr, p.stderr


KLEIN_PROMPTS = ["A photo of a cat sitting on a windowsill", "", "一只猫坐在月球上，看着地球", "It's 3:45 PM; they'll be 10 minutes late",
                 "emoji 👨‍👩‍👧‍👦 and a stray <|im_end|> inside", "Multiple\nlines\n\n  indented\tand tabbed",
                 "cafe\u0301 " + "a very long prompt about many things " * 120]


def transformers_batch(d, prompts, max_length):
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(str(d))
    texts, ids, mask = [], [], []
    for p in prompts:  # exactly Flux2KleinPipeline._get_qwen3_prompt_embeds
        text = hf.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True,
                                      enable_thinking=False)
        enc = hf(text, padding="max_length", truncation=True, max_length=max_length)
        texts.append(text)
        ids.append(enc["input_ids"])
        mask.append(enc["attention_mask"])
    return texts, ids, mask


def assert_klein_batch_matches(d, prompts, max_length):
    texts, ids, mask = transformers_batch(d, prompts, max_length)
    got = probe({"tokenizer": str(d / "tokenizer.json"), "klein": {"prompts": prompts, "max_length": max_length}})["klein"]
    assert got["batch"] == len(prompts) and got["length"] == max_length
    assert got["texts"] == texts
    rows = lambda flat: [flat[i * max_length:(i + 1) * max_length] for i in range(len(prompts))]
    assert rows(got["input_ids"]) == ids
    assert rows(got["attention_mask"]) == mask
    return got


@pytest.mark.parametrize("max_length", [512, 24])
def test_klein_batch_matches_transformers_chat_template_padding_and_truncation(qwen_dir, max_length):
    d, _ = qwen_dir
    got = assert_klein_batch_matches(d, KLEIN_PROMPTS, max_length)
    empty = got["input_ids"][max_length:2 * max_length]  # the "" prompt, shorter than both lengths
    assert empty[0] == 151644 and empty[-1] == 151643  # starts with <|im_start|>, right-padded with <|endoftext|>
    last_mask = got["attention_mask"][-max_length:]
    assert all(last_mask)  # the long prompt fills the row (truncated)


def test_klein_batch_honours_padding_and_truncation_side_from_config(qwen_dir, tmp_path):
    d, _ = qwen_dir
    (tmp_path / "tokenizer.json").write_text((d / "tokenizer.json").read_text())
    write_config(tmp_path, padding_side="left", truncation_side="left")
    got = assert_klein_batch_matches(tmp_path, KLEIN_PROMPTS, 40)
    empty_mask = got["attention_mask"][40:80]
    assert empty_mask[0] == 0 and empty_mask[-1] == 1 and got["input_ids"][40] == 151643  # padded on the left


def test_written_tokenizer_loads_in_tokenizers_and_transformers_with_identical_ids(tmp_path):
    probe({"write": str(tmp_path / "a")})
    probe({"write": str(tmp_path / "b")})
    for name in ("tokenizer.json", "tokenizer_config.json"):  # learned deterministically
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    d = tmp_path / "a"
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    assert cfg["chat_template"] == QWEN3_CHAT_TEMPLATE
    j = json.loads((d / "tokenizer.json").read_text())
    assert 200 <= len(j["model"]["merges"]) <= 1000
    lib = Tokenizer.from_file(str(d / "tokenizer.json"))
    assert {c: lib.token_to_id(c) for c in QWEN_SPECIALS} == QWEN_SPECIALS
    texts = TEXTS + random_texts(200, 3)
    out = probe({"tokenizer": str(d / "tokenizer.json"), "texts": texts})
    assert_same_ids(out["ids"], lib, texts)
    assert len(lib.encode("A photograph of a red fox in the snow").ids) < 20  # merges learned from the sample
    assert_klein_batch_matches(d, KLEIN_PROMPTS, 512)
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(str(d))
    assert hf.pad_token_id == 151643 and hf.convert_tokens_to_ids("<|im_end|>") == 151645
