"""Slow and many clients, admission control and bounded shutdown, against the real `refit serve` on loopback.

* 200 connections trickling their headers or bodies a byte at a time, plus 50 concurrent generations: /health and
  a small generation still get answers (the test waits generously, it does not time them: speed is bench/'s);
  every trickling connection gets 408 once --http-read-timeout passes, and is closed.
* --max-queued-requests: generation requests beyond the running ones plus the queue get 429 with Retry-After in
  OpenAI's error shape (images) or SGLang's {"detail"} (rollouts); the admitted ones all get their images.
* SIGTERM waits for requests being served up to --shutdown-timeout, then cancels the rest (503 "shutting down")
  and exits 0; a SIGTERM while the server starts also exits 0.
"""
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import msgpack
import pytest
import requests

from harness import GEN, REFIT, http, metric, parse_metrics, start_server

READ_TIMEOUT_S = 3


@pytest.fixture(scope="module")
def guarded(tmp_path_factory, ckpt):
    s = start_server(tmp_path_factory, ckpt.base, "--http-read-timeout", READ_TIMEOUT_S, "--max-queued-requests", 64)
    yield s
    s.stop()


class Trickler:
    """A connection that sends `head` and then one byte of `tail` every `every` seconds until told to stop."""

    def __init__(self, port, head: bytes, tail: bytes, every=0.5):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.sock.sendall(head)
        self.tail, self.every = tail, every
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        for b in self.tail:
            if self.stopped.wait(self.every):
                return
            try:
                self.sock.sendall(bytes([b]))
            except OSError:
                return

    def answer(self) -> bytes:
        """What the server sent before closing (waits for the close)."""
        data = b""
        while True:
            try:
                chunk = self.sock.recv(65536)
            except OSError:
                break
            if not chunk:
                break
            data += chunk
        self.stopped.set()
        self.sock.close()
        return data


def small_generation(server, seed):
    body = {"prompt": "a red fox", "seed": seed, "response_format": "b64_json", **GEN}
    return server.post("/v1/images/generations", body, timeout=60)


