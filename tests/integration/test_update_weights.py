"""POST /update_weights_from_disk against the real server: SGLang's test list (same model, default, target modules,
invalid requests, corrupted checkpoint) and more (checksums of every module against `refit checksum`, images
against a fresh server, weight_version plumbing)."""
import os
import re

import pytest

from harness import MODULES, start_server

NO_WEIGHTS_CHANGED = re.compile(r"no weights\b.*\bchanged", re.I)


def reset_to_base(server, ckpt, version="base"):
    reply = server.update(ckpt.base, weight_version=version)
    assert reply["weight_version"] == version
    assert server.checksums() == ckpt.disk[str(ckpt.base)]
    return reply


def realpath(p):
    return os.path.realpath(p)


@pytest.mark.parametrize("flush_cache", [True, False])
def test_same_model_reload_keeps_checksums_and_images(server, ckpt, flush_cache):
    reset_to_base(server, ckpt)
    before = server.checksums()
    png_before, v_before = server.generate(seed=7)
    assert v_before == "base"

    reply = server.update(ckpt.base, flush_cache=flush_cache, weight_version=f"same-{flush_cache}")
    assert reply["cache_flushed"] is flush_cache
    assert reply["weight_version"] == f"same-{flush_cache}"
    assert server.checksums() == before == ckpt.disk[str(ckpt.base)]
    png_after, v_after = server.generate(seed=7)
    assert v_after == f"same-{flush_cache}"
    assert png_after == png_before


def test_default_update_changes_every_module_to_the_new_checkpoints_checksums(server, ckpt):
    reset_to_base(server, ckpt)
    reply = server.update(ckpt.seed2, weight_version="v-seed2")
    assert reply["weight_version"] == "v-seed2"
    assert reply["message"]
    assert {m["name"] for m in reply["modules"]} == set(MODULES)
    for m in reply["modules"]:
        assert m["tensors"] > 0 and m["bytes"] > 0, m
        assert realpath(m["source_dir"]) == realpath(ckpt.seed2 / m["name"]), m
    assert set(reply["timings"]) >= {"plan", "validate", "stage", "drain", "pause", "commit", "finish", "total"}
    assert reply["mode"] in ("staged", "in_place"), reply["mode"]
    assert reply["aborted_requests"] == 0

    assert server.checksums() == ckpt.disk[str(ckpt.seed2)]
    info = server.info()
    assert info["weight_version"] == "v-seed2"
    assert realpath(info["model_path"]) == realpath(ckpt.seed2)
    _, version = server.generate(seed=1)
    assert version == "v-seed2"


def test_default_update_to_perturbed_vae(server, ckpt):
    """SGLang's test_update_weights_from_disk_default, checked on every module rather than the transformer alone."""
    reset_to_base(server, ckpt)
    server.update(ckpt.perturbed, flush_cache=True)
    got = server.checksums()
    assert got == ckpt.disk[str(ckpt.perturbed)]
    assert got["vae"] != ckpt.disk[str(ckpt.base)]["vae"]


def test_update_without_weight_version_derives_one_that_generation_reports(server, ckpt):
    reset_to_base(server, ckpt)
    reply = server.update(ckpt.second)
    version = reply["weight_version"]
    assert isinstance(version, str) and version and version != "base"
    assert server.info()["weight_version"] == version
    assert server.generate(seed=2)[1] == version


@pytest.mark.parametrize("targets", [["transformer"], ["vae"], ["text_encoder", "vae"]])
def test_target_modules_update_only_those(server, ckpt, targets):
    reset_to_base(server, ckpt)
    reply = server.update(ckpt.seed2, target_modules=targets, flush_cache=False, weight_version="partial")
    assert {m["name"] for m in reply["modules"]} == set(targets)
    got = server.checksums()
    base, new = ckpt.disk[str(ckpt.base)], ckpt.disk[str(ckpt.seed2)]
    for m in MODULES:
        assert got[m] == (new[m] if m in targets else base[m]), m
    sources = {m["name"]: realpath(m["source_dir"]) for m in server.info()["modules"]}
    for m in MODULES:
        assert sources[m] == realpath((ckpt.seed2 if m in targets else ckpt.base) / m), m


def test_a_folder_with_only_the_updated_module_is_enough_as_in_sglang(server, ckpt, tmp_path):
    """SGLang reads module M from model_path/M and needs nothing else: a trainer may save only its transformer."""
    import shutil
    reset_to_base(server, ckpt)
    only = tmp_path / "only-transformer"
    shutil.copytree(ckpt.seed2 / "transformer", only / "transformer")  # no model_index.json, no other module
    reply = server.update(only, target_modules=["transformer"], weight_version="only-transformer")
    assert [m["name"] for m in reply["modules"]] == ["transformer"]
    got, base = server.checksums(), ckpt.disk[str(ckpt.base)]
    assert got["transformer"] == ckpt.disk[str(ckpt.seed2)]["transformer"]
    assert got["vae"] == base["vae"] and got["text_encoder"] == base["text_encoder"]
    # Every module (no target_modules) needs every module's folder: SGLang's refusal, and nothing changes.
    reply = server.update(only, expect=400)
    assert "Cannot update weights: missing weight files for modules: ['text_encoder', 'vae']. No partial updates allowed." \
        in reply["message"], reply
    assert server.checksums() == got
    reply = server.update(tmp_path / "nothing", expect=400)
    assert "Cannot use model_path: " in reply["message"] and "nothing is not a directory" in reply["message"], reply


