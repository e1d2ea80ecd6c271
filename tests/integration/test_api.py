"""The rest of the HTTP surface: read-only endpoints, /metrics (promtool and counters), the OpenAI client, generation
input errors, and the request-size limit."""
import base64
import os
import re
import shutil
import subprocess

import openai
import pytest

from harness import GEN, MODULES, metric, parse_metrics, promtool_check

LIMIT = 1 << 20  # --max-request-bytes of the session server (conftest.py)


def test_health(server):
    r = server.get("/health")
    assert r.status_code == 200 and r.json() == {"status": "ok"}


def test_v1_models_lists_the_model_path(server, ckpt):
    server.update(ckpt.base, weight_version="base")
    r = server.get("/v1/models")
    assert r.status_code == 200
    assert r.json() == {"object": "list", "data": [{"id": str(ckpt.base), "object": "model", "owned_by": "refit"}]}


@pytest.mark.parametrize("path", ["/get_model_info", "/v1/model_info"])
def test_model_info_shape(server, ckpt, path):
    server.update(ckpt.base, weight_version="info")
    r = server.get(path)
    assert r.status_code == 200
    info = r.json()
    assert info["model_path"] == str(ckpt.base)
    assert info["weight_version"] == "info"
    assert {m["name"] for m in info["modules"]} == set(MODULES)
    classes = {m["name"]: m["class"] for m in info["modules"]}
    assert classes == {"text_encoder": "Qwen3ForCausalLM", "transformer": "Flux2Transformer2DModel",
                       "vae": "AutoencoderKLFlux2"}
    for m in info["modules"]:
        assert set(m) >= {"name", "class", "dtype", "device", "worker", "tensors", "bytes", "source_dir"}, m
        assert m["dtype"] in ("fp32", "float32", "F32", "Float"), m  # --dtype, safetensors or torch spelling
        assert m["device"] == "cpu" and m["worker"] == 0, m
        assert m["tensors"] > 0 and m["bytes"] > 0, m
        assert os.path.realpath(m["source_dir"]) == os.path.realpath(ckpt.base / m["name"]), m
    assert {m["name"]: m["tensors"] for m in info["modules"]} == {"text_encoder": 46, "transformer": 33, "vae": 127}


# The contract fixes this name; promtool's lint prefers base units (bytes per second). Nothing else may be flagged.
def test_metrics_pass_promtool_and_count_updates_and_generations(server, ckpt):
    promtool = shutil.which("promtool")
    assert promtool, "promtool not found (Debian package prometheus; scripts/setup installs it)"
    r = server.get("/metrics")
    assert r.status_code == 200
    assert r.headers["Content-Type"].startswith("text/plain"), r.headers["Content-Type"]
    promtool_check(promtool, r.text)
    before = parse_metrics(r.text)

    server.update("/nonexistent/metrics/model", expect=400)
    reply = server.update(ckpt.second, weight_version="metrics-1")  # last: the "last update" gauges describe it
    server.generate(seed=4)

    text = server.get("/metrics").text
    promtool_check(promtool, text)
    after = parse_metrics(text)
    for result, delta in (("success", 1), ("failure", 1)):
        assert metric(after, "refit_updates_total", result=result) == \
            metric(before, "refit_updates_total", result=result) + delta, result
    assert metric(after, "refit_generations_total", result="ok") == metric(before, "refit_generations_total", result="ok") + 1
    assert metric(after, "refit_generation_latency_seconds_count") == \
        metric(before, "refit_generation_latency_seconds_count") + 1
    assert metric(after, "refit_generation_latency_seconds_sum") > metric(before, "refit_generation_latency_seconds_sum")
    assert metric(after, "refit_update_bytes") == sum(m["bytes"] for m in reply["modules"])
    assert metric(after, "refit_update_bytes_per_second") > 0
    assert metric(after, "refit_update_phase_seconds", phase="total") > 0
    assert metric(after, "refit_update_pause_seconds") >= 0
    assert metric(after, "refit_requests_in_flight") == 0 and metric(after, "refit_requests_queued") == 0
    assert metric(after, "refit_model_info", model_path=str(ckpt.second), weight_version="metrics-1") == 1
    assert ("refit_model_info", frozenset({("model_path", str(ckpt.base)), ("weight_version", "metrics-1")})) \
        not in after
    infos = [k for k in after if k[0] == "refit_model_info"]
    assert len(infos) == 1, infos


def test_openai_client_generates_a_b64_png_equal_to_a_plain_request(server, ckpt):
    server.update(ckpt.base, weight_version="openai")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="dummy-key",
                           http_client=openai.DefaultHttpxClient(trust_env=False), max_retries=0)
    model = client.models.list().data[0].id  # `model` names the served model (anything else is a 404)
    result = client.images.generate(model=model, prompt="a lighthouse at dusk", n=1, size="32x32",
                                    response_format="b64_json", extra_body={"seed": 9, "num_inference_steps": 2})
    assert len(result.data) == 1
    png = base64.b64decode(result.data[0].b64_json)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    plain, version = server.generate(seed=9, prompt="a lighthouse at dusk")
    assert version == "openai"
    assert png == plain


