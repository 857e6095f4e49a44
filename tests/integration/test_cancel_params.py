"""Router-issued BackendKeyData, CancelRequest forwarding, and real ParameterStatus values."""

from __future__ import annotations

import os
import select
import signal
import socket
import threading
import time

import psycopg
from psycopg import errors

from router.protocol import messages as m
from router.protocol.startup import build_cancel_request
from tests.rawclient import RawClient

REPORTED = [
    "server_version",
    "server_encoding",
    "client_encoding",
    "DateStyle",
    "TimeZone",
    "integer_datetimes",
    "standard_conforming_strings",
    "IntervalStyle",
    "is_superuser",
]


def test_parameter_status_values_are_the_servers_own(router, cluster):
    with psycopg.connect(cluster.primary.dsn("app")) as direct, psycopg.connect(router.dsn("carol")) as routed:
        for name in REPORTED:
            assert routed.info.parameter_status(name) == direct.info.parameter_status(name), name


def test_each_client_sees_its_own_application_name(router, cluster):
    """The ParameterStatus set is built once per pool; application_name is each client's own,
    as a dedicated server would echo it. A client that sent none sees what its session has."""
    for name in ("alpha", "beta"):
        with psycopg.connect(cluster.primary.dsn("app"), application_name=name) as direct, psycopg.connect(
            router.dsn("carol"), application_name=name
        ) as routed:
            seen = routed.info.parameter_status("application_name")
            assert seen == direct.info.parameter_status("application_name") == name
    with psycopg.connect(router.dsn("carol"), autocommit=True) as routed:
        shown = routed.execute("SHOW application_name").fetchone()[0]
        assert routed.info.parameter_status("application_name") == shown


def test_each_client_gets_its_own_backend_key(router):
    keys = set()
    for _ in range(5):
        client = RawClient(router.port)
        replies = client.login_trust()
        keys.add(next(m.parse_backend_key_data(body) for t, body in replies if t == b"K"))
        client.close()
    assert len(keys) == 5


def _wait_running(cluster, sql: str, count: int = 1, timeout: float = 10.0) -> None:
    """Until ``count`` backends run ``sql``: a cancel that reaches a backend before it has
    started the query is dropped by PostgreSQL, so "sent to the server" is not enough."""
    deadline = time.monotonic() + timeout
    while True:
        running = 0
        for node in (cluster.primary, *cluster.replicas):
            with psycopg.connect(node.dsn("postgres"), autocommit=True) as direct:
                running += direct.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query = %s",
                    (sql,),
                ).fetchone()[0]
        if running >= count:
            return
        assert time.monotonic() < deadline, f"{sql!r} not running on {count} backends"
        time.sleep(0.02)


def _run_sleep(conn, outcome: list) -> None:
    try:
        conn.execute("SELECT pg_sleep(20)")
        outcome.append("finished")
    except errors.QueryCanceled as exc:
        outcome.append(exc.sqlstate)


def test_cancel_reaches_the_running_query_and_nothing_else(start_router, cluster):
    router = start_router(pool_size=3)
    victim = psycopg.connect(router.dsn("carol"), autocommit=True)
    bystander = psycopg.connect(router.dsn("carol"), autocommit=True)
    victim_outcome: list = []
    bystander_outcome: list = []
    t1 = threading.Thread(target=_run_sleep, args=(victim, victim_outcome))
    t1.start()
    t2 = threading.Thread(
        target=lambda: bystander_outcome.append(bystander.execute("SELECT pg_sleep(1.5), 7").fetchone()[1])
    )
    t2.start()
    router.wait_for(lambda r: sum(s.pending for p in r.pools.pools.values() for s in p.servers) == 2, what="both queries running")
    _wait_running(cluster, "SELECT pg_sleep(20)")
    _wait_running(cluster, "SELECT pg_sleep(1.5), 7")
    started = time.monotonic()
    # cancel_safe(): the libpq call behind cancel() holds the GIL while it waits, which would
    # starve the in-process router thread.
    victim.cancel_safe()
    t1.join(10)
    assert victim_outcome == ["57014"]
    assert time.monotonic() - started < 5
    t2.join(10)
    assert bystander_outcome == [7]
    # The cancelled client goes on working.
    assert victim.execute("SELECT 1").fetchone() == (1,)
    victim.close()
    bystander.close()