@pytest.mark.parametrize("mode", ["staged", "in_place", "auto"])
def test_each_mode_loads_the_new_checkpoint_exactly(server, ckpt, mode):
    reset_to_base(server, ckpt)
    png_base, _ = server.generate(seed=13)
    reply = server.update(ckpt.seed2, mode=mode, weight_version=f"mode-{mode}")
    if mode != "auto":
        assert reply["mode"] == mode, reply
    assert reply["mode_reason"], reply
    assert server.checksums() == ckpt.disk[str(ckpt.seed2)]
    png, version = server.generate(seed=13)
    assert version == f"mode-{mode}" and png != png_base
    reset_to_base(server, ckpt)
    assert server.generate(seed=13)[0] == png_base  # and back, bit for bit


def test_checksum_of_unknown_module_is_not_found(server, ckpt):
    reset_to_base(server, ckpt)
    got = server.checksums(["transformer", "no_such_module"])
    assert got == {"transformer": ckpt.disk[str(ckpt.base)]["transformer"], "no_such_module": "not_found"}


# (body sent as JSON, or raw bytes; a regex the message must match)
INVALID = {
    "nonexistent_path": ({"model_path": "/nonexistent/path/to/model"}, r"/nonexistent/path/to/model"),
    "missing_model_path": ({}, r"model_path is required"),
    "empty_model_path": ({"model_path": ""}, r"model_path"),
    "unknown_module": ({"model_path": "BASE", "target_modules": ["nonexistent_module"]},
                       r"nonexistent_module.*not found in pipeline|not found in pipeline.*nonexistent_module"),
    "model_path_not_string": ({"model_path": 123}, r"model_path"),
    "flush_cache_not_bool": ({"model_path": "BASE", "flush_cache": "yes"}, r"flush_cache"),
    "target_modules_not_list": ({"model_path": "BASE", "target_modules": "transformer"}, r"target_modules"),
    "target_modules_item_not_string": ({"model_path": "BASE", "target_modules": [1]}, r"target_modules"),
    "weight_version_not_string": ({"model_path": "BASE", "weight_version": 5}, r"weight_version"),
    "abort_all_requests_not_bool": ({"model_path": "BASE", "abort_all_requests": "true"}, r"abort_all_requests"),
    "mode_not_string": ({"model_path": "BASE", "mode": 3}, r"mode"),
    "mode_unknown": ({"model_path": "BASE", "mode": "sideways"}, r"mode"),
    "malformed_json": (b'{"model_path": ', r"\S"),
    "empty_body": (b"", r"\S"),
    "body_not_object": (b'["/a/path"]', r"\S"),
}


@pytest.mark.parametrize("case", list(INVALID))
def test_invalid_update_request_is_400_and_changes_nothing(server, ckpt, case):
    reset_to_base(server, ckpt)
    before = server.checksums()
    body, pattern = INVALID[case]
    if isinstance(body, bytes):
        r = server.post("/update_weights_from_disk", data=body)
    else:
        body = {k: (str(ckpt.base) if v == "BASE" else v) for k, v in body.items()}
        r = server.post("/update_weights_from_disk", body)
    assert r.status_code == 400, (r.status_code, r.text)
    reply = r.json()
    assert reply["success"] is False
    assert "weight_version" in reply, reply
    assert re.search(pattern, reply["message"]), reply["message"]
    assert reply["weight_version"] == "base", reply  # the version still served
    assert server.checksums() == before
    assert server.info()["weight_version"] == "base"


def test_corrupted_checkpoint_fails_names_vae_and_file_and_changes_nothing(server, ckpt):
    reset_to_base(server, ckpt)
    server.update(ckpt.perturbed, weight_version="perturbed")
    before = server.checksums()
    assert before == ckpt.disk[str(ckpt.perturbed)]
    png_before, _ = server.generate(seed=5)

    reply = server.update(ckpt.corrupted, expect=400, target_modules=["transformer", "vae"],
                          weight_version="corrupted")
    assert reply["weight_version"] == "perturbed", reply  # the version still served, not the refused one
    message = reply["message"]
    assert re.search(r"module\s+'vae'", message), message
    assert "diffusion_pytorch_model.safetensors" in message, message
    assert NO_WEIGHTS_CHANGED.search(message), message

    # The transformer (seed 2's in the corrupted checkpoint) was not committed either.
    assert server.checksums() == before
    assert server.info()["weight_version"] == "perturbed"
    png_after, version = server.generate(seed=5)
    assert version == "perturbed"
    assert png_after == png_before


def test_image_after_update_equals_a_fresh_server_on_the_new_checkpoint(server, ckpt, tmp_path_factory):
    reset_to_base(server, ckpt)
    png_base, _ = server.generate(seed=11)
    server.update(ckpt.second, weight_version="second")
    png_updated, version = server.generate(seed=11)
    assert version == "second"
    assert png_updated != png_base, "the transformer update did not change the image"

    fresh = start_server(tmp_path_factory, ckpt.second)
    try:
        assert fresh.checksums() == server.checksums() == ckpt.disk[str(ckpt.second)]
        png_fresh, _ = fresh.generate(seed=11)
    finally:
        fresh.kill()
    assert png_updated == png_fresh
