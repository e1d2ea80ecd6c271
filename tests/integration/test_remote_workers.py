"""Workers on other hosts (`refit worker --join`): real `refit serve` and `refit worker` processes on loopback, each
"host" a process with its own port. The worker joins through a TCP relay the test controls, so a network partition
is the relay closing every connection. Checked: joining brings the worker to the served weights (checksums equal the
disk's) before it serves; generation uses both workers and their images are byte-equal; updates include the joined
worker; a worker killed mid-update or cut off mid-update rolls the update back everywhere and its generations go to
the other worker; the process settles its modules, joins again and is given the served weights; a wrong secret or a
server that takes no workers is refused for good."""
import os
import signal
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from harness import MODULES, REFIT, _die_with_parent, start_server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what, predicate, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


class Relay:
    """A TCP relay from a local port to the server's actor port. cut() closes every connection it carries and refuses
    new ones until restore(): to both ends, the network between them failed."""

    def __init__(self, target_port):
        self.target = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.lock = threading.Lock()
        self.open = []
        self.up = True
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            with self.lock:
                if not self.up:
                    client.close()
                    continue
                server = socket.create_connection(("127.0.0.1", self.target))
                self.open += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src, dst):
        try:
            while data := src.recv(1 << 16):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self):
        with self.lock:
            self.up = False
            for s in self.open:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()
            self.open = []

    def restore(self):
        with self.lock:
            self.up = True


class Worker:
    """One `refit worker --join` process (its log: worker-NAME.log)."""

    def __init__(self, port, model, workdir, secret_file, name, *extra):
        self.log_path = workdir / f"worker-{name}.log"
        self._log = open(self.log_path, "wb")
        self.args = [REFIT, "worker", "--join", f"127.0.0.1:{port}", "--model", str(model), "--worker-secret-file",
                     str(secret_file), "--name", name, "--dtype", "fp32", "--retry-interval", "0.3", *map(str, extra)]
        self.proc = subprocess.Popen(self.args, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     preexec_fn=_die_with_parent)

    def log(self):
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def signal(self, sig):
        self.proc.send_signal(sig)

    def kill(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def secret_file(tmp_path_factory):
    f = tmp_path_factory.mktemp("secret") / "worker-secret"
    f.write_text("s3cret-for-the-test-cluster\n")
    f.chmod(0o600)
    return f


@pytest.fixture
def cluster(tmp_path_factory, ckpt, secret_file):
    """A server on base taking workers, and a relay to its actor port."""
    actor_port = free_port()
    server = start_server(tmp_path_factory, ckpt.base, "--actor-port", actor_port, "--worker-secret-file", secret_file)
    relay = Relay(actor_port)
    workers = []
    workdir = tmp_path_factory.mktemp("workers")

    def join(name, model=ckpt.base, *extra, port=None):
        w = Worker(port or relay.port, model, workdir, secret_file, name, *extra)
        workers.append(w)
        return w

    yield server, relay, join
    for w in workers:
        w.kill()
    server.kill()


def statuses(server):
    return {w["worker"]: (w.get("host"), w["status"]) for w in server.info()["workers"]}


def serving(server, name):
    """The index of the serving worker that process `name` joined as, or None."""
    for index, (host, status) in statuses(server).items():
        if host == name and status == "serving":
            return index
    return None


def update_in_background(server, model):
    pool = ThreadPoolExecutor(1)
    return pool.submit(server.post, "/update_weights_from_disk", {"model_path": str(model)})


def test_joined_worker_is_caught_up_serves_and_takes_part_in_updates(cluster, ckpt):
    server, relay, join = cluster
    # The worker starts on other weights; joining gives it what the server serves before any request.
    w = join("hostb", ckpt.seed2)
    index = wait_for("the worker to serve", lambda: serving(server, "hostb"))
    assert "giving it the served weights" in server.log()
    base = ckpt.disk[str(ckpt.base)]
    for worker in (0, index):
        assert server.checksums(list(MODULES), worker=worker) == base
    modules = [(m["worker"], m["name"]) for m in server.info()["modules"]]
    assert sorted(modules) == sorted([(k, m) for k in (0, index) for m in MODULES])

    # Generation goes to both workers, and both compute the same image.
    def gen(_):
        r = server.post("/v1/images/generations", {"prompt": "a red fox", "seed": 5, "size": "32x32", "num_inference_steps": 2})
        assert r.status_code == 200, r.text
        return r.json()
    with ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(gen, range(8)))
    assert {r["worker"] for r in replies} == {0, index}
    assert len({r["data"][0]["b64_json"] for r in replies}) == 1

    # An update is one transaction across both.
    body = server.update(ckpt.seed2)
    assert "on 2 worker(s)" in body["message"], body
    assert {m["worker"] for m in body["modules"]} == {0, index}
    for worker in (0, index):
        assert server.checksums(list(MODULES), worker=worker) == ckpt.disk[str(ckpt.seed2)]
    assert w.proc.poll() is None


def test_worker_killed_mid_update_rolls_back_and_its_generation_moves(cluster, ckpt):
    server, relay, join = cluster
    w = join("victim")
    index = wait_for("the worker to serve", lambda: serving(server, "victim"))
    w.signal(signal.SIGSTOP)  # it stops answering: the update below waits for it in validate
    pending = update_in_background(server, ckpt.seed2)
    with ThreadPoolExecutor(2) as pool:
        gens = [pool.submit(server.post, "/v1/images/generations",
                            {"prompt": "a red fox", "seed": 3, "size": "32x32", "num_inference_steps": 2}) for _ in range(2)]
        time.sleep(1.0)
        assert not pending.done()
        w.kill()
        r = pending.result(timeout=60)
        replies = [g.result(timeout=60) for g in gens]
    assert r.status_code == 400, r.text
    assert "rolled back" in r.json()["message"] and f"worker {index}" in r.json()["message"], r.text
    assert server.checksums(list(MODULES), worker=0) == ckpt.disk[str(ckpt.base)]
    assert statuses(server)[index] == ("victim", "lost")
    # The generations went to the worker that is left (one was taken back from the lost one, or never sent there).
    assert [g.status_code for g in replies] == [200, 200], [g.text for g in replies]
    assert {g.json()["worker"] for g in replies} == {0}
    assert server.update(ckpt.seed2)["success"]


