#!/usr/bin/env python3
"""Encoding throughput of refit's byte-level BPE tokenizer against the `tokenizers` library, on the same
Qwen2-style tokenizer and text (a speed check that was an assertion in the oracle test until it flaked on a
loaded machine; speed is measured here, never asserted in a test).

    python3 bench/tokenizer_speed.py [--probe build/tests/probe_tokenizer] [--repeat 3]

Prints MB/s for both and their ratio; the ids must be identical (exit 1 otherwise).
"""
import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "oracle"))
import test_tokenizer_oracle as oracle  # noqa: E402  (the tokenizer recipe and texts the oracle test uses)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--probe", default=str(ROOT / "build" / "tests" / "probe_tokenizer"))
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        corpus = (oracle.TEXTS + oracle.random_texts(300, 1)) * 3 + [Path(oracle.__file__).read_text(encoding="utf-8")]
        lib = oracle.with_qwen_specials(oracle.qwen2_tokenizer(corpus, 1200), d / "tokenizer.json")
        oracle.write_config(d)
        text = " ".join(oracle.TEXTS + oracle.random_texts(2000, 4)) * 4
        t0 = time.perf_counter()
        want = lib.encode(text).ids
        lib_s = time.perf_counter() - t0
        req = {"tokenizer": str(d / "tokenizer.json"), "texts": [text], "bench": {"text": text, "repeat": args.repeat}}
        p = subprocess.run([args.probe], input=json.dumps(req), capture_output=True, text=True, check=True)
        out = json.loads(p.stdout)
    if out["ids"][0] != want:
        print("refit's ids differ from the tokenizers library's", file=sys.stderr)
        return 1
    mb = len(text.encode()) / 1e6
    refit = args.repeat * mb / out["bench_seconds"]
    library = mb / lib_s
    print(f"encode {mb:.2f} MB: refit {refit:.1f} MB/s (warm cache, {args.repeat} runs), tokenizers {library:.1f} MB/s, "
          f"ratio {refit / library:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
