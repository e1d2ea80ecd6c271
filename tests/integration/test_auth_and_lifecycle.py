"""Admin API key and allowed model roots (a second server, with two workers), and the server's exit on SIGTERM."""
import os
import signal

import pytest
import requests

from harness import http, start_server

KEY = "s3cret-admin-key"


@pytest.fixture(scope="module")
def guarded(tmp_path_factory, ckpt):
    """A server with --api-key and two --allowed-model-root (allowed/ and extra/), plus escape routes out of them."""
    links = ckpt.root
    escape_link = ckpt.allowed / "escape"          # a symlink inside the root pointing outside
    if not escape_link.exists():
        os.symlink(ckpt.seed2, escape_link)
    prefix_twin = links / "allowedx"                # shares the root's string prefix, lies outside
    if not prefix_twin.exists():
        os.symlink(ckpt.seed2, prefix_twin)
    s = start_server(tmp_path_factory, ckpt.base, "--allowed-model-root", ckpt.allowed,
                     "--allowed-model-root", ckpt.extra, "--workers", 2, api_key=KEY)
    yield s
    s.kill()


def admin_calls(ckpt):
    return [("/update_weights_from_disk", {"model_path": str(ckpt.second)}),
            ("/get_weights_checksum", {"module_names": None})]


AUTH_HEADERS = {
    "no_key": None,
    "wrong_key": "Bearer wrong-key",
    "key_with_suffix": f"Bearer {KEY}x",
    "key_prefix": f"Bearer {KEY[:-1]}",
    "no_bearer_scheme": KEY,
    "basic_scheme": f"Basic {KEY}",
    "empty_bearer": "Bearer ",
}


@pytest.mark.parametrize("case", list(AUTH_HEADERS))
def test_admin_endpoints_need_the_key(guarded, ckpt, case):
    before = guarded.checksums()
    for path, body in admin_calls(ckpt):
        headers = {"Authorization": AUTH_HEADERS[case]} if AUTH_HEADERS[case] else {}
        r = http().post(guarded.url + path, json=body, headers=headers, timeout=60)
        assert r.status_code == 401, (path, r.status_code, r.text)
        reply = r.json()
        assert reply["success"] is False and reply["message"], reply
    assert guarded.checksums() == before == ckpt.disk[str(ckpt.base)]


def test_read_only_endpoints_need_no_key(guarded):
    assert http().get(guarded.url + "/health", timeout=30).status_code == 200
    assert http().get(guarded.url + "/get_model_info", timeout=30).status_code == 200


@pytest.mark.parametrize("where", ["outside", "dotdot", "symlink", "prefix_twin", "relative", "nonexistent_outside"])
def test_model_path_outside_the_allowed_roots_is_403(guarded, ckpt, where):
    path = {
        "outside": str(ckpt.seed2),
        "dotdot": f"{ckpt.allowed}/../outside/seed2",
        "symlink": str(ckpt.allowed / "escape"),
        "prefix_twin": str(ckpt.root / "allowedx"),
        "relative": os.path.relpath(ckpt.seed2, guarded.cwd),
        "nonexistent_outside": "/nonexistent/model",
    }[where]
    if where != "nonexistent_outside":  # a valid checkpoint: only its place is wrong
        assert os.path.isfile(os.path.join(guarded.cwd, path, "model_index.json"))
    before = guarded.checksums()
    version = guarded.info()["weight_version"]
    r = guarded.post("/update_weights_from_disk", {"model_path": path, "weight_version": "escaped"})
    assert r.status_code == 403, (r.status_code, r.text)
    reply = r.json()
    assert reply["success"] is False and reply["message"], reply
    assert guarded.checksums() == before
    assert guarded.info()["weight_version"] == version


def test_nonexistent_path_inside_a_root_is_400(guarded, ckpt):
    before = guarded.checksums()
    reply = guarded.update(ckpt.allowed / "nothing_here", expect=400)
    assert "nothing_here" in reply["message"], reply
    assert guarded.checksums() == before


def test_key_and_allowed_path_update_reaches_every_worker(guarded, ckpt):
    reply = guarded.update(ckpt.second, weight_version="guarded-second")
    assert sorted((m["name"], m["worker"]) for m in reply["modules"]) == \
        sorted((name, w) for name in ("text_encoder", "transformer", "vae") for w in (0, 1))
    for worker in (0, 1):
        assert guarded.checksums(worker=worker) == ckpt.disk[str(ckpt.second)], worker
    guarded.update(ckpt.perturbed, weight_version="guarded-perturbed")  # under the second root
    assert guarded.checksums() == ckpt.disk[str(ckpt.perturbed)]
    guarded.update(f"{ckpt.extra}/../allowed/base", weight_version="guarded-base")  # `..` that stays inside
    assert guarded.checksums() == ckpt.disk[str(ckpt.base)]


def test_devices_puts_one_worker_on_each_and_updates_reach_all(tmp_path_factory, ckpt):
    s = start_server(tmp_path_factory, ckpt.base, "--devices", "cpu,cpu")
    try:
        workers = sorted({(m["worker"], m["device"]) for m in s.info()["modules"]})
        assert workers == [(0, "cpu"), (1, "cpu")], workers
        before = len(s.log())
        reply = s.update(ckpt.second, weight_version="devices-second")
        assert sorted({m["worker"] for m in reply["modules"]}) == [0, 1]
        for worker in (0, 1):
            assert s.checksums(worker=worker) == ckpt.disk[str(ckpt.second)], worker
        assert s.generate(seed=5)[1] == "devices-second"
        assert "on 2 worker(s) (cpu,cpu" in s.log()
        # Read once per process: worker 1 copied what worker 0 staged instead of reading the files again.
        log = s.log()[before:]
        for module in ("text_encoder", "transformer", "vae"):
            assert f"module {module} (worker 1): copied" in log and "from worker 0's staged weights" in log, log[-3000:]
            assert f"module {module} (worker 0): read " in log and f"module {module} (worker 1): read " not in log, log[-3000:]
        # In place (no shadows to copy from), each worker reads the files itself, and the result is the same.
        s.update(ckpt.base, mode="in_place")
        for worker in (0, 1):
            assert s.checksums(worker=worker) == ckpt.disk[str(ckpt.base)], worker
    finally:
        s.stop()


@pytest.mark.parametrize("args, message", [
    (["--devices", "cpu,,cpu"], "--devices must be a comma-separated list like cuda:0,cuda:1 (or all), got 'cpu,,cpu'"),
    (["--devices", "tpu:0"], "--device must be cpu, cuda or cuda:N, got 'tpu:0'"),
    (["--devices", "cpu", "--workers", "2"], "--workers excludes --devices"),
])
def test_bad_devices_stop_the_server_before_it_loads(ckpt, args, message):
    import subprocess
    from harness import REFIT
    p = subprocess.run([REFIT, "serve", "--model-path", str(ckpt.base), "--port", "0", *args], capture_output=True, text=True, timeout=120)
    assert p.returncode != 0, p.stderr
    assert message in p.stderr + p.stdout, p.stderr + p.stdout
    assert "loading" not in p.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_the_server_with_exit_code_0(tmp_path_factory, ckpt, sig):
    s = start_server(tmp_path_factory, ckpt.base)
    try:
        assert s.get("/health").status_code == 200
        s.generate(seed=1)
        code = s.stop(sig, timeout=30)
    finally:
        s.kill()
    assert code == 0, f"exit code {code}\n{s.log()[-3000:]}"
    with pytest.raises(requests.ConnectionError):
        http().get(s.url + "/health", timeout=5)
