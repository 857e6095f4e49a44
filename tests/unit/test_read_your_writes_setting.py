"""read_your_writes takes session, tenant or off; tenant scope's write times (router/causal.py)
are shared by the worker processes through one mapped file (README "Read-your-writes")."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from router.causal import SLOTS, WriteTimes, slot_of
from router.config import ReadYourWrites, Settings
from router.workers.shares import WorkerSlot

CLUSTERS = {"main": {"primary": {"host": "10.0.0.1", "port": 5432}, "replicas": [{"host": "10.0.0.2", "port": 5432}]}}


@pytest.mark.parametrize(
    ("value", "workers", "error"),
    [
        ("session", 1, None),
        ("session", 4, None),
        ("off", 4, None),
        ("tenant", 1, None),
        ("tenant", 2, None),
        ("always", 1, "read_your_writes"),
    ],
)
def test_read_your_writes_values(value: str, workers: int, error: str | None) -> None:
    make = lambda: Settings(clusters=CLUSTERS, read_your_writes=value, workers=workers)  # noqa: E731
    if error is None:
        assert make().read_your_writes is ReadYourWrites(value)
    else:
        with pytest.raises(ValidationError, match=error):
            make()


def test_scope_of_a_registry_tenant_is_the_tenant_whatever_name_it_logged_in_with() -> None:
    from types import SimpleNamespace

    from router.causal import scope_of

    acme = SimpleNamespace(tenant_id="acme")
    clients = [
        SimpleNamespace(tenant=acme, database="acme"),
        SimpleNamespace(tenant=acme, database="whatever"),  # user.tenant or the startup option
        SimpleNamespace(tenant=SimpleNamespace(tenant_id="globex"), database="acme"),
        SimpleNamespace(tenant=None, database="acme"),  # a [databases] entry of that name
        SimpleNamespace(tenant=None, database="app"),
    ]
    scopes = [scope_of(client) for client in clients]
    assert scopes[0] == scopes[1]
    assert len(set(scopes)) == 4


def test_write_times_in_one_process() -> None:
    times = WriteTimes()
    slot = slot_of("tenant:acme")
    assert times.last(slot) == 0.0
    times.note(slot, 12.5)
    assert times.last(slot) == 12.5
    assert times.last((slot + 1) % SLOTS) == 0.0


def test_write_times_are_shared_by_workers(tmp_path) -> None:
    """Each worker writes its own row of one mapped file; each reads the latest over all rows,
    including rows of a worker that mapped the file after the write (a restarted one)."""
    slots = [WorkerSlot(index=i, count=3, runtime_dir=tmp_path, listen_port=1, configured_port=1) for i in range(3)]
    first, second = WriteTimes(slots[0]), WriteTimes(slots[1])
    acme, globex = slot_of("tenant:acme"), slot_of("tenant:globex")
    assert acme != globex
    first.note(acme, 10.0)
    second.note(acme, 7.0)  # older, from another process: the latest still wins
    second.note(globex, 3.0)
    late = WriteTimes(slots[2])
    for times in (first, second, late):
        assert (times.last(acme), times.last(globex)) == (10.0, 3.0)
    late.note(acme, 11.0)
    assert first.last(acme) == 11.0


def test_slots_are_the_same_in_every_process() -> None:
    """CRC-32, not hash(): string hashes differ between processes (PYTHONHASHSEED)."""
    import subprocess
    import sys

    code = "from router.causal import slot_of; print(slot_of('tenant:acme'))"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": "12345", "PATH": ""})  # fmt: skip
    assert int(other.stdout) == slot_of("tenant:acme")
