"""pgbench, unmodified, through the router in transaction mode: 8 clients on a pool of 4, the
simple and extended query protocols, the select-only and the default TPC-B scripts against the
pgbench tables (scale 1) the cluster creates in `app`.

`-M prepared` (named statements that outlive the transaction) is tested with 32 clients on a
pool of 4 in tests/integration/test_prepared.py.
"""

from __future__ import annotations

import re
import subprocess

import pytest

from tests.clients.conftest import assert_pool_idle, client_env

DURATION = 5  # seconds per run (-T)
CLIENTS, THREADS = 8, 2


def pgbench(router, *args: str) -> subprocess.CompletedProcess:
    """pgbench as bob (md5) with the DSN as its database argument."""
    return subprocess.run(
        ["pgbench", "-c", str(CLIENTS), "-j", str(THREADS), "-T", str(DURATION), *args,
         router.dsn("bob")],
        capture_output=True,
        text=True,
        env=client_env(PGPASSWORD="bob-pw"),
        timeout=DURATION + 60,
    )


def summary(output: str, label: str) -> int:
    match = re.search(rf"^{re.escape(label)}: (\d+)", output, re.MULTILINE)
    assert match, f"no {label!r} line in pgbench output:\n{output}"
    return int(match.group(1))


@pytest.mark.parametrize("protocol", ["simple", "extended"])
def test_select_only(router, protocol):
    proc = pgbench(router, "-S", "-M", protocol)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert f"query mode: {protocol}" in proc.stdout
    assert summary(proc.stdout, "number of failed transactions") == 0
    assert summary(proc.stdout, "number of transactions actually processed") > 100
    assert "error" not in proc.stderr.lower(), proc.stderr
    assert_pool_idle(router)


@pytest.mark.parametrize("protocol", ["simple", "extended"])
def test_tpcb(router, primary, protocol):
    proc = pgbench(router, "-M", protocol)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert "TPC-B (sort of)" in proc.stdout
    assert summary(proc.stdout, "number of failed transactions") == 0
    processed = summary(proc.stdout, "number of transactions actually processed")
    assert processed > 100
    assert "error" not in proc.stderr.lower(), proc.stderr
    # pgbench truncates pgbench_history before the run (its vacuum step) and every TPC-B
    # transaction inserts one row: each reported transaction really committed on the primary.
    assert primary.execute("SELECT count(*) FROM pgbench_history").fetchone() == (processed,)
    assert_pool_idle(router)
