#!/usr/bin/env python3
"""Build an offline Hugging Face hub cache holding tiny FLUX.2-klein checkpoints made by refit.

    make_fake_hf_cache.py --refit-bin PATH --hf-home DIR

Writes, under DIR/hub, the two repos that SGLang's test_update_weights_from_disk.py uses in CI:

    models--black-forest-labs--FLUX.2-klein-base-4B   (default model: make-model --base --seed 1)
    models--black-forest-labs--FLUX.2-klein-4B        (source model:  make-model --seed 2)

in the layout huggingface_hub itself writes: refs/main holds a 40-hex commit id (no newline),
snapshots/<commit>/<file> are relative symlinks to blobs/<sha256>. With HF_HUB_OFFLINE=1 (or
local_files_only=True) snapshot_download() reads refs/main and returns snapshots/<commit>, which is
exactly what sglang's maybe_download_model(<id>) returns.

Like the real pair (the test's docstring: "these two model pairs only differ in transformer weights"),
the source model shares the base model's text_encoder, vae and tokenizer; only the transformer (seed 2)
and model_index.json (is_distilled) differ. The test itself then perturbs the source model's vae.
Set FAKE_CACHE_INDEPENDENT=1 to keep the seed-2 text_encoder/vae instead (then the rollback test's
"text encoder == base" check cannot hold, by construction).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile

REPOS = [
    # repo id, make-model extra args
    ("black-forest-labs/FLUX.2-klein-base-4B", ["--seed", "1", "--base"]),
    ("black-forest-labs/FLUX.2-klein-4B", ["--seed", "2"]),
]
SHARED_FROM_BASE = ("text_encoder", "vae", "tokenizer")


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def make_model(refit_bin: str, out: str, extra: list[str]) -> None:
    cmd = [refit_bin, "make-model", "--preset", "flux2-klein-tiny", "--out", out, *extra]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def install_repo(hub: str, repo_id: str, src_dir: str) -> str:
    """Copy src_dir into the hub cache as one commit of repo_id; return the snapshot path."""
    repo_dir = os.path.join(hub, "models--" + repo_id.replace("/", "--"))
    if os.path.exists(repo_dir):
        shutil.rmtree(repo_dir)
    blobs = os.path.join(repo_dir, "blobs")
    os.makedirs(blobs)
    files = []
    for root, _, names in os.walk(src_dir):
        for n in names:
            files.append(os.path.relpath(os.path.join(root, n), src_dir))
    files.sort()
    digests = {f: sha256_file(os.path.join(src_dir, f)) for f in files}
    # A deterministic fake commit id: sha1 over the (path, content digest) listing.
    commit = hashlib.sha1(
        "".join(f"{f}\0{digests[f]}\n" for f in files).encode()
    ).hexdigest()
    snap = os.path.join(repo_dir, "snapshots", commit)
    for f in files:
        blob = os.path.join(blobs, digests[f])
        if not os.path.exists(blob):
            shutil.copyfile(os.path.join(src_dir, f), blob)
        link = os.path.join(snap, f)
        os.makedirs(os.path.dirname(link), exist_ok=True)
        os.symlink(os.path.relpath(blob, os.path.dirname(link)), link)
    os.makedirs(os.path.join(repo_dir, "refs"))
    with open(os.path.join(repo_dir, "refs", "main"), "w") as fh:
        fh.write(commit)  # no trailing newline: huggingface_hub reads it verbatim
    return snap


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--refit-bin", required=True)
    ap.add_argument("--hf-home", required=True)
    args = ap.parse_args()

    hub = os.path.join(args.hf_home, "hub")
    os.makedirs(hub, exist_ok=True)
    independent = os.environ.get("FAKE_CACHE_INDEPENDENT") == "1"
    with tempfile.TemporaryDirectory(prefix="fake_hf_src_") as tmp:
        srcs = []
        for repo_id, extra in REPOS:
            out = os.path.join(tmp, repo_id.split("/")[-1])
            make_model(args.refit_bin, out, extra)
            srcs.append((repo_id, out))
        base_src = srcs[0][1]
        if not independent:
            for repo_id, out in srcs[1:]:
                for comp in SHARED_FROM_BASE:
                    shutil.rmtree(os.path.join(out, comp))
                    shutil.copytree(os.path.join(base_src, comp), os.path.join(out, comp))
        for repo_id, out in srcs:
            snap = install_repo(hub, repo_id, out)
            print(f"{repo_id} -> {snap}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
