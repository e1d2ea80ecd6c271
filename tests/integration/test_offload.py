"""`refit serve --dit-layerwise-offload` against the real server: the transformer's blocks live in host memory and
updates go through that host store. Checksums against `refit checksum`, images against a server without offload,
the corrupted-checkpoint rollback, /get_model_info and /metrics."""
import re
import shutil
import subprocess

import pytest

from harness import REFIT, metric, parse_metrics, promtool_check, start_server

NO_WEIGHTS_CHANGED = re.compile(r"no weights\b.*\bchanged", re.I)


@pytest.fixture(scope="module")
def offload_server(tmp_path_factory, ckpt):
    s = start_server(tmp_path_factory, ckpt.base, "--dit-layerwise-offload", "--dit-offload-prefetch-size", 1)
    yield s
    s.kill()


@pytest.fixture(scope="module")
def plain_server(tmp_path_factory, ckpt):
    """The same model without offload: the image reference."""
    s = start_server(tmp_path_factory, ckpt.base)
    yield s
    s.kill()


def back_to_base(server, ckpt):
    server.update(ckpt.base, weight_version="base")
    assert server.checksums() == ckpt.disk[str(ckpt.base)]


def test_offload_server_reports_its_host_store_and_serves_the_checkpoint(offload_server, ckpt):
    assert re.search(r"layerwise offload of 3 transformer blocks", offload_server.log()), offload_server.log()[-2000:]
    assert offload_server.checksums() == ckpt.disk[str(ckpt.base)]
    offload_server.generate(seed=1)
    info = offload_server.info()
    assert len(info["layerwise_offload"]) == 1, info
    o = info["layerwise_offload"][0]
    assert o["worker"] == 0 and o["blocks"] == 3 and o["prefetch_size"] == 1, o
    assert sorted(o["resident_blocks"]) == [0, 1], o  # two device slots; the next request's first blocks wait
    # Two slots, each the size of the largest block (the tiny model's one double-stream block is half of all).
    assert o["host_bytes"] >= o["device_bytes"] > 0, o
    assert o["prefetches"] > 0, o
    transformer = next(m for m in info["modules"] if m["name"] == "transformer")
    assert transformer["bytes"] > o["host_bytes"] // 2, (transformer, o)


def test_images_with_offload_equal_images_without(offload_server, plain_server, ckpt):
    back_to_base(offload_server, ckpt)
    back_to_base(plain_server, ckpt)
    for seed in (3, 4):
        assert offload_server.generate(seed=seed)[0] == plain_server.generate(seed=seed)[0], seed


@pytest.mark.parametrize("mode", ["staged", "in_place", "auto"])
def test_update_with_offload_gives_the_new_checkpoints_checksums_and_images(offload_server, plain_server, ckpt, mode):
    back_to_base(offload_server, ckpt)
    offload_server.generate(seed=8)  # blocks resident on the device when the update commits
    refreshes = offload_server.info()["layerwise_offload"][0]["refreshes"]
    reply = offload_server.update(ckpt.seed2, weight_version="seed2", mode=mode)
    assert reply["mode"] == ("staged" if mode == "auto" else mode), reply
    assert offload_server.checksums() == ckpt.disk[str(ckpt.seed2)]
    png, version = offload_server.generate(seed=8)
    assert version == "seed2"
    plain_server.update(ckpt.seed2, weight_version="seed2")
    assert png == plain_server.generate(seed=8)[0]
    assert offload_server.info()["layerwise_offload"][0]["refreshes"] == refreshes + 2  # both resident blocks rewritten


def test_corrupted_checkpoint_with_offload_fails_and_changes_nothing(offload_server, ckpt):
    back_to_base(offload_server, ckpt)
    before = offload_server.checksums()
    png_before, _ = offload_server.generate(seed=5)
    reply = offload_server.update(ckpt.corrupted, expect=400, weight_version="corrupted")
    assert re.search(r"module\s+'vae'", reply["message"]), reply
    assert NO_WEIGHTS_CHANGED.search(reply["message"]), reply
    assert offload_server.checksums() == before == ckpt.disk[str(ckpt.base)]
    png_after, version = offload_server.generate(seed=5)
    assert version == "base" and png_after == png_before


def test_offload_metrics(offload_server, ckpt):
    offload_server.generate(seed=2)
    text = offload_server.get("/metrics").text
    promtool = shutil.which("promtool")
    assert promtool, "promtool not found (Debian package prometheus; scripts/setup installs it)"
    promtool_check(promtool, text)
    samples = parse_metrics(text)
    info = offload_server.info()["layerwise_offload"][0]
    assert metric(samples, "refit_offload_host_bytes", worker="0") == info["host_bytes"]
    assert metric(samples, "refit_offload_device_bytes", worker="0") == info["device_bytes"]
    assert metric(samples, "refit_offload_resident_blocks", worker="0") == 2
    assert metric(samples, "refit_offload_prefetches_total", worker="0") == info["prefetches"] > 0
    assert metric(samples, "refit_offload_prefetched_bytes_total", worker="0") == info["prefetched_bytes"] > 0


@pytest.mark.parametrize("value, why", [("0", "greater than 0"), ("1.5", "whole number"), ("-2", "greater than 0"),
                                        ("many", "must be a number"), ("inf", "finite"), ("1e30", "finite")])
def test_bad_prefetch_size_is_refused_at_startup(ckpt, value, why):
    r = subprocess.run([REFIT, "serve", "--model-path", str(ckpt.base), "--port", "0", "--dit-layerwise-offload",
                        "--dit-offload-prefetch-size", value], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert "--dit-offload-prefetch-size" in r.stderr + r.stdout, r.stderr
    assert why in r.stderr + r.stdout, r.stderr


def test_prefetch_size_without_offload_is_refused(ckpt):
    r = subprocess.run([REFIT, "serve", "--model-path", str(ckpt.base), "--port", "0", "--dit-offload-prefetch-size", "2"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert "requires --dit-layerwise-offload" in r.stderr + r.stdout, r.stderr