def test_partition_mid_update_rolls_back_then_the_worker_rejoins_with_the_served_weights(cluster, ckpt):
    server, relay, join = cluster
    w = join("partitioned")
    index = wait_for("the worker to serve", lambda: serving(server, "partitioned"))
    w.signal(signal.SIGSTOP)
    pending = update_in_background(server, ckpt.seed2)
    time.sleep(1.0)
    relay.cut()  # the network fails between the two "hosts"; both processes live on
    r = pending.result(timeout=60)
    assert r.status_code == 400 and "rolled back" in r.json()["message"], r.text
    assert server.checksums(list(MODULES), worker=0) == ckpt.disk[str(ckpt.base)]
    assert statuses(server)[index] == ("partitioned", "lost")
    # The network comes back: the worker notices it lost the server, settles its modules and joins again; the server
    # gives it the served weights (base) before it serves.
    relay.restore()
    w.signal(signal.SIGCONT)
    again = wait_for("the worker to serve again", lambda: serving(server, "partitioned"))
    assert again != index
    assert "settling every module" in w.log()
    assert server.checksums(list(MODULES), worker=again) == ckpt.disk[str(ckpt.base)]
    # Now the update goes through on both.
    body = server.update(ckpt.seed2)
    assert "on 2 worker(s)" in body["message"]
    assert server.checksums(list(MODULES), worker=again) == ckpt.disk[str(ckpt.seed2)]


def test_a_worker_that_joins_later_gets_the_weights_of_the_last_update(cluster, ckpt):
    server, relay, join = cluster
    server.update(ckpt.second)  # only the local worker
    join("late")  # loads base; the server serves base with second's transformer
    index = wait_for("the worker to serve", lambda: serving(server, "late"))
    assert server.checksums(list(MODULES), worker=index) == ckpt.disk[str(ckpt.second)]
    png0, v0 = server.generate(seed=9)
    assert v0 == server.info()["weight_version"]


def test_wrong_secret_is_refused_for_good(cluster, ckpt, tmp_path):
    server, relay, join = cluster
    bad = tmp_path / "bad-secret"
    bad.write_text("not-the-cluster-secret\n")
    bad.chmod(0o600)
    w = Worker(relay.port, ckpt.base, tmp_path, bad, "intruder")
    assert w.proc.wait(timeout=120) == 2, w.log()
    assert "wrong worker secret" in w.log()
    assert all(host != "intruder" for host, _ in statuses(server).values())


def test_secret_file_readable_by_others_is_refused(ckpt, tmp_path):
    loose = tmp_path / "loose"
    loose.write_text("s3cret-for-the-test-cluster\n")
    loose.chmod(0o644)
    p = subprocess.run([REFIT, "worker", "--join", "127.0.0.1:1", "--model", str(ckpt.base), "--worker-secret-file", str(loose)],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and "readable by group or others" in p.stderr + p.stdout


def test_a_server_without_a_worker_secret_takes_no_workers(tmp_path_factory, ckpt, secret_file, tmp_path):
    actor_port = free_port()
    server = start_server(tmp_path_factory, ckpt.base, "--actor-port", actor_port)
    try:
        w = Worker(actor_port, ckpt.base, tmp_path, secret_file, "unwelcome")
        assert w.proc.wait(timeout=120) == 2, w.log()
        assert "takes no workers" in w.log()
        assert [x["worker"] for x in server.info()["workers"]] == [0]
    finally:
        server.kill()


def test_updates_a_joined_worker_cannot_take_are_refused_and_change_nothing(cluster, ckpt, tmp_path):
    server, relay, join = cluster
    join("diskonly")
    index = wait_for("the worker to serve", lambda: serving(server, "diskonly"))
    before = [server.checksums(list(MODULES), worker=w) for w in (0, index)]
    r = server.post("/v1/set_lora", {"lora_nickname": "style", "lora_path": str(tmp_path / "adapter")})
    assert r.status_code == 400, r.text
    assert f"cannot include worker {index} on diskonly (joined workers take updates from disk only)" in r.text, r.text
    assert [server.checksums(list(MODULES), worker=w) for w in (0, index)] == before
    assert serving(server, "diskonly") == index


def test_a_server_that_stops_lets_its_workers_join_the_next_one(tmp_path_factory, ckpt, secret_file, tmp_path):
    actor_port = free_port()
    first = start_server(tmp_path_factory, ckpt.base, "--actor-port", actor_port, "--worker-secret-file", secret_file)
    w = Worker(actor_port, ckpt.base, tmp_path, secret_file, "survivor")
    second = None
    try:
        wait_for("the worker to serve", lambda: serving(first, "survivor"))
        assert first.stop() == 0  # SIGTERM with a joined worker connected: exit code 0
        wait_for("the worker to notice", lambda: "the connection to the server was lost" in w.log())
        assert w.proc.poll() is None
        second = start_server(tmp_path_factory, ckpt.seed2, "--actor-port", actor_port, "--worker-secret-file", secret_file)
        index = wait_for("the worker to join the new server", lambda: serving(second, "survivor"))
        assert second.checksums(list(MODULES), worker=index) == ckpt.disk[str(ckpt.seed2)]
    finally:
        w.kill()
        first.kill()
        if second:
            second.kill()
