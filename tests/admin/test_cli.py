"""`pgrouter tenants ...` as a user runs it (a subprocess) against a live admin API."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from router.admin.views import MASK
from tests.admin.conftest import ADMIN_TOKEN, CLIENT_PASSWORD, AdminAPI
from tests.cluster import Cluster

ROOT = Path(__file__).resolve().parents[2]


def pgrouter(
    admin: AdminAPI, *args: str, token: str | None = ADMIN_TOKEN
) -> subprocess.CompletedProcess[str]:
    """Run the command with --url of ``admin``; the token through the environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGROUTER_")}
    if token is not None:
        env["PGROUTER_ADMIN_TOKEN"] = token
    return subprocess.run(
        [sys.executable, "-m", "router", "tenants", *args, "--url", admin.url],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=60,
    )  # fmt: skip


def test_tenants_commands(admin: AdminAPI, cluster: Cluster) -> None:
    primary = f"{cluster.primary.host}:{cluster.primary.port}"
    replica = f"{cluster.replicas[0].host}:{cluster.replicas[0].port}"
    added = pgrouter(
        admin, "add", "--id", "acme", "--database", "app", "--server-user", "pgr_scram",
        "--server-password", "scram-pw", "--primary", primary, "--replica", replica,
        "--user", f"alice:{CLIENT_PASSWORD}", "--user", "bob:pw:with:colons",
    )  # fmt: skip
    assert added.returncode == 0, added.stderr
    assert added.stdout == "created tenant acme (version 1)\n"
    shared = pgrouter(
        admin, "add", "--id", "beta", "--database", "app", "--server-user", "pgr_scram",
        "--primary", primary, "--mode", "shared",
        "--tenant-key", "7f0c1b1e-9a55-4c1e-8d7e-2f4a6f3c9b10", "--json",
    )  # fmt: skip
    assert shared.returncode == 0, shared.stderr
    record = json.loads(shared.stdout)
    assert record["mode"] == "shared" and record["tenant_key"].startswith("7f0c1b1e")

    stored = admin.get("/tenants/acme").json()
    assert [u["name"] for u in stored["users"]] == ["alice", "bob"]
    assert stored["cluster"]["replicas"] == [
        {"host": cluster.replicas[0].host, "port": cluster.replicas[0].port, "weight": 1.0}
    ]

    listed = pgrouter(admin, "list")
    assert listed.returncode == 0, listed.stderr
    header, *rows = listed.stdout.splitlines()
    assert header.split() == [
        "ID",
        "MODE",
        "DATABASE",
        "PRIMARY",
        "REPLICAS",
        "USERS",
        "PAUSED",
        "VERSION",
    ]
    assert [row.split() for row in rows] == [
        ["acme", "database", "app", primary, replica, "alice,bob", "no", "1"],
        ["beta", "shared", "app", primary, "-", "-", "no", "1"],
    ]
    as_json = json.loads(pgrouter(admin, "list", "--json").stdout)
    assert [t["tenant_id"] for t in as_json] == ["acme", "beta"]
    assert as_json[0]["server_password"] == MASK

    paused = pgrouter(admin, "pause", "acme")
    assert (paused.returncode, paused.stdout) == (0, "paused tenant acme (version 2)\n")
    show = pgrouter(admin, "show", "acme")
    assert show.returncode == 0, show.stderr
    fields = dict(line.split(None, 1) for line in show.stdout.splitlines() if "  " in line)
    assert fields["tenant"].strip() == "acme" and fields["paused"].strip() == "yes"
    assert "scram-pw" not in show.stdout and CLIENT_PASSWORD not in show.stdout
    resumed = pgrouter(admin, "resume", "acme", "--json")
    assert json.loads(resumed.stdout)["paused"] is False

    removed = pgrouter(admin, "rm", "acme")
    assert (removed.returncode, removed.stdout) == (0, "deleted tenant acme\n")
    gone = pgrouter(admin, "show", "acme")
    assert gone.returncode == 1
    assert gone.stderr == 'pgrouter tenants show: 404 Not Found: tenant "acme" does not exist\n'


def test_tenants_command_errors(admin: AdminAPI, cluster: Cluster) -> None:
    wrong = pgrouter(admin, "list", token="wrong")
    assert wrong.returncode == 1 and "401 Unauthorized: wrong bearer token" in wrong.stderr
    explicit = subprocess.run(
        [sys.executable, "-m", "router", "tenants", "list", "--url", admin.url, "--token", ADMIN_TOKEN],
        capture_output=True, text=True, cwd=ROOT, timeout=60,
        env={k: v for k, v in os.environ.items() if not k.startswith("PGROUTER_")},
    )  # fmt: skip
    assert explicit.returncode == 0, explicit.stderr
    invalid = pgrouter(
        admin, "add", "--id", "Bad Id", "--database", "app", "--server-user", "u",
        "--primary", "127.0.0.1:5432",
    )  # fmt: skip
    assert invalid.returncode == 1
    assert "422 Unprocessable" in invalid.stderr and "body.tenant_id" in invalid.stderr
    malformed = pgrouter(
        admin, "add", "--id", "x", "--database", "app", "--server-user", "u", "--primary", "nohost"
    )
    assert malformed.returncode == 2 and "'nohost' is not host:port" in malformed.stderr
    unreachable = subprocess.run(
        [sys.executable, "-m", "router", "tenants", "list", "--url", "http://127.0.0.1:1"],
        capture_output=True, text=True, cwd=ROOT, timeout=60,
    )  # fmt: skip
    assert unreachable.returncode == 1 and "cannot reach the admin API" in unreachable.stderr
