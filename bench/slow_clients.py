#!/usr/bin/env python3
"""Latency of /health and of a small generation while the server is under attack and under load (CPU, tiny model):
N connections trickle their headers or bodies a byte every half second, and M generations are queued.

    python3 bench/slow_clients.py [--refit build/apps/refit] [--tricklers 200] [--generations 50] [--probes 20]

Prints the idle latencies, the latencies under load, and their ratios (the goal: /health and a small generation
answer within a second; a small generation may get 429 from admission control, which is an answer). Record the
numbers in bench/RESULTS.md.
"""
import argparse
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving import refit_server  # noqa: E402


def timed_get(url):
    t0 = time.perf_counter()
    with urllib.request.urlopen(url + "/health", timeout=60) as r:
        r.read()
        assert r.status == 200
    return time.perf_counter() - t0


def timed_generate(url, size="32x32", steps=2, seed=1):
    body = json.dumps({"prompt": "a red fox", "seed": seed, "size": size, "num_inference_steps": steps, "response_format": "b64_json"})
    req = urllib.request.Request(url + "/v1/images/generations", data=body.encode(), headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=600) as r:
            r.read()
            status = r.status
    except urllib.error.HTTPError as e:
        status = e.code
    return time.perf_counter() - t0, status


def trickle(port, stop, i):
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=60)
        if i % 2:
            s.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n{")
        else:
            s.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\n")
        while not stop.wait(0.5):
            s.sendall(b"a")
    except OSError:
        pass  # cut off by the read deadline (408), as it should be


def summary(xs):
    return f"median {statistics.median(xs) * 1000:.1f} ms, max {max(xs) * 1000:.1f} ms"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--refit", default="build/apps/refit")
    ap.add_argument("--tricklers", type=int, default=200)
    ap.add_argument("--generations", type=int, default=50)
    ap.add_argument("--probes", type=int, default=20)
    ap.add_argument("--gen-size", default="256x256", help="size of the queued generations")
    ap.add_argument("--max-queued-requests", type=int, default=16,
                    help="the server's admission limit (a FIFO queue makes a small generation wait behind everything "
                         "admitted before it; beyond the limit it gets an immediate 429)")
    a = ap.parse_args()

    with tempfile.TemporaryDirectory() as work:
        model = Path(work) / "tiny"
        subprocess.run([a.refit, "make-model", "--preset", "flux2-klein-tiny", "--seed", "1", "--out", str(model), "--threads", "1"],
                       check=True, capture_output=True)
        args = ["--model-path", model, "--device", "cpu", "--dtype", "fp32", "--http-read-timeout", "30",
                "--max-queued-requests", a.max_queued_requests]
        with refit_server(a.refit, args, work) as url:
            port = int(url.rsplit(":", 1)[1])
            idle_health = [timed_get(url) for _ in range(a.probes)]
            idle_gen = [timed_generate(url)[0] for _ in range(5)]

            stop = threading.Event()
            threads = [threading.Thread(target=trickle, args=(port, stop, i), daemon=True) for i in range(a.tricklers)]
            for t in threads:
                t.start()
            crowd = ThreadPoolExecutor(a.generations)
            queued = [crowd.submit(timed_generate, url, a.gen_size, 4, 100 + i) for i in range(a.generations)]
            time.sleep(1.0)
            loaded_health = [timed_get(url) for _ in range(a.probes)]
            loaded_gen = [timed_generate(url, seed=7 + i) for i in range(3)]
            stop.set()
            crowd_results = [f.result() for f in queued]
            crowd.shutdown()

    print(f"--max-queued-requests {a.max_queued_requests}, tricklers {a.tricklers}, queued generations {a.generations} ({a.gen_size}, 4 steps; "
          f"{sum(1 for _, s in crowd_results if s == 200)} served, {sum(1 for _, s in crowd_results if s == 429)} got 429)")
    print(f"/health idle:        {summary(idle_health)}")
    print(f"/health under load:  {summary(loaded_health)}  (max / idle median: {max(loaded_health) / statistics.median(idle_health):.1f}x)")
    print(f"small generate idle: {summary(idle_gen)}")
    print(f"small generate under load: " + ", ".join(f"{t * 1000:.0f} ms ({s})" for t, s in loaded_gen))
    worst = max(max(loaded_health), max(t for t, _ in loaded_gen))
    print(f"worst answer under load: {worst:.3f} s (goal: <= 1 s) -> {'met' if worst <= 1.0 else 'NOT met'}")


if __name__ == "__main__":
    main()