def test_the_cancel_connection_closes_once_the_server_has_the_cancel(start_router, cluster):
    """As PostgreSQL does, the router closes a CancelRequest's connection only once the
    cancel has reached the server (the postmaster has closed the router's own cancel
    connection). libpq and asyncpg wait for that close before their next statement: closed
    sooner, a cancel sent as the query ended anyway could still land, late, on the client's
    next statement on the same backend (session mode, a transaction). Here the primary's
    postmaster is stopped, so the router's cancel cannot be taken until it goes on."""
    router = start_router(pool_mode="session", pool_size=1)
    client = RawClient(router.port)
    login = client.login_trust()
    (key_data,) = [body for t, body in login if t == b"K"]
    client.send(m.query("SELECT pg_sleep(20)"))
    _wait_running(cluster, "SELECT pg_sleep(20)")
    postmaster = cluster.primary.pid()
    os.kill(postmaster, signal.SIGSTOP)
    try:
        canceller = socket.create_connection(("127.0.0.1", router.port), timeout=10)
        canceller.sendall(build_cancel_request(*m.parse_backend_key_data(key_data)))
        readable, _, _ = select.select([canceller], [], [], 0.5)  # the close it must not send yet
        assert not readable, "the cancel connection closed before the server had the cancel"
    finally:
        os.kill(postmaster, signal.SIGCONT)
    assert canceller.recv(1) == b""  # closed once the postmaster has taken it
    canceller.close()
    reply = client.recv_until(b"Z")
    assert [m.parse_error_fields(body)["C"] for t, body in reply if t == b"E"] == ["57014"], reply
    client.close()


def test_cancel_with_unknown_key_is_ignored(start_router, cluster):
    router = start_router(pool_size=2)
    conn = psycopg.connect(router.dsn("carol"), autocommit=True)
    pid = conn.info.backend_pid
    result: list = []
    t = threading.Thread(target=lambda: result.append(conn.execute("SELECT pg_sleep(2), 5").fetchone()[1]))
    t.start()
    router.wait_for(lambda r: any(s.pending for p in r.pools.pools.values() for s in p.servers), what="query running")
    _wait_running(cluster, "SELECT pg_sleep(2), 5")
    for wrong in [(pid, 12345), (pid ^ 1, 12345)]:
        raw = RawClient(router.port)
        raw.send(build_cancel_request(*wrong))
        assert raw.is_closed()
    t.join(10)
    assert result == [5]
    conn.close()


def test_cancel_when_idle_does_nothing(router):
    conn = psycopg.connect(router.dsn("carol"), autocommit=True)
    conn.cancel_safe()
    assert conn.execute("SELECT 1").fetchone() == (1,)
    conn.close()


def test_server_held_during_a_cancel_goes_back_to_the_pool(start_router, cluster):
    """A server connection is kept out of the pool while a cancel for it is in flight (so the
    signal cannot hit another client's query), and returns once the cancel is done."""
    router = start_router(pool_size=1)
    conn = psycopg.connect(router.dsn("carol"), autocommit=True)
    for _ in range(5):
        outcome: list = []
        t = threading.Thread(target=_run_sleep, args=(conn, outcome))
        t.start()
        router.wait_for(lambda r: any(s.pending for p in r.pools.pools.values() for s in p.servers), what="query running")
        _wait_running(cluster, "SELECT pg_sleep(20)")
        conn.cancel_safe()
        t.join(10)
        assert outcome == ["57014"]
        router.wait_for(
            lambda r: all(s.cancels_in_flight == 0 for p in r.pools.pools.values() for s in p.servers)
            and sum(p.stats()["idle"] for p in r.pools.pools.values()) == 1,
            what="server back in the pool after the cancel",
        )
    assert conn.execute("SELECT 1").fetchone() == (1,)
    conn.close()


def test_cancel_of_a_client_waiting_for_a_server_fails_its_statement(start_router, cluster):
    """A cancel while the client's statement waits in the pool queue (a driver's query timeout,
    psql's ^C): the statement fails with 57014 at once and never runs, rather than running once
    a server frees up, after the client has given up on it."""
    cluster.psql("DROP TABLE IF EXISTS cancel_probe; CREATE TABLE cancel_probe (x int)", dbname="app")
    router = start_router(pool_size=1, query_wait_timeout=60)
    holder = psycopg.connect(router.dsn("carol"))
    holder.execute("SELECT 1")  # a transaction holds the only server connection
    waiter = psycopg.connect(router.dsn("carol"), autocommit=True)
    outcome: list = []

    def insert() -> None:
        try:
            waiter.execute("INSERT INTO cancel_probe VALUES (1)")
            outcome.append("ran")
        except errors.QueryCanceled as exc:
            outcome.append(exc.sqlstate)

    t = threading.Thread(target=insert)
    t.start()
    router.wait_for(lambda r: sum(p.stats()["waiting"] for p in r.pools.pools.values()) == 1, what="the insert queued")
    waiter.cancel_safe()
    t.join(10)
    assert outcome == ["57014"]
    assert router.call(lambda r: sum(p.stats()["waiting"] for p in r.pools.pools.values())) == 0
    holder.rollback()
    # The cancelled insert did not run later either: the waiter's next statement runs after
    # anything it had queued.
    assert waiter.execute("SELECT count(*) FROM cancel_probe").fetchone() == (0,)
    holder.close()
    waiter.close()
