"""Seeded random requests against every POST endpoint of the real server: valid bodies with one field replaced by a
hostile value, fields dropped or added, other top-level types, and byte-level damage (truncation, flipped bytes,
invalid UTF-8). Every reply must be a 2xx or a 4xx with a JSON message — never a 5xx, never a dropped connection —
and afterwards the server must be healthy, hold the weights it had, and generate the image it generated before."""
import json
import os
import random
import shutil

import pytest

from harness import GEN, truncate_first_shard

# Fixed for CI; REFIT_FUZZ_SEED / REFIT_FUZZ_ROUNDS explore further.
SEED = int(os.environ.get("REFIT_FUZZ_SEED", "20261129"))
ROUNDS = int(os.environ.get("REFIT_FUZZ_ROUNDS", "900"))

# Values that are wrong for (almost) every field, or right but cheap: nothing here asks for a large image or many
# steps, so an accidentally valid generation stays fast on the CPU.
HOSTILE = [None, True, False, 0, -1, 1.5, -0.0, 2**31, 2**63, -(2**63) - 1, 2**64, 10**40, 1e308, -1e308,
           "", " ", "x" * 5000, "\u0000", "caf\u00e9 \u6f22\u5b57", "\ud83d\ude00", "NaN", "Infinity", "-1", "1e400",
           "../../etc/passwd", "/", "/nonexistent/model", "64x", "x64", "0x0", "-8x-8", "99999999999999999999x4",
           "8192x8192", "4x4", [], {}, [1, "a", None], {"a": {"b": [1.5]}}, [[[[[[[[[[[]]]]]]]]]]], ["transformer"] * 50,
           ["no_such_module"], ["transformer", 5], {"model_path": "/"}]


def generation_body():
    return {"prompt": "a red fox", "seed": 3, "n": 1, "response_format": "b64_json", "guidance_scale": 4.0,
            "negative_prompt": "", "enable_teacache": False, "teacache_threshold": 0.0, **GEN}


def update_body(ckpt, broken):
    # Never a checkpoint with other weights: a fuzzed update may only fail, or reload what is served.
    return {"model_path": str(random.choice([ckpt.base, broken, ckpt.allowed / "missing"])),
            "target_modules": ["vae"], "mode": "staged", "flush_cache": True, "abort_all_requests": False,
            "weight_version": "fuzz"}


def distributed_body():
    # No group exists on this server: every one is refused (naming the group), quickly.
    return {"names": ["x_embedder.weight"], "dtypes": ["float32"], "shapes": [[4, 4]], "group_name": "fuzz",
            "load_format": None, "target_modules": ["transformer"], "flush_cache": True, "weight_version": "fuzz"}


def init_group_body():
    # world_size 1 is refused, and no mutation below makes it valid (so nothing ever tries to connect).
    return {"master_address": "127.0.0.1", "master_port": 29999, "rank_offset": 1, "world_size": 1, "group_name": "fuzz",
            "backend": "gloo"}


def checksum_body():
    return {"module_names": ["transformer", "vae"], "worker": 0}


def mutate(body: dict) -> bytes:
    op = random.randrange(9)
    body = dict(body)
    if op <= 2:  # one field gets a hostile value (most common: it reaches the field validators)
        body[random.choice(list(body))] = random.choice(HOSTILE)
    elif op == 3:
        body.pop(random.choice(list(body)))
    elif op == 4:
        body[random.choice(["extra", "", "\u0000", "prompt2", "x" * 300])] = random.choice(HOSTILE)
    elif op == 5:  # not an object at all
        return json.dumps(random.choice(HOSTILE + [[body], str(body)])).encode("utf-8", "surrogatepass")
    # Unescaped, lone surrogates are written as their (invalid) UTF-8 byte patterns.
    raw = json.dumps(body, ensure_ascii=random.random() < 0.5).encode("utf-8", "surrogatepass")
    if op == 6:  # truncated
        return raw[:random.randrange(len(raw))]
    if op == 7:  # a few bytes replaced, sometimes by bytes that are not UTF-8
        raw = bytearray(raw)
        for _ in range(random.randint(1, 4)):
            raw[random.randrange(len(raw))] = random.choice([random.randrange(32, 127), 0xFF, 0xC3, 0x00, 0x80])
        return bytes(raw)
    if op == 8:  # duplicated keys, trailing garbage or comments
        return raw[:-1] + random.choice([b', "seed": 1, "seed": "x"}', b"}}", b"} trailing", b"/* c */}", b",}"])
    return raw


def test_random_bad_requests_get_4xx_and_change_nothing(server, ckpt, tmp_path):
    broken = tmp_path / "base-with-truncated-vae"  # the served weights, but an update including the VAE fails
    shutil.copytree(ckpt.base, broken)
    truncate_first_shard(broken / "vae")
    server.update(ckpt.base, weight_version="pre-fuzz")
    before = server.checksums()
    image_before, _ = server.generate(seed=11)
    random.seed(SEED)
    seen = {}
    for i in range(ROUNDS):
        path, body = random.choice([("/v1/images/generations", generation_body()),
                                    ("/update_weights_from_disk", update_body(ckpt, broken)),
                                    ("/get_weights_checksum", checksum_body()),
                                    ("/update_weights_from_distributed", distributed_body()),
                                    ("/init_weights_update_group", init_group_body()),
                                    ("/destroy_weights_update_group", {"group_name": "fuzz"})])
        data = mutate(body)
        try:
            r = server.post(path, data=data, timeout=120)
        except Exception as e:
            pytest.fail(f"round {i}: {path} with {data[:300]!r}: no reply ({e!r})\n{server.log()[-3000:]}")
        assert r.status_code < 500, f"round {i}: {path} with {data[:300]!r}: {r.status_code} {r.text[:500]}"
        if r.status_code >= 400:
            assert isinstance(r.json().get("message"), str) and r.json()["message"], (path, data[:300], r.text[:300])
        seen[(path, r.status_code)] = seen.get((path, r.status_code), 0) + 1
    # The generator reached both the validators and the happy paths of every endpoint (a sixth of the rounds
    # go to each; most of them are refused, about one in ten is valid). The group endpoints have no happy path
    # here (no trainer): every reply is a 4xx with a message.
    for path in ("/v1/images/generations", "/update_weights_from_disk", "/get_weights_checksum"):
        assert seen.get((path, 400), 0) >= ROUNDS // 60, seen
        assert seen.get((path, 200), 0) >= ROUNDS // 400, seen
    for path in ("/update_weights_from_distributed", "/init_weights_update_group", "/destroy_weights_update_group"):
        assert seen.get((path, 400), 0) >= ROUNDS // 30, seen
    assert server.get("/health").status_code == 200
    assert server.checksums() == before == ckpt.disk[str(ckpt.base)]
    assert server.generate(seed=11)[0] == image_before
    server.update(ckpt.base, weight_version="base")  # a fuzzed update may have set any weight_version
