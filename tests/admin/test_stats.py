"""SHOW STATS and its family on the admin console, GET /stats and the pgrouter_database_*
counters: what PgBouncer users read to see each database's traffic, from one set of counters
(router/stats/traffic.py) fed by the data path."""

from __future__ import annotations

import struct
import threading
import time
from collections.abc import Callable

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from router.protocol.framing import frame
from tests.admin.conftest import AdminAPI, wait_until
from tests.rawclient import RawClient

TOTAL_COLUMNS = ["total_xact_count", "total_query_count", "total_received", "total_sent", "total_xact_time",
                 "total_query_time", "total_wait_time"]  # fmt: skip
AVERAGE_COLUMNS = ["avg_xact_count", "avg_query_count", "avg_recv", "avg_sent", "avg_xact_time", "avg_query_time",
                   "avg_wait_time"]  # fmt: skip


def _query(sql: str) -> bytes:
    return frame(b"Q", sql.encode() + b"\0")


def _extended_select(value: int) -> bytes:
    """An unnamed Parse/Bind/Execute/Sync of SELECT $1::int, as a driver sends it."""
    parse = frame(b"P", b"\0SELECT $1::int\0" + struct.pack("!h", 0))
    param = str(value).encode()
    bind = frame(b"B", b"\0\0" + struct.pack("!hhi", 0, 1, len(param)) + param + struct.pack("!h", 0))
    return parse + bind + frame(b"E", b"\0" + struct.pack("!i", 0)) + frame(b"S", b"")


def _exchange(client: RawClient, request: bytes) -> int:
    """Send ``request``; the bytes of every reply message up to its last ReadyForQuery."""
    client.send(request)
    owed = request.count(b"S\0\0\0\x04") + sum(1 for _ in _queries(request))
    got = 0
    while owed:
        for kind, body in client.recv_until(b"Z"):
            assert kind != b"E", body
            got += 5 + len(body)
        owed -= 1
    return got


def _queries(request: bytes):
    pos = 0
    while pos < len(request):
        length = struct.unpack_from("!i", request, pos + 1)[0]
        if request[pos : pos + 1] == b"Q":
            yield pos
        pos += 1 + length


def _console(admin: AdminAPI) -> psycopg.Connection:
    return psycopg.connect(admin.handle.dsn("alice", "alice-pw", "pgrouter"), autocommit=True)


def _table(console: psycopg.Connection, command: str) -> dict[str, dict[str, str]]:
    """A console SHOW's rows by their first column, as column -> text."""
    cur = console.execute(command)
    names = [d.name for d in cur.description]
    return {row[0]: dict(zip(names, row, strict=True)) for row in cur.fetchall()}


def _metric(admin: AdminAPI, name: str, database: str | None) -> float:
    for family in text_string_to_metric_families(admin.get("/metrics").text):
        for sample in family.samples:
            if sample.name == name and sample.labels.get("database") == database:
                return sample.value
    raise AssertionError(f"no sample {name}{{database={database!r}}}")


def test_stats_count_transactions_queries_and_bytes(start_admin: Callable[..., AdminAPI]) -> None:
    """Seven transactions of nine queries, with the simple and the extended protocol, two of
    them pipelined: the console, GET /stats and /metrics count them, and the bytes each way,
    exactly (the router's own replies, the login's among them, are not a database's traffic)."""
    admin = start_admin(redis_url=None, secret_key=None, admin_console_users=["alice"])
    client = RawClient(admin.handle.port)
    client.login_trust("carol")
    received = sent = 0
    for request in (
        _query("SELECT 1"), _query("SELECT 2"), _query("SELECT 3"),  # 3 transactions
        _extended_select(4),  # 1 transaction of 1 query (one Sync)
        _query("BEGIN"), _query("SELECT 5"), _query("COMMIT"),  # 1 transaction of 3 queries
        _query("SELECT 6") + _query("SELECT 7"),  # pipelined: 2 transactions
    ):  # fmt: skip
        received += len(request)
        sent += _exchange(client, request)

    console = _console(admin)
    row = _table(console, "SHOW STATS_TOTALS")["app"]
    assert list(row) == ["database", *TOTAL_COLUMNS]
    assert (row["total_xact_count"], row["total_query_count"]) == ("7", "9")
    assert (row["total_received"], row["total_sent"]) == (str(received), str(sent))
    assert int(row["total_query_time"]) > 0 and int(row["total_xact_time"]) >= int(row["total_query_time"])
    # Nobody waited: the login opened the connection (its own wait for it is no transaction's).
    assert row["total_wait_time"] == "0"

    body = admin.get("/stats").json()
    assert body["stats_period"] == 60 and body["workers_reporting"] == 1
    app = next(db for db in body["databases"] if db["database"] == "app")
    assert {k: app[k] for k in TOTAL_COLUMNS} == {k: int(v) for k, v in row.items() if k in TOTAL_COLUMNS}
    assert _metric(admin, "pgrouter_database_transactions_total", "app") == 7
    assert _metric(admin, "pgrouter_database_queries_total", "app") == 9
    assert _metric(admin, "pgrouter_transaction_duration_seconds_count", None) == 7  # (no label)
    assert _metric(admin, "pgrouter_database_received_bytes_total", "app") == received
    assert _metric(admin, "pgrouter_database_sent_bytes_total", "app") == sent

    totals = _table(console, "SHOW TOTALS")
    assert totals["total_xact_count"]["value"] == "7" and totals["total_sent"]["value"] == str(sent)
    lists = _table(console, "SHOW LISTS")
    assert {item: int(r["items"]) for item, r in lists.items()} == {
        "databases": 1, "users": len(admin.router.settings.users), "pools": 1,
        "used_clients": 1, "login_clients": 0, "console_clients": 1, "used_servers": 1,
    }  # fmt: skip   (carol, this console, the pool's one server connection)
    client.close()
    console.close()


