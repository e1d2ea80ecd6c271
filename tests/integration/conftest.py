"""Fixtures of the HTTP integration suite (helpers and the checkpoint layout: harness.py)."""
import json
import shutil

import pytest

from harness import (MODULES, REFIT, Checkpoints, Server, perturb_first_shard, replace_module, run_parallel,
                     start_server, truncate_first_shard)


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory) -> Checkpoints:
    c = Checkpoints(tmp_path_factory.mktemp("ckpt"))
    for d in (c.allowed, c.extra, c.outside):
        d.mkdir()
    run_parallel([[REFIT, "make-model", "--preset", "flux2-klein-tiny", "--seed", s, "--out", d, "--threads", 1]
                  for s, d in ((1, c.base), (2, c.seed2))])
    shutil.copytree(c.base, c.second)
    replace_module(c.second, c.seed2, "transformer")
    shutil.copytree(c.base, c.perturbed)
    perturb_first_shard(c.perturbed / "vae")
    shutil.copytree(c.base, c.corrupted)
    replace_module(c.corrupted, c.seed2, "transformer")
    truncate_first_shard(c.corrupted / "vae")

    valid = [c.base, c.second, c.perturbed, c.seed2]
    outs = run_parallel([[REFIT, "checksum", d, "--dtype", "fp32", "--json"] for d in valid])
    for d, out in zip(valid, outs):
        c.disk[str(d)] = json.loads(out)
        assert set(c.disk[str(d)]) == set(MODULES), c.disk[str(d)]

    # The fixtures differ where the tests rely on it, and only there.
    b, s, p, s2 = (c.disk[str(d)] for d in valid)
    assert s["transformer"] != b["transformer"] and s["vae"] == b["vae"] and s["text_encoder"] == b["text_encoder"]
    assert p["vae"] != b["vae"] and p["transformer"] == b["transformer"] and p["text_encoder"] == b["text_encoder"]
    assert all(s2[m] != b[m] for m in MODULES)
    return c


@pytest.fixture(scope="session")
def server(tmp_path_factory, ckpt):
    """The main server on base. Tests that depend on its weights reset it to base first."""
    s = start_server(tmp_path_factory, ckpt.base, "--max-request-bytes", 1 << 20)
    yield s
    s.kill()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Appends the tail of each server's log (stdout and stderr) to a failing test's report."""
    outcome = yield
    rep = outcome.get_result()
    if rep.failed:
        for name, value in getattr(item, "funcargs", {}).items():
            if isinstance(value, Server):
                rep.sections.append((f"refit serve log of fixture '{name}' (tail)", value.log()[-6000:]))
