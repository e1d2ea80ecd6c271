"""Issue 13, points 3 and 4: every file an update reads stays inside the allowed model roots (symlinks included,
checked by the kernel on the descriptor read), no error echoes the bytes of a file that is not a safetensors file,
hostile values (NUL bytes, oversized or control-character weight_version) are refused, and non-finite weights are
refused before commit unless the request says check_finite: false. The actor port is held to the same rules."""
import json
import os
import shutil
import socket
import subprocess

import pytest
from safetensors.torch import load_file, save_file

from harness import REFIT, first_shard, run, start_server

CLIENT = os.environ.get("REFIT_REMOTE_CLIENT", "")
SECRET = b"TOPSECRETDATA-do-not-leak-" * 64
# What the first 8 bytes of SECRET make when read as safetensors' little-endian header length.
SECRET_NUMBER = str(int.from_bytes(SECRET[:8], "little"))
assert SECRET_NUMBER == "4995128901736877908"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Layout:
    """root/ (the one allowed root) and outside/, with checkpoints that escape in different ways."""

    def __init__(self, base, ckpt):
        self.base = base
        self.root = base / "root"
        self.outside = base / "outside"
        self.root.mkdir()
        self.outside.mkdir()
        copy = lambda src, name: shutil.copytree(src, self.root / name, symlinks=True)
        self.good = copy(ckpt.base, "good")
        self.second = copy(ckpt.second, "second")
        shutil.copytree(ckpt.seed2, self.outside / "seed2")
        self.private = self.outside / "private.bin"
        self.private.write_bytes(SECRET)
        self.private.chmod(0o600)

        # A component folder that is a symlink out of the root (absolute, and relative through "..").
        self.comp_abs = self._with_transformer("comp_abs", lambda t: os.symlink(self.outside / "seed2" / "transformer", t))
        self.comp_rel = self._with_transformer("comp_rel", lambda t: os.symlink("../../outside/seed2/transformer", t))
        # A shard inside the root that is a symlink to a private file outside it.
        self.shard_secret = copy(ckpt.base, "shard_secret")
        shard = first_shard(self.shard_secret / "transformer")
        shard.unlink()
        os.symlink(self.private, shard)
        # A shard inside the root whose content is the private bytes (not a safetensors file at all).
        self.shard_junk = copy(ckpt.base, "shard_junk")
        shard = first_shard(self.shard_junk / "transformer")
        shard.unlink()
        shard.write_bytes(SECRET)
        # Symlinks that stay inside the root: relative ones are followed; absolute ones are refused by design.
        self.inside_rel = self._with_transformer("inside_rel", lambda t: os.symlink("../second/transformer", t))
        self.inside_abs = self._with_transformer("inside_abs", lambda t: os.symlink(self.second / "transformer", t))
        # model_path itself an absolute symlink inside the root (a "latest" link a trainer keeps).
        self.latest = self.root / "latest"
        os.symlink(self.second, self.latest)

    def _with_transformer(self, name, link):
        d = shutil.copytree(self.good, self.root / name, symlinks=True)
        shutil.rmtree(d / "transformer")
        link(d / "transformer")
        return d


@pytest.fixture(scope="module")
def layout(tmp_path_factory, ckpt):
    return Layout(tmp_path_factory.mktemp("hardening"), ckpt)


@pytest.fixture(scope="module")
def actor_port():
    return free_port()


@pytest.fixture(scope="module")
def hserver(tmp_path_factory, ckpt, layout, actor_port):
    s = start_server(tmp_path_factory, ckpt.base, "--allowed-model-root", layout.root, "--actor-port", actor_port)
    yield s
    s.kill()


def reset(server, layout, ckpt):
    server.update(layout.good, weight_version="reset")
    assert server.checksums() == ckpt.disk[str(ckpt.base)]


def refused(server, body, expect=400, path="/update_weights_from_disk"):
    """Posts an update that must be refused; returns its message after checking that nothing changed."""
    before, version = server.checksums(), server.info()["weight_version"]
    r = server.post(path, body)
    assert r.status_code == expect, (r.status_code, r.text)
    reply = r.json()
    assert reply.get("success") is not True, reply
    assert server.checksums() == before
    assert server.info()["weight_version"] == version
    return reply.get("message") or reply.get("detail")


# ---------------------------------------------------------------------------------------------------------------
# Point 3: symlinks and file contents


@pytest.mark.parametrize("which", ["comp_abs", "comp_rel"])
def test_a_component_folder_symlinked_out_of_the_root_is_refused(hserver, layout, ckpt, which):
    reset(hserver, layout, ckpt)
    message = refused(hserver, {"model_path": str(getattr(layout, which)), "weight_version": "escaped"})
    assert "transformer" in message and "outside the allowed model root" in message, message
    assert "No weights were changed" in message, message
    assert hserver.checksums() == ckpt.disk[str(ckpt.base)]