def test_stats_time_waits_and_average_over_the_period(start_admin: Callable[..., AdminAPI]) -> None:
    """A transaction held open while another client waits for the only server connection: the
    wait and the held transaction's time are counted; the averages of a period (1 s here)
    show the traffic, and drop to 0 in a period without any."""
    admin = start_admin(redis_url=None, secret_key=None, admin_console_users=["alice"], pool_size=1, stats_period=1)
    pool = next(iter(admin.get("/pools").json()["pools"]))
    holder = psycopg.connect(admin.handle.dsn("carol"), autocommit=True)
    waiter = psycopg.connect(admin.handle.dsn("carol"), autocommit=True)
    started = time.monotonic()
    holder.execute("BEGIN")
    holder.execute("SELECT 1")
    waited = threading.Thread(target=lambda: waiter.execute("SELECT 2"))
    waited.start()
    wait_until(lambda: admin.get("/pools").json()["pools"][pool]["waiting"] == 1, 10, "the second client waits")
    time.sleep(0.3)  # not a synchronisation: the length of the wait being measured
    holder.execute("COMMIT")
    waited.join(10)
    elapsed = time.monotonic() - started

    console = _console(admin)
    row = _table(console, "SHOW STATS")["app"]
    assert list(row) == ["database", *TOTAL_COLUMNS, *AVERAGE_COLUMNS]
    assert (row["total_xact_count"], row["total_query_count"]) == ("2", "4")
    assert 0.3e6 <= int(row["total_wait_time"]) <= elapsed * 1e6
    assert 0.3e6 <= int(row["total_xact_time"]) <= elapsed * 1e6  # the holder's, mostly

    def averages() -> dict[str, int]:
        app = next(db for db in admin.get("/stats").json()["databases"] if db["database"] == "app")
        return {k: app[k] for k in AVERAGE_COLUMNS}

    wait_until(lambda: averages()["avg_wait_time"] > 0, 10, "a period with the wait closes")
    assert averages()["avg_wait_time"] <= int(row["total_wait_time"])  # µs per second of a period >= 1 s
    wait_until(lambda: averages() == dict.fromkeys(AVERAGE_COLUMNS, 0), 10, "a period without traffic closes")
    stats = _table(console, "SHOW STATS_AVERAGES")["app"]
    assert stats == {"database": "app", **dict.fromkeys(AVERAGE_COLUMNS, "0")}
    for conn in (holder, waiter, console):
        conn.close()


def test_stats_rows_are_the_databases_clients_name(start_admin: Callable[..., AdminAPI]) -> None:
    """Two [databases] entries of one real database, sharing its pool, each have a row of
    their own, as in PgBouncer; a "*" entry has one per name asked for that the server has
    (a login the server refuses makes none)."""
    databases = {
        "app": {"cluster": "main", "server_user": "postgres"},
        "alias": {"cluster": "main", "dbname": "app", "server_user": "postgres"},
        "*": {"cluster": "main", "server_user": "postgres"},
    }
    admin = start_admin(redis_url=None, secret_key=None, admin_console_users=["alice"], databases=databases)
    for name, transactions in (("app", 1), ("alias", 2), ("postgres", 3)):
        with psycopg.connect(admin.handle.dsn("carol", dbname=name), autocommit=True) as conn:
            for i in range(transactions):
                conn.execute("SELECT %s::int", (i,))
    with pytest.raises(psycopg.OperationalError, match='database "nosuch" does not exist'):
        psycopg.connect(admin.handle.dsn("carol", dbname="nosuch"))
    pools = admin.get("/pools").json()["pools"]
    assert sum(name.startswith("app/") for name in pools) == 1  # one pool for app and alias
    console = _console(admin)
    rows = _table(console, "SHOW STATS_TOTALS")
    assert {name: int(row["total_xact_count"]) for name, row in rows.items()} == {"app": 1, "alias": 2, "postgres": 3}
    assert _metric(admin, "pgrouter_database_transactions_total", "alias") == 2
    console.close()