def test_slow_clients_and_a_generation_crowd_do_not_starve_health(guarded):
    endless_header = b"X-Slow: " + b"a" * 10_000  # longer than the read deadline lets it send
    tricklers = []
    for i in range(200):
        if i % 2 == 0:
            head, tail = b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\n", endless_header
        else:
            head = b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 5000\r\n\r\n{"
            tail = b" " * 4999
        tricklers.append(Trickler(guarded.port, head, tail))

    crowd = ThreadPoolExecutor(50)
    images = [crowd.submit(small_generation, guarded, 100 + i) for i in range(50)]
    try:
        # Each probe may take at most 20 s (it took forever before); how long they take is printed, not asserted.
        waits = []
        for _ in range(5):
            t0 = time.monotonic()
            with http() as session:
                r = session.get(guarded.url + "/health", timeout=20)
            waits.append(time.monotonic() - t0)
            assert r.status_code == 200, (r.status_code, r.text)
        r = small_generation(guarded, 7)
        assert r.status_code in (200, 429), (r.status_code, r.text)
        print(f"/health under load: {', '.join(f'{w * 1000:.0f} ms' for w in waits)}")
    finally:
        statuses = [f.result(timeout=300).status_code for f in images]
        crowd.shutdown()
    assert all(s == 200 for s in statuses), statuses  # 50 < 1 worker + 64 queued: all admitted

    # Every trickler was cut off at the deadline with a 408 in the OpenAI error shape.
    answers = [t.answer() for t in tricklers]
    for a in answers:
        assert a.startswith(b"HTTP/1.1 408"), a[:200]
        assert b"request timeout" in a and b'"invalid_request_error"' in a, a
    log = guarded.log()
    assert "408" in log


def test_a_request_that_arrives_in_time_is_served_on_a_kept_alive_connection(guarded):
    with http() as session:
        for _ in range(3):
            r = session.get(guarded.url + "/health", timeout=20)
            assert r.status_code == 200
        # An idle kept-alive connection is closed after the read timeout; requests opens a new one.
        time.sleep(READ_TIMEOUT_S + 1)
        assert session.get(guarded.url + "/health", timeout=20).status_code == 200


def test_malformed_and_oversized_requests_get_json_errors(guarded):
    def raw(data: bytes) -> bytes:
        with socket.create_connection(("127.0.0.1", guarded.port), timeout=30) as s:
            s.sendall(data)
            out = b""
            while chunk := s.recv(65536):
                out += chunk
            return out

    a = raw(b"GARBAGE\r\n\r\n")
    assert a.startswith(b"HTTP/1.1 400") and b'"invalid_request_error"' in a, a
    a = raw(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n")
    assert a.startswith(b"HTTP/1.1 431") and b"header fields too large" in a, a[:300]
    a = raw(b"POST /get_weights_checksum HTTP/1.1\r\nHost: x\r\nContent-Length: 2000000\r\nConnection: close\r\n\r\n")
    assert a.startswith(b"HTTP/1.1 413") and b"--max-request-bytes" in a, a[:300]
    a = raw(b"GET /get_weights_checksum HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert a.startswith(b"HTTP/1.1 405") and b"Allow: POST" in a, a[:300]
    a = raw(b"GET /v1/models/" + b"a" * 6000 + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert a.startswith(b"HTTP/1.1 414") and b"at most 4096 are allowed" in a, a[:300]
    a = raw(b"GET /health%00x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert a.startswith(b"HTTP/1.1 400"), a[:300]
    with http() as session:
        assert session.get(guarded.url + "/health", timeout=20).status_code == 200


@pytest.fixture(scope="module")
def tight(tmp_path_factory, ckpt):
    s = start_server(tmp_path_factory, ckpt.base, "--max-queued-requests", 2)
    yield s
    s.stop()


def test_beyond_the_queue_limit_requests_get_429_with_retry_after(tight):
    # Each takes a while on one worker, so that 12 sent at once overlap: 1 runs, 2 wait, the rest are refused.
    body = {"prompt": "a red fox", "response_format": "b64_json", "size": "256x256", "num_inference_steps": 8}

    def one(i):
        return tight.post("/v1/images/generations", {**body, "seed": i}, timeout=120)

    with ThreadPoolExecutor(12) as pool:
        replies = list(pool.map(one, range(12)))
    codes = [r.status_code for r in replies]
    assert set(codes) <= {200, 429}, [(r.status_code, r.text[:200]) for r in replies]
    assert codes.count(429) >= 1 and codes.count(200) >= 3, codes
    for r in replies:
        if r.status_code == 429:
            assert int(r.headers["Retry-After"]) >= 1, r.headers
            err = r.json()["error"]
            assert err["code"] == "rate_limit_exceeded" and err["type"] == "rate_limit_error", err
            assert "--max-queued-requests" in err["message"], err
        else:
            assert r.json()["data"][0]["b64_json"]
    # Once the crowd is served, a request is admitted again.
    assert one(99).status_code == 200
    assert "429 so far" in tight.log()


def test_rollouts_count_against_the_same_limit(tight):
    gen = {"prompt": "a red fox", "response_format": "b64_json", "size": "256x256", "num_inference_steps": 8}
    rollout = {"prompt": "a red fox", "width": 32, "height": 32, "num_inference_steps": 2, "rollout": True, "seed": 3}

    with ThreadPoolExecutor(8) as pool:
        crowd = [pool.submit(tight.post, "/v1/images/generations", {**gen, "seed": i}, timeout=120) for i in range(6)]
        time.sleep(0.5)  # the crowd fills the worker and the queue first
        r = tight.post("/rollout/generate", rollout, timeout=120)
        codes = [f.result().status_code for f in crowd]
    if r.status_code == 429:
        assert "--max-queued-requests" in r.json()["detail"] and int(r.headers["Retry-After"]) >= 1
    else:  # the crowd drained in under half a second (a fast machine): the rollout was admitted
        assert r.status_code == 200 and msgpack.unpackb(r.content, raw=False)
    assert 429 in codes, codes


def wait_until_busy(server, running=1, queued=0):
    """Until the scheduler reports the requests (so they were read and handed over before the signal)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        samples = parse_metrics(server.get("/metrics", timeout=20).text)
        if metric(samples, "refit_requests_in_flight") >= running and metric(samples, "refit_requests_queued") >= queued:
            return
        time.sleep(0.05)
    raise AssertionError(f"the server never had {running} running and {queued} queued requests\n{server.log()}")


def test_simultaneous_requests_run_side_by_side_on_two_workers(tmp_path_factory, ckpt):
    """Two generations sent at once both run (the handler pool grows for the second instead of queueing it behind
    the first), and a query sent meanwhile is answered while they run."""
    s = start_server(tmp_path_factory, ckpt.base, "--workers", 2)
    try:
        long = {"prompt": "a red fox", "response_format": "b64_json", "size": "256x256", "num_inference_steps": 40}
        s.info()  # leaves one idle handler thread: the second generation must not queue behind the one it wakes
        with ThreadPoolExecutor(2) as pool:
            running = [pool.submit(s.post, "/v1/images/generations", {**long, "seed": i}, timeout=600) for i in range(2)]
            wait_until_busy(s, running=2)  # both on a worker at the same time
            assert s.info()["modules"], "a query during two generations"
            assert not all(f.done() for f in running)
            assert [f.result().status_code for f in running] == [200, 200]
    finally:
        s.stop()


def test_sigterm_waits_for_a_short_request_then_exits_0(tmp_path_factory, ckpt):
    s = start_server(tmp_path_factory, ckpt.base, "--shutdown-timeout", 60)
    body = {"prompt": "a red fox", "seed": 1, "response_format": "b64_json", "size": "128x128", "num_inference_steps": 4}
    with ThreadPoolExecutor(1) as pool:
        f = pool.submit(s.post, "/v1/images/generations", body, timeout=120)
        wait_until_busy(s)
        code = s.stop(timeout=120)
        r = f.result()
    assert code == 0, s.log()
    assert r.status_code == 200, r.text  # served: it was running when the signal came
    assert r.json()["data"][0]["b64_json"]


def test_sigterm_past_the_shutdown_timeout_cancels_and_exits_0(tmp_path_factory, ckpt):
    s = start_server(tmp_path_factory, ckpt.base, "--shutdown-timeout", 1)
    # Long enough to outlast the timeout on any machine: many steps at a large size.
    long = {"prompt": "a red fox", "seed": 1, "response_format": "b64_json", "size": "512x512", "num_inference_steps": 400}
    with ThreadPoolExecutor(3) as pool:
        running = [pool.submit(s.post, "/v1/images/generations", {**long, "seed": i}, timeout=300) for i in range(3)]
        wait_until_busy(s, running=1, queued=2)
        code = s.stop(timeout=120)
        replies = [f.result() for f in running]
    assert code == 0, s.log()
    for r in replies:
        assert r.status_code == 503, (r.status_code, r.text[:300])
        assert "shutting down" in r.json()["error"]["message"], r.text
    log = s.log()
    assert "still running after --shutdown-timeout" in log and "cancelled" in log, log


@pytest.mark.parametrize("delay", [0.0, 0.3])
def test_sigterm_while_starting_exits_0(tmp_path_factory, ckpt, delay):
    import subprocess

    workdir = tmp_path_factory.mktemp("early")
    p = subprocess.Popen([REFIT, "serve", "--model-path", str(ckpt.base), "--port", "0", "--device", "cpu"],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=workdir)
    # Once refit runs its own code (the first log line), a stop signal is handled, however early.
    line = p.stdout.readline()
    assert b"refit serve" in line, line
    time.sleep(delay)
    p.terminate()
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 0, (p.returncode, line + out)