def refused_without_leaking(hserver, layout, ckpt, model_path):
    """Updates from model_path: 400, nothing changed, and neither the reply nor the log shows the secret's bytes."""
    reset(hserver, layout, ckpt)
    r = hserver.post("/update_weights_from_disk", {"model_path": str(model_path)})
    assert r.status_code == 400, (r.status_code, r.text)
    assert hserver.checksums() == ckpt.disk[str(ckpt.base)]
    for text in (r.text, hserver.log()):
        assert "TOPSECRE" not in text and SECRET_NUMBER not in text
    return r.json()["message"]


def test_a_shard_symlinked_to_a_private_file_is_refused_without_leaking_it(hserver, layout, ckpt):
    message = refused_without_leaking(hserver, layout, ckpt, layout.shard_secret)
    assert "outside the allowed model root" in message, message


def test_a_shard_that_is_not_a_safetensors_file_is_refused_without_echoing_its_bytes(hserver, layout, ckpt):
    message = refused_without_leaking(hserver, layout, ckpt, layout.shard_junk)
    assert "not a safetensors file: its header length field is implausible" in message, message
    assert f"{len(SECRET)} byte file" in message, message


def test_a_relative_symlink_that_stays_inside_the_root_is_followed(hserver, layout, ckpt):
    reset(hserver, layout, ckpt)
    reply = hserver.update(layout.inside_rel, weight_version="inside-rel")
    assert reply["weight_version"] == "inside-rel"
    # transformer from second (through the link), the rest from good: exactly second's checksums
    assert hserver.checksums() == ckpt.disk[str(ckpt.second)]


def test_an_absolute_symlink_inside_a_checkpoint_is_refused_even_when_it_stays_in_the_root(hserver, layout, ckpt):
    reset(hserver, layout, ckpt)
    message = refused(hserver, {"model_path": str(layout.inside_abs)})
    assert "transformer" in message and "symlinks inside a checkpoint must be relative" in message, message


def test_a_model_path_that_is_an_absolute_symlink_into_the_root_is_resolved_first(hserver, layout, ckpt):
    reset(hserver, layout, ckpt)
    hserver.update(layout.latest, weight_version="latest")
    assert hserver.checksums() == ckpt.disk[str(ckpt.second)]
    assert hserver.info()["weight_version"] == "latest"


# ---------------------------------------------------------------------------------------------------------------
# Point 4: bounded inputs


def test_a_nul_byte_in_model_path_is_refused_naming_the_field(hserver, layout, ckpt):
    reset(hserver, layout, ckpt)
    body = json.dumps({"model_path": str(layout.second) + "\u0000/ignored"})
    r = hserver.post("/update_weights_from_disk", data=body)
    assert r.status_code == 400, (r.status_code, r.text)
    assert "field 'model_path' must not contain a NUL byte" in r.json()["message"], r.text
    assert hserver.checksums() == ckpt.disk[str(ckpt.base)]


def test_a_nul_byte_in_lora_path_is_refused_naming_the_field(hserver, layout):
    r = hserver.post("/v1/set_lora", data=json.dumps({"lora_nickname": "x", "lora_path": str(layout.good) + "\u0000"}))
    assert r.status_code == 400, (r.status_code, r.text)
    assert "field 'lora_path' must not contain a NUL byte" in r.text, r.text


@pytest.mark.parametrize("version,why", [
    ("v" * 300, "field 'weight_version' is 300 bytes long; at most 256 are allowed"),
    ("step-1\nfake_metric 1", "field 'weight_version' holds the byte 0x0a at offset 6"),
    ("a\u0001b", "field 'weight_version' holds the byte 0x01 at offset 1"),
    ('quote"d', "field 'weight_version' holds the byte 0x22 at offset 5"),
], ids=["300_bytes", "newline", "control", "quote"])
def test_a_hostile_weight_version_is_refused_and_nothing_changes(hserver, layout, ckpt, version, why):
    reset(hserver, layout, ckpt)
    message = refused(hserver, {"model_path": str(layout.second), "weight_version": version})
    assert why in message, message
    detail = refused(hserver, {"lora_nickname": "x", "lora_path": str(layout.good), "weight_version": version},
                     path="/v1/set_lora")
    assert why in detail, detail
    assert version not in hserver.get("/metrics").text