def test_teacache_requests_report_their_skips_and_metrics_count_them(server, ckpt):
    body = {"prompt": "a red fox", "seed": 6, "response_format": "b64_json", "size": "32x32", "num_inference_steps": 10}

    def post(**fields):
        r = server.post("/v1/images/generations", {**body, **fields})
        assert r.status_code == 200, r.text
        return r.json()

    before = parse_metrics(server.get("/metrics").text)
    plain = post()
    assert "teacache" not in plain
    exact = post(enable_teacache=True, teacache_threshold=0)
    assert exact["teacache"] == {"transformer_calls": 10, "skipped": 0}, exact["teacache"]
    assert exact["data"][0]["b64_json"] == plain["data"][0]["b64_json"]
    skipping = post(teacache_threshold=1.0)  # a threshold alone turns TeaCache on for the request
    tc = skipping["teacache"]
    assert tc["transformer_calls"] == 10 and 0 < tc["skipped"] <= 8, tc  # first and last steps always compute

    after = parse_metrics(server.get("/metrics").text)
    assert metric(after, "refit_teacache_requests_total", worker="0") == metric(before, "refit_teacache_requests_total", worker="0") + 2
    assert metric(after, "refit_teacache_steps_total", worker="0", result="skipped") == \
        metric(before, "refit_teacache_steps_total", worker="0", result="skipped") + tc["skipped"]
    assert metric(after, "refit_teacache_steps_total", worker="0", result="computed") == \
        metric(before, "refit_teacache_steps_total", worker="0", result="computed") + 10 + 10 - tc["skipped"]


def test_n_images_per_request(server, ckpt):
    server.update(ckpt.base, weight_version="n2")
    r = server.post("/v1/images/generations", {"prompt": "two foxes", "n": 2, "seed": 1, **GEN})
    assert r.status_code == 200, r.text
    reply = r.json()
    assert len(reply["data"]) == 2
    assert reply["weight_version"] == "n2" and reply["inference_time_s"] > 0 and isinstance(reply["created"], int)
    pngs = [base64.b64decode(d["b64_json"]) for d in reply["data"]]
    assert all(p[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    assert pngs[0] != pngs[1]


def test_seed_decides_the_image(server, ckpt):
    server.update(ckpt.base, weight_version="seeds")
    a, b, c = server.generate(seed=31)[0], server.generate(seed=31)[0], server.generate(seed=32)[0]
    assert a == b and a != c
    r1, r2 = (server.post("/v1/images/generations", {"prompt": "no seed given", **GEN}) for _ in range(2))
    assert r1.status_code == r2.status_code == 200
    assert r1.json()["data"][0]["b64_json"] != r2.json()["data"][0]["b64_json"], "the default seed is not random"


BAD_GENERATIONS = {
    "missing_prompt": ({"seed": 1}, r"prompt"),
    "prompt_not_string": ({"prompt": 5}, r"prompt"),
    "html_format": ({"prompt": "x", "response_format": "html"}, r"response_format"),
    "n_zero": ({"prompt": "x", "n": 0}, r"\bn\b"),
    "n_nine": ({"prompt": "x", "n": 9}, r"\bn\b"),
    "size_garbage": ({"prompt": "x", "size": "big"}, r"size"),
    "size_not_multiple_of_4": ({"prompt": "x", "size": "30x30"}, r"size"),
    "steps_not_int": ({"prompt": "x", "num_inference_steps": "four"}, r"num_inference_steps"),
    "seed_not_int": ({"prompt": "x", "seed": "one"}, r"seed"),
    "guidance_not_number": ({"prompt": "x", "guidance_scale": "high"}, r"guidance_scale"),
    "teacache_not_bool": ({"prompt": "x", "enable_teacache": "on"}, r"enable_teacache"),
    "teacache_threshold_negative": ({"prompt": "x", "teacache_threshold": -0.5}, r"teacache_threshold.*>= 0"),
    "teacache_threshold_not_number": ({"prompt": "x", "teacache_threshold": "low"}, r"teacache_threshold"),
}


@pytest.mark.parametrize("case", list(BAD_GENERATIONS))
def test_bad_generation_request_is_400_naming_the_field(server, case):
    body, pattern = BAD_GENERATIONS[case]
    body = {**GEN, **body}
    r = server.post("/v1/images/generations", body)
    assert r.status_code == 400, (r.status_code, r.text[:300])
    assert re.search(pattern, r.text), r.text


def test_malformed_generation_json_is_400(server):
    r = server.post("/v1/images/generations", data=b'{"prompt": "x",')
    assert r.status_code == 400, (r.status_code, r.text)


@pytest.mark.parametrize("path", ["/update_weights_from_disk", "/v1/images/generations", "/get_weights_checksum"])
def test_body_over_the_limit_is_413_and_the_server_lives_on(server, ckpt, path):
    server.update(ckpt.base, weight_version="limit")
    before = server.checksums()
    # A body padded with JSON whitespace to just under the limit is an ordinary request.
    under = b'{"model_path": "%s", "weight_version": "limit"' % str(ckpt.base).encode()
    under += b" " * (LIMIT - len(under) - 1) + b'}'
    assert len(under) == LIMIT
    ok = server.post("/update_weights_from_disk", data=under)
    assert ok.status_code == 200, (ok.status_code, ok.text[:300])

    over = b'{"model_path": "%s", "pad": "' % str(ckpt.seed2).encode()
    over += b"x" * (LIMIT + 1 - len(over) - 2) + b'"}'
    assert len(over) == LIMIT + 1
    try:
        r = server.post(path, data=over)
        assert r.status_code == 413, (r.status_code, r.text[:300])
    except Exception as e:  # a server may close the connection after the 413; then the status was never read
        pytest.fail(f"no 413 reply to a {len(over)}-byte body: {e!r}")
    assert server.get("/health").status_code == 200
    assert server.checksums() == before
    assert server.generate(seed=1)[1] == "limit"
