"""The actor port (`refit serve --actor-port`) against hostile peers: a BASP frame announcing a 4 GiB payload, TLS
clients without a certificate or with one from another CA, a server asked to listen off loopback without TLS. The
certificates (a cluster CA, the server's, a client's, and a rogue CA with its own client) are made here with the
openssl command line."""
import os
import socket
import ssl
import struct
import subprocess
import time

import pytest

from harness import REFIT, start_server

CLIENT = os.environ.get("REFIT_REMOTE_CLIENT", "")
needs_client = pytest.mark.skipif(not CLIENT, reason="REFIT_REMOTE_CLIENT is not set (CTest sets it)")

# A BASP header (CAF 0.17): operation, 2 padding bytes, flags, payload_len, operation_data, source and destination
# actor. A client handshake that claims 4 GiB - 1 of payload: CAF alone sizes the read buffer to it.
HUGE_FRAME = struct.pack(">BBBBIQQQ", 0x01, 0, 0, 0, 0xFFFFFFFF, 0, 0, 0)
assert len(HUGE_FRAME) == 32
RSS_GROWTH_LIMIT_KB = 100 * 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def openssl(*args, cwd):
    p = subprocess.run(["openssl", *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, f"openssl {' '.join(map(str, args))}: {p.stderr}"


class Pki:
    """PEM files: ca.pem; server.pem/.key (serverAuth, IP 127.0.0.1); client.pem/.key (clientAuth); rogue-ca.pem and
    rogue.pem/.key (clientAuth, signed by the rogue CA)."""

    def __init__(self, root):
        self.root = root
        self._ca("ca")
        self._ca("rogue-ca")
        self._leaf("server", "ca", "serverAuth", "subjectAltName=IP:127.0.0.1,DNS:localhost\n")
        self._leaf("client", "ca", "clientAuth")
        self._leaf("rogue", "rogue-ca", "clientAuth")

    def __getattr__(self, name):  # pki.ca -> root/ca.pem, pki.client_key -> root/client.key
        stem, _, kind = name.partition("_")
        return self.root / f"{stem.replace('rogueca', 'rogue-ca')}.{'key' if kind == 'key' else 'pem'}"

    def _key(self, name):
        openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", f"{name}.key", cwd=self.root)
        os.chmod(self.root / f"{name}.key", 0o600)

    def _ca(self, name):
        self._key(name)
        openssl("req", "-x509", "-new", "-key", f"{name}.key", "-out", f"{name}.pem", "-days", "2", "-subj", f"/CN=refit test {name}",
                "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=self.root)

    def _leaf(self, name, ca, usage, extra=""):
        self._key(name)
        openssl("req", "-new", "-key", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN=refit test {name}", cwd=self.root)
        (self.root / f"{name}.ext").write_text(
            f"basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage={usage}\n{extra}")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial", "-out",
                f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=self.root)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def plain_server(tmp_path_factory, ckpt):
    port = free_port()
    server = start_server(tmp_path_factory, ckpt.base, "--actor-port", port)
    server.actor_port = port
    yield server
    server.kill()


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory, ckpt, pki):
    """Off loopback (0.0.0.0), which TLS allows; the tests reach it on 127.0.0.1."""
    port = free_port()
    server = start_server(tmp_path_factory, ckpt.base, "--actor-port", port, "--actor-host", "0.0.0.0",
                          "--actor-tls-cert", pki.server, "--actor-tls-key", pki.server_key, "--actor-tls-ca", pki.ca)
    server.actor_port = port
    yield server
    server.kill()


def wait_for_log(server, needle, count=1) -> str:
    """The server's log once it holds `needle` at least `count` times: a peer can see its connection close before the
    server has logged why."""
    deadline = time.monotonic() + 60
    while server.log().count(needle) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    log = server.log()
    assert log.count(needle) >= count, f"expected {count} x {needle!r} in the server log:\n{log}"
    return log


def rss_kb(server) -> int:
    for line in open(f"/proc/{server.proc.pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS in /proc/PID/status")


def read_until_closed(sock, limit=1 << 20) -> bytes:
    """Everything the server sends until it closes the connection (a TLS alert counts as closing)."""
    sock.settimeout(60)  # only a bound for a broken server: the assertions are on what arrives
    data = b""
    while len(data) < limit:
        try:
            chunk = sock.recv(65536)
        except (ssl.SSLError, ConnectionResetError):
            return data
        except socket.timeout:
            raise AssertionError(f"the server kept the connection open (received {len(data)} bytes)")
        if not chunk:
            return data
        data += chunk
    raise AssertionError("the server kept sending")


def tls_context(pki, cert=None, key=None):
    ctx = ssl.create_default_context(cafile=str(pki.ca))
    if cert:
        ctx.load_cert_chain(str(cert), str(key))
    return ctx


def tls_connect(server, ctx):
    raw = socket.create_connection(("127.0.0.1", server.actor_port), timeout=60)
    return ctx.wrap_socket(raw, server_hostname="127.0.0.1")


def listening_addresses(port):
    """Local addresses (hex, as /proc/net/tcp* writes them) of sockets listening on `port`."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            next(f)
            for line in f:
                fields = line.split()
                addr, hex_port = fields[1].split(":")
                if fields[3] == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                    found.append(addr)
    return found


# --- (a) a frame that announces 4 GiB

def test_a_frame_announcing_4_gib_closes_its_connections_on_the_plain_loopback_port(plain_server):
    before = rss_kb(plain_server)
    conns = [socket.create_connection(("127.0.0.1", plain_server.actor_port), timeout=60) for _ in range(4)]
    try:
        for c in conns:
            c.sendall(HUGE_FRAME)
        for c in conns:
            received = read_until_closed(c)
            assert received[:1] == b"\x00", received[:32]  # BASP's server handshake came first, then the close
    finally:
        for c in conns:
            c.close()
    growth = rss_kb(plain_server) - before
    assert growth < RSS_GROWTH_LIMIT_KB, f"RSS grew by {growth} kB"
    assert plain_server.get("/health").status_code == 200
    refused = "announced a 4294967295-byte message (over the 16777216-byte limit of one message); connection closed"
    assert wait_for_log(plain_server, refused, 4).count(refused) == 4


def test_a_frame_announcing_4_gib_never_reaches_basp_on_the_tls_port(tls_server, pki):
    before = rss_kb(tls_server)
    # Not TLS at all: the handshake fails on the first bytes.
    with socket.create_connection(("127.0.0.1", tls_server.actor_port), timeout=60) as raw:
        raw.sendall(HUGE_FRAME)
        assert read_until_closed(raw)[:1] != b"\x00"  # at most a TLS alert, never BASP's handshake
    # An authenticated peer reaches BASP, and the frame's size is refused there.
    with tls_connect(tls_server, tls_context(pki, pki.client, pki.client_key)) as tls:
        tls.sendall(HUGE_FRAME)
        received = read_until_closed(tls)
        assert received[:1] == b"\x00", received[:32]
    growth = rss_kb(tls_server) - before
    assert growth < RSS_GROWTH_LIMIT_KB, f"RSS grew by {growth} kB"
    assert tls_server.get("/health").status_code == 200
    log = wait_for_log(tls_server, "announced a 4294967295-byte message (over the 16777216-byte limit of one message); connection closed")
    assert "TLS with 127.0.0.1:" in log and "failed before any message" in log, log


# --- (b) peers without the cluster's certificate

@pytest.mark.parametrize("who", ["no certificate", "rogue CA"])
def test_a_tls_peer_without_a_certificate_of_the_cluster_ca_gets_no_byte_of_basp(tls_server, pki, who):
    cert = {"no certificate": (None, None), "rogue CA": (pki.rogue, pki.rogue_key)}[who]
    reason = {"no certificate": "peer did not return a certificate", "rogue CA": "certificate verify failed"}[who]
    refusals = tls_server.log().count(reason)
    try:
        with tls_connect(tls_server, tls_context(pki, *cert)) as tls:
            # TLS 1.3 finishes the client's side before the server checked the certificate; the server's verdict
            # comes as an alert instead of BASP's server handshake.
            tls.sendall(HUGE_FRAME)
            assert read_until_closed(tls) == b""
    except (ssl.SSLError, ConnectionResetError):
        pass  # refused within the handshake
    assert tls_server.get("/health").status_code == 200
    wait_for_log(tls_server, reason, refusals + 1)


@needs_client
def test_a_remote_client_with_a_rogue_certificate_cannot_update(tls_server, pki, ckpt, tmp_path):
    # It trusts both CAs, so it accepts the server; the server is the one that refuses it.
    both = tmp_path / "both-cas.pem"
    both.write_text(pki.rogueca.read_text() + pki.ca.read_text())
    before, version = tls_server.checksums(), tls_server.info()["weight_version"]
    refusals = tls_server.log().count("certificate verify failed")
    p = subprocess.run([CLIENT, "127.0.0.1", str(tls_server.actor_port), "--model-path", str(ckpt.second), "--weight-version", "rogue",
                        "--size", "32x32", "--steps", "2", "--connect-timeout", "3",
                        "--tls-cert", pki.rogue, "--tls-key", pki.rogue_key, "--tls-ca", both],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 1, p.stdout + p.stderr
    assert "cannot reach the client API" in p.stderr, p.stderr
    assert "updating to" not in p.stdout, p.stdout
    assert tls_server.checksums() == before
    assert tls_server.info()["weight_version"] == version
    wait_for_log(tls_server, "certificate verify failed", refusals + 1)  # the server refused the client


# --- (c) the remote client with its own certificate

@needs_client
def test_the_remote_client_with_its_certificate_refits_over_mutual_tls(tls_server, pki, ckpt, tmp_path):
    out = tmp_path / "after.png"
    p = subprocess.run([CLIENT, "127.0.0.1", str(tls_server.actor_port), "--model-path", str(ckpt.second), "--weight-version", "tls-1",
                        "--size", "32x32", "--steps", "2", "--out", str(out),
                        "--tls-cert", pki.client, "--tls-key", pki.client_key, "--tls-ca", pki.ca],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "over mutual TLS" in p.stdout, p.stdout
    assert "weight_version tls-1" in p.stdout, p.stdout
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert tls_server.info()["weight_version"] == "tls-1"
    assert tls_server.checksums() == ckpt.disk[str(ckpt.second)]


@needs_client
def test_a_client_that_trusts_another_ca_refuses_the_server(tls_server, pki, ckpt):
    version = tls_server.info()["weight_version"]
    p = subprocess.run([CLIENT, "127.0.0.1", str(tls_server.actor_port), "--model-path", str(ckpt.base), "--connect-timeout", "3",
                        "--tls-cert", pki.rogue, "--tls-key", pki.rogue_key, "--tls-ca", pki.rogueca],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 1, p.stdout + p.stderr
    assert tls_server.info()["weight_version"] == version


# --- (d) off loopback only with TLS; bad credentials stop the server before it loads

@pytest.mark.parametrize("extra, expected", [
    (["--actor-host", "0.0.0.0"],
     "--actor-host 0.0.0.0 is not a loopback address: the actor port accepts weight updates, so off loopback it requires mutual TLS; "
     "give --actor-tls-cert, --actor-tls-key and --actor-tls-ca"),
    (["--actor-tls-cert", "{server}"], "mutual TLS on the actor port needs all of --actor-tls-cert, --actor-tls-key and --actor-tls-ca"),
    (["--actor-tls-cert", "{rogue}", "--actor-tls-key", "{rogue_key}", "--actor-tls-ca", "{ca}"], "does not verify against --actor-tls-ca"),
    (["--actor-tls-cert", "{server}", "--actor-tls-key", "{client_key}", "--actor-tls-ca", "{ca}"],
     "client.key: not a readable, unencrypted PEM private key of --actor-tls-cert"),
])
def test_the_server_refuses_to_start_with_an_unprotected_or_broken_actor_port(ckpt, pki, extra, expected):
    files = {"server": pki.server, "rogue": pki.rogue, "rogue_key": pki.rogue_key, "ca": pki.ca, "client_key": pki.client_key}
    args = [REFIT, "serve", "--model-path", str(ckpt.base), "--port", "0", "--device", "cpu", "--actor-port", "0",
            *[a.format(**files) for a in extra]]
    p = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert p.returncode != 0
    assert expected in p.stdout + p.stderr, p.stdout + p.stderr
    assert "loading" not in p.stdout + p.stderr  # refused before the model was read


# --- (e) loopback by default

def test_the_actor_port_listens_on_loopback_only_by_default(plain_server, tls_server):
    assert listening_addresses(plain_server.actor_port) == ["0100007F"]  # 127.0.0.1
    assert listening_addresses(tls_server.actor_port) == ["00000000"]  # --actor-host 0.0.0.0
    assert f"actor port 127.0.0.1:{plain_server.actor_port} (client API only; plain TCP, loopback only" in plain_server.log()
    assert f"actor port 0.0.0.0:{tls_server.actor_port} (client API only; mutual TLS" in tls_server.log()


# --- only the client API

PROBE = os.environ.get("REFIT_ACTOR_PROBE", "")


@pytest.mark.skipif(not PROBE, reason="REFIT_ACTOR_PROBE is not set (CTest sets it)")
@pytest.mark.parametrize("mode", ["plain", "tls"])
def test_pause_resume_and_fault_injection_are_not_reachable_over_the_actor_port(plain_server, tls_server, pki, ckpt, mode):
    server = {"plain": plain_server, "tls": tls_server}[mode]
    tls = ["--tls-cert", pki.client, "--tls-key", pki.client_key, "--tls-ca", pki.ca] if mode == "tls" else []
    p = subprocess.run([PROBE, "127.0.0.1", str(server.actor_port), *map(str, tls)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    lines = p.stdout.splitlines()
    assert lines[0].startswith("info: answered (weight_version "), p.stdout  # the connection carries the client API
    verdicts = dict(line.split(": ", 1) for line in lines)
    for name in ("pause", "resume", "fault"):
        assert verdicts[name].startswith("refused (") and "unexpected_message" in verdicts[name], p.stdout
    # Not paused: generation still runs, and no fault armed for the transformer breaks an update that changes it.
    assert server.generate(seed=5)[0][:8] == b"\x89PNG\r\n\x1a\n"
    target = ckpt.second if server.checksums() == ckpt.disk[str(ckpt.base)] else ckpt.base
    assert server.update(target)["success"]
    assert server.checksums() == ckpt.disk[str(target)]
