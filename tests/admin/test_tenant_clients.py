"""What the tenant endpoints do to clients logged in through the router: pause holds their next
transaction until resume; delete lets a running transaction finish, then disconnects them."""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import select
from collections.abc import Iterator

import psycopg
import pytest

from tests.admin.conftest import CLIENT_PASSWORD, AdminAPI, tenant_body, wait_until
from tests.cluster import Cluster


@pytest.fixture
def pool() -> Iterator[concurrent.futures.ThreadPoolExecutor]:
    with concurrent.futures.ThreadPoolExecutor(2) as executor:
        yield executor


def _note_message(messages: list[str], diag: psycopg.errors.Diagnostic) -> None:
    messages.append(diag.message_primary or "")


def _status(admin: AdminAPI, tenant_id: str) -> dict:
    return admin.get(f"/tenants/{tenant_id}/status").json()


def test_pause_holds_transactions_until_resume(
    admin: AdminAPI, cluster: Cluster, pool: concurrent.futures.ThreadPoolExecutor
) -> None:
    admin.post("/tenants", json=tenant_body(cluster, "acme"))
    with psycopg.connect(
        admin.handle.dsn("alice", CLIENT_PASSWORD, "acme"), autocommit=True
    ) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        assert admin.post("/tenants/acme/pause").json()["paused"] is True
        held = pool.submit(lambda: conn.execute("SELECT 2").fetchone())
        wait_until(lambda: _status(admin, "acme")["clients"]["waiting"] == 1, 10, "a waiter")
        assert not held.done()
        assert admin.post("/tenants/acme/resume").status_code == 200
        assert held.result(timeout=10) == (2,)
        assert _status(admin, "acme")["clients"] == {"total": 1, "active": 0, "waiting": 0}


def test_delete_lets_a_transaction_finish_then_disconnects(
    admin: AdminAPI, cluster: Cluster, pool: concurrent.futures.ThreadPoolExecutor
) -> None:
    admin.post("/tenants", json=tenant_body(cluster, "acme"))
    dsn = admin.handle.dsn("alice", CLIENT_PASSWORD, "acme")
    with psycopg.connect(dsn, autocommit=True) as idle, psycopg.connect(dsn) as busy:
        idle.execute("SELECT 1")
        busy.execute("SELECT 1")  # psycopg opened a transaction: it holds a server connection
        assert _status(admin, "acme")["clients"] == {"total": 2, "active": 1, "waiting": 0}

        deleting = pool.submit(lambda: admin.delete("/tenants/acme"))
        # drop() started (it closes the tenant's gate first) but waits for the transaction.
        wait_until(lambda: admin.handle.call(lambda r: "acme" in r.tenants.gates), 10, "drop")
        assert not deleting.done()
        notices: dict[int, list[str]] = {id(idle): [], id(busy): []}
        for conn in (idle, busy):
            conn.add_notice_handler(functools.partial(_note_message, notices[id(conn)]))
        busy.commit()
        assert deleting.result(timeout=10).status_code == 204
        for conn in (idle, busy):
            # Read what the router sent before writing anything: a query written after the
            # router closed the socket may meet a reset that hides the error (libpq then says
            # only "server closed the connection unexpectedly"). libpq hands an error that
            # arrives while idle to the notice handler.
            assert select.select([conn.pgconn.socket], [], [], 10)[0], "nothing from the router"
            with contextlib.suppress(psycopg.OperationalError):  # the close follows the error
                conn.pgconn.consume_input()
            conn.pgconn.is_busy()  # parses what was read: the error goes to the notice handler
            assert notices[id(conn)] == ['tenant "acme" was deleted']
            with pytest.raises(psycopg.OperationalError):
                conn.execute("SELECT 1")
    assert admin.handle.call(lambda r: "acme" not in r.tenants.clients)
