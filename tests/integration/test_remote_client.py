"""The CAF client API on the actor port (`refit serve --actor-port`), with the example C++ client
(examples/remote_client.cpp): it waits for a server that is still starting, refits it through the published client
gateway, and sees the new checksums and weight_version."""
import os
import socket
import subprocess
import time

import pytest

from harness import start_server

CLIENT = os.environ.get("REFIT_REMOTE_CLIENT", "")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not CLIENT, reason="REFIT_REMOTE_CLIENT is not set (CTest sets it)")
def test_the_client_waits_for_a_starting_server_and_refits_it_over_the_actor_port(tmp_path_factory, ckpt):
    port = free_port()
    out = tmp_path_factory.mktemp("remote") / "after.png"
    # The client starts first: the server is not listening yet.
    client = subprocess.Popen([CLIENT, "127.0.0.1", str(port), "--model-path", str(ckpt.second), "--size", "32x32", "--steps", "2",
                               "--out", str(out), "--connect-timeout", "120", "--weight-version", "remote-1"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(1.0)
    server = start_server(tmp_path_factory, ckpt.base, "--actor-port", port)
    try:
        text, _ = client.communicate(timeout=300)
        assert client.returncode == 0, text
        assert "not reachable yet" in text, text  # it did wait for the server
        assert "weight_version remote-1" in text, text
        assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert server.info()["weight_version"] == "remote-1"
        assert server.checksums() == ckpt.disk[str(ckpt.second)]
        assert "client API only" in server.log()
    finally:
        client.kill()
        server.kill()