def test_a_weight_version_of_256_printable_bytes_is_accepted(hserver, layout, ckpt):
    reset(hserver, layout, ckpt)
    version = "v1.0+run:7/step=12 " + "x" * (256 - 19)
    assert len(version) == 256
    assert hserver.update(layout.second, weight_version=version)["weight_version"] == version
    assert hserver.info()["weight_version"] == version


@pytest.fixture(scope="module")
def nan_ckpt(layout, ckpt):
    """second/ with one transformer value set to NaN; returns (path, tensor name, its checksums on disk)."""
    d = shutil.copytree(layout.second, layout.root / "nan")
    shard = first_shard(d / "transformer")
    tensors = load_file(str(shard))
    name = sorted(n for n, t in tensors.items() if t.is_floating_point() and t.dim() == 2)[0]
    t = tensors[name].clone()
    t.view(-1)[t.numel() // 2] = float("nan")
    tensors[name] = t
    shard.unlink()
    save_file(tensors, str(shard), metadata={"format": "pt"})
    sums = json.loads(run(REFIT, "checksum", d, "--dtype", "fp32", "--json").stdout)
    assert sums["transformer"] != ckpt.disk[str(ckpt.second)]["transformer"]
    return d, name, sums


@pytest.mark.parametrize("mode", ["staged", "in_place"])
def test_an_update_with_a_nan_is_refused_naming_the_tensor(hserver, layout, ckpt, nan_ckpt, mode):
    reset(hserver, layout, ckpt)
    path, name, _ = nan_ckpt
    message = refused(hserver, {"model_path": str(path), "mode": mode, "weight_version": "nan"})
    assert f"Failed to update module 'transformer' (worker 0) in phase '{'stage' if mode == 'staged' else 'commit'}'" in message, message
    assert f"tensor '{name}' holds NaN or infinite values" in message, message
    assert "All modules rolled back to original weights." in message, message
    assert hserver.checksums() == ckpt.disk[str(ckpt.base)]


def test_check_finite_false_accepts_the_nan(hserver, layout, ckpt, nan_ckpt):
    reset(hserver, layout, ckpt)
    path, _, sums = nan_ckpt
    reply = hserver.update(path, check_finite=False, weight_version="nan-accepted")
    assert reply["weight_version"] == "nan-accepted"
    assert hserver.checksums() == sums
    reset(hserver, layout, ckpt)


def test_check_finite_must_be_a_boolean(hserver, layout, ckpt):
    message = refused(hserver, {"model_path": str(layout.second), "check_finite": "no"})
    assert "field 'check_finite' must be a boolean" in message, message


def test_a_server_started_with_no_check_finite_accepts_the_nan_unless_asked(tmp_path_factory, ckpt, layout, nan_ckpt):
    s = start_server(tmp_path_factory, ckpt.base, "--no-check-finite")
    try:
        path, name, sums = nan_ckpt
        r = s.post("/update_weights_from_disk", {"model_path": str(path), "check_finite": True})
        assert r.status_code == 400 and f"tensor '{name}'" in r.json()["message"], r.text
        assert s.checksums() == ckpt.disk[str(ckpt.base)]
        s.update(path)
        assert s.checksums() == sums
        assert "accept non-finite values unless a request says otherwise (--no-check-finite)" in s.log()
    finally:
        s.kill()


# ---------------------------------------------------------------------------------------------------------------
# The actor port: the engine enforces the roots and the bounds, not only the HTTP bridge


def remote_update(port, model_path, *extra):
    p = subprocess.run([CLIENT, "127.0.0.1", str(port), "--model-path", str(model_path), "--size", "32x32", "--steps", "2",
                        "--connect-timeout", "60", *map(str, extra)],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    return p.returncode, p.stdout


@pytest.mark.skipif(not CLIENT, reason="REFIT_REMOTE_CLIENT is not set (CTest sets it)")
def test_the_actor_port_refuses_a_model_path_outside_the_roots(hserver, layout, ckpt, actor_port):
    reset(hserver, layout, ckpt)
    for path in (layout.outside / "seed2", layout.comp_abs):
        code, out = remote_update(actor_port, path, "--weight-version", "remote-escape")
        assert code == 1, out
        assert "the update failed" in out and "outside the allowed model root" in out, out
        assert hserver.checksums() == ckpt.disk[str(ckpt.base)]
        assert hserver.info()["weight_version"] == "reset"
    code, out = remote_update(actor_port, layout.second, "--weight-version", "w" * 300)
    assert code == 1 and "field 'weight_version' is 300 bytes long" in out, out
    assert hserver.checksums() == ckpt.disk[str(ckpt.base)]
    code, out = remote_update(actor_port, layout.second, "--weight-version", "remote-inside")
    assert code == 0, out
    assert hserver.checksums() == ckpt.disk[str(ckpt.second)]
