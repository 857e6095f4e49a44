"""`workers = 2`: a real `pgrouter run` whose two worker processes share the client port
(SO_REUSEPORT). Which worker holds a connection is read from the operating system (the process
that owns the accepted socket), never from the router's own word."""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from router.frontend.cancel import CancelOutcome
from router.protocol import messages as m
from router.protocol.startup import build_cancel_request
from router.registry.crypto import generate_key
from tests.cluster import Cluster, free_port
from tests.conftest import router_config
from tests.harness import RouterProcess, write_toml
from tests.rawclient import RawClient

WORKERS = 2


class Workers:
    """A supervised router and what the operating system says about its workers."""

    def __init__(self, proc: RouterProcess, admin_port: int) -> None:
        self.proc = proc
        self.admin_port = admin_port
        assert proc.proc is not None and proc.port is not None
        self.port = proc.port
        self.supervisor = psutil.Process(proc.proc.pid)

    def pids(self) -> dict[int, int]:
        """Worker index -> pid."""
        found = {}
        for child in self.supervisor.children():
            try:
                argv = child.cmdline()
            except psutil.Error:  # exited meanwhile
                continue
            if "--worker" in argv:
                found[int(argv[argv.index("--worker") + 1])] = child.pid
        return found

    def runtime_dir(self) -> Path:
        argv = psutil.Process(self.pids()[0]).cmdline()
        return Path(argv[argv.index("--worker-dir") + 1])

    def worker_of(self, client_port: int, timeout: float = 10.0) -> int:
        """The worker whose process holds the router's end of the client's connection from
        ``client_port``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for index, pid in self.pids().items():
                try:
                    conns = psutil.Process(pid).net_connections(kind="tcp")
                except psutil.NoSuchProcess:
                    continue
                if any(c.laddr and c.raddr and c.laddr.port == self.port and c.raddr.port == client_port for c in conns):
                    return index
            time.sleep(0.02)
        raise AssertionError(f"no worker holds the connection from port {client_port}")

    def worker_metrics(self, index: int) -> str:
        """One worker's own /metrics, from its control socket."""
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(5)
            sock.connect(str(self.runtime_dir() / f"worker-{index}.sock"))
            sock.sendall(b"M")
            sock.shutdown(socket.SHUT_WR)
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def metrics(self) -> str:
        return self.admin_get("/metrics").decode()

    def admin_get(self, path: str) -> bytes:
        import urllib.request

        request = urllib.request.Request(f"http://127.0.0.1:{self.admin_port}{path}")
        request.add_header("Authorization", f"Bearer {ADMIN_TOKEN}")
        with urllib.request.urlopen(request, timeout=10) as reply:
            return reply.read()


ADMIN_TOKEN = "workers-token"


def start_workers(cluster: Cluster, tmp_path: Path, **overrides) -> Workers:
    admin_port = free_port()
    config = router_config(
        cluster, workers=WORKERS, admin_port=admin_port, admin_token=ADMIN_TOKEN, pool_size=4, **overrides
    )
    proc = RouterProcess(write_toml(tmp_path / "router.toml", config)).start()
    return Workers(proc, admin_port)


@pytest.fixture(scope="module")
def workers(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Workers]:
    # With replicas: their monitors run in every worker, and /metrics must not add them up.
    handle = start_workers(cluster, tmp_path_factory.mktemp("workers"), split=True, admin_console_users=["alice"])
    yield handle
    handle.proc.stop()


def client_port(conn: psycopg.Connection) -> int:
    with socket.socket(fileno=os.dup(conn.pgconn.socket)) as sock:
        return sock.getsockname()[1]


def sample(text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    raise AssertionError(f"no sample {name} {labels}")


def wait_for(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def sleeping(cluster: Cluster, marker: str) -> bool:
    """Whether the statement holding ``marker`` runs on some node (a read may go to a replica)."""
    running = 0
    for node in (cluster.primary, *cluster.replicas):
        with psycopg.connect(node.dsn("postgres"), autocommit=True) as direct:
            running += direct.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query LIKE %s"
                " AND pid <> pg_backend_pid()",
                (f"%{marker}%",),
            ).fetchone()[0]
    return running == 1


def connection_on(workers: Workers, wanted: int | None = None, avoid: int | None = None) -> tuple[socket.socket, int]:
    """A TCP connection to the router that worker ``wanted`` (or any but ``avoid``) accepted.
    SO_REUSEPORT picks the worker by a hash of the addresses: new connections until one fits."""
    for _ in range(200):
        sock = socket.create_connection(("127.0.0.1", workers.port), timeout=10)
        index = workers.worker_of(sock.getsockname()[1])
        if (wanted is None or index == wanted) and index != avoid:
            return sock, index
        sock.close()
    raise AssertionError(f"200 connections and none on worker {wanted} / off worker {avoid}")


def test_both_workers_serve_clients_on_one_port(workers: Workers) -> None:
    assert sorted(workers.pids()) == list(range(WORKERS))
    seen: dict[int, int] = {}
    conns = []
    try:
        for _ in range(100):
            conn = psycopg.connect(workers.proc.dsn("carol"), autocommit=True)
            conns.append(conn)
            assert conn.execute("SELECT 1").fetchone() == (1,)
            index = workers.worker_of(client_port(conn))
            seen[index] = seen.get(index, 0) + 1
            # The BackendKeyData process id names the worker that issued it.
            assert conn.info.backend_pid % WORKERS == index
            if len(seen) == WORKERS and len(conns) >= 10:
                break
        assert sorted(seen) == list(range(WORKERS)), f"connections by worker: {seen}"
        # Every worker counts its own clients; /metrics on worker 0 shows them all.
        def clients() -> float:
            text = workers.metrics()
            return sum(
                sample(text, "pgrouter_client_connections", tenant="", state=state)
                for state in ("active", "idle", "waiting")
            )

        wait_for(lambda: clients() == len(conns), 10, f"{len(conns)} clients in /metrics")
    finally:
        for conn in conns:
            conn.close()


def _run_sleep(client: RawClient, sql: str, outcome: list) -> None:
    client.send(m.query(sql))
    replies = client.recv_until(b"Z")
    errors = [m.parse_error_fields(body)["C"] for t, body in replies if t == b"E"]
    outcome.append(errors[0] if errors else "finished")


def test_a_cancel_through_the_other_worker_cancels_the_query(workers: Workers, cluster: Cluster) -> None:
    before = workers.metrics()
    victim = RawClient(workers.port)
    owner = workers.worker_of(victim.sock.getsockname()[1])
    pid, key = next(m.parse_backend_key_data(body) for t, body in victim.login_trust() if t == b"K")
    assert pid % WORKERS == owner
    outcome: list = []
    sql = "SELECT pg_sleep(30) /* cancel-through-sibling */"
    thread = threading.Thread(target=_run_sleep, args=(victim, sql, outcome))
    thread.start()
    wait_for(lambda: sleeping(cluster, "cancel-through-sibling"), 10, "the query to run")
    started = time.monotonic()
    canceller, via = connection_on(workers, avoid=owner)
    # With the postmasters stopped the cancel cannot reach the server, and the canceller's
    # connection stays open, as PostgreSQL's would: through both workers.
    postmasters = [node.pid() for node in cluster.nodes]
    for pm in postmasters:
        os.kill(pm, signal.SIGSTOP)
    try:
        canceller.sendall(build_cancel_request(pid, key))
        readable, _, _ = select.select([canceller], [], [], 0.5)  # the close it must not send yet
        assert not readable, "the cancel connection closed before the server had the cancel"
    finally:
        for pm in postmasters:
            os.kill(pm, signal.SIGCONT)
    assert canceller.recv(1) == b""  # closed once the postmaster has taken it
    thread.join(10)
    assert outcome == ["57014"], f"{outcome} (cancel sent through worker {via}, query on {owner})"
    assert time.monotonic() - started < 5
    canceller.close()
    # The cancelled client carries on.
    victim.send(m.query("SELECT 1"))
    assert not [t for t, _ in victim.recv_until(b"Z") if t == b"E"]
    victim.close()
    after = workers.metrics()

    def grew(outcome: str) -> float:
        name = "pgrouter_cancel_requests_total"
        return sample(after, name, outcome=outcome) - sample(before, name, outcome=outcome)

    assert grew("forwarded") == 1  # by the worker that received it...
    assert grew("local") == 1  # ...to the one that cancelled


def clients_on_every_worker(workers: Workers) -> tuple[list[psycopg.Connection], dict[int, int]]:
    """One client on each worker (each has run a query, so each worker has a pool), and, by
    client port, the worker the operating system says holds it. Connections that land on a
    worker that has one already are closed: SO_REUSEPORT may put several in a row on one, and
    tests that hold a transaction per client must stay within a worker's pool."""
    clients: list[psycopg.Connection] = []
    worker_of: dict[int, int] = {}
    for _ in range(60):
        if set(worker_of.values()) == set(range(WORKERS)):
            return clients, worker_of
        conn = psycopg.connect(f"postgresql://carol@127.0.0.1:{workers.port}/app", autocommit=True)
        worker = workers.worker_of(client_port(conn))
        if worker in worker_of.values():
            conn.close()  # (before any query: the traffic tests count each client's one)
            continue
        conn.execute("SELECT 1")
        clients.append(conn)
        worker_of[client_port(conn)] = worker
    raise AssertionError("SO_REUSEPORT never spread the clients over both workers")


def test_pause_from_the_console_holds_every_worker_s_clients(workers: Workers) -> None:
    """PAUSE on the console reaches every worker: the next transactions of clients on each
    wait (SHOW CLIENTS, merged over the workers, says so) until RESUME."""
    clients, worker_of = clients_on_every_worker(workers)
    console = psycopg.connect(f"postgresql://alice:alice-pw@127.0.0.1:{workers.port}/pgrouter", autocommit=True)
    assert console.execute("PAUSE app").statusmessage == "PAUSE"
    results: list = []
    threads = [threading.Thread(target=lambda c=c: results.append(c.execute("SELECT 5").fetchone())) for c in clients]
    for thread in threads:
        thread.start()
    addresses = {f"127.0.0.1:{port}" for port in worker_of}

    def all_waiting() -> bool:
        cur = console.execute("SHOW CLIENTS")
        names = [d.name for d in cur.description]
        rows = cur.fetchall()
        states = {row[names.index("address")]: row[names.index("state")] for row in rows}
        return all(states.get(address) == "waiting" for address in addresses)

    wait_for(all_waiting, 10, "every client waiting at the pause, on both workers")
    assert not results
    assert console.execute("RESUME app").statusmessage == "RESUME"
    for thread in threads:
        thread.join(10)
    assert results == [(5,)] * len(clients)
    for conn in (console, *clients):
        conn.close()


def test_kill_and_disable_from_the_console_reach_every_worker(workers: Workers) -> None:
    """KILL app disconnects the database's clients on every worker (the NOTICE counts them
    all); DISABLE app refuses logins whichever worker takes them, until ENABLE app."""
    clients, _ = clients_on_every_worker(workers)
    console = psycopg.connect(f"postgresql://alice:alice-pw@127.0.0.1:{workers.port}/pgrouter", autocommit=True)
    notices: list[str] = []
    console.add_notice_handler(lambda diag: notices.append(diag.message_primary))
    try:
        assert console.execute("KILL app").statusmessage == "KILL"
        assert notices == [f"{len(clients)} clients disconnected; new transactions wait for RESUME"]
        for conn in clients:
            with pytest.raises(psycopg.OperationalError, match="administrator command"):
                conn.execute("SELECT 1")
        console.execute("DISABLE app")
        for _ in range(20):  # the kernel spreads them over both workers
            with pytest.raises(psycopg.OperationalError, match="not currently accepting connections"):
                psycopg.connect(f"postgresql://carol@127.0.0.1:{workers.port}/app")
    finally:
        console.execute("ENABLE app")
        console.execute("RESUME app")
    again, _ = clients_on_every_worker(workers)  # every worker lets them in and serves them
    for conn in (console, *clients, *again):
        conn.close()


def test_kill_client_reaches_the_worker_that_holds_the_client(workers: Workers) -> None:
    """KILL_CLIENT id disconnects that client whichever worker holds it (one on each here,
    whichever worker the console landed on), and no other. GET /clients lists them all, each
    with its worker."""
    clients, worker_of = clients_on_every_worker(workers)
    listed = json.loads(workers.admin_get("/clients"))
    assert listed["workers_reporting"] == WORKERS
    assert {(c["id"], c["worker"]) for c in listed["clients"]} == {
        (conn.info.backend_pid, worker_of[client_port(conn)]) for conn in clients
    }
    console = psycopg.connect(f"postgresql://alice:alice-pw@127.0.0.1:{workers.port}/pgrouter", autocommit=True)
    victims = {}  # worker -> client
    for conn in clients:
        victims.setdefault(worker_of[client_port(conn)], conn)
    for conn in victims.values():
        assert console.execute(f"KILL_CLIENT {conn.info.backend_pid}").statusmessage == "KILL_CLIENT"
        with pytest.raises(psycopg.OperationalError, match="administrator command"):
            conn.execute("SELECT 1")
    for conn in clients:
        if conn not in victims.values():
            assert conn.execute("SELECT 2").fetchone() == (2,)
    for conn in (console, *clients):
        conn.close()


def test_the_console_shows_every_worker_s_clients_and_pools(workers: Workers) -> None:
    """SHOW CLIENTS / POOLS / SERVERS on the admin console ask every worker and say which one
    holds each row, whichever worker the console connection itself landed on."""
    clients, worker_of = clients_on_every_worker(workers)
    console = f"postgresql://alice:alice-pw@127.0.0.1:{workers.port}/pgrouter"
    out = subprocess.run(
        ["psql", "-X", "-A", "-F", "|", "-v", "ON_ERROR_STOP=1", console, "-c", "SHOW CLIENTS", "-c", "SHOW POOLS"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "did not answer" not in out.stderr
    lines = [line.split("|") for line in out.stdout.splitlines() if line and not line.startswith("(")]
    assert lines[0] == ["worker", "user", "database", "tenant", "address", "state", "tls", "pinned", "connected_seconds",
                        "id"]  # fmt: skip
    listed = {row[4]: row[0] for row in lines[1:] if len(row) == 10}  # address -> worker
    for port, index in worker_of.items():
        assert listed.get(f"127.0.0.1:{port}") == str(index), (port, index, listed)
    pools_at = lines.index(
        ["worker", "database", "user", "host", "port", "mode", "size", "servers", "active", "idle", "connecting", "waiting",
         "caps", "reserve"]
    )  # fmt: skip
    assert {row[0] for row in lines[pools_at + 1 :] if row[1] == "app"} == {str(i) for i in range(WORKERS)}
    for conn in clients:
        conn.close()


def test_stats_add_up_every_worker_s_traffic(workers: Workers) -> None:
    """SHOW STATS_TOTALS and SHOW LISTS on the console, GET /stats and /metrics count the
    transactions of clients on both workers, whichever worker answers."""
    console = psycopg.connect(f"postgresql://alice:alice-pw@127.0.0.1:{workers.port}/pgrouter", autocommit=True)

    def totals() -> tuple[int, int, float]:
        cur = console.execute("SHOW STATS_TOTALS")
        names = [d.name for d in cur.description]
        app = next(row for row in cur.fetchall() if row[0] == "app")
        body = json.loads(workers.admin_get("/stats"))
        assert body["workers_reporting"] == WORKERS
        http = next(db for db in body["databases"] if db["database"] == "app")
        assert http["total_xact_count"] == int(app[names.index("total_xact_count")])
        metric = sample(workers.metrics(), "pgrouter_database_transactions_total", database="app")
        return int(app[names.index("total_xact_count")]), int(app[names.index("total_query_count")]), metric

    before = totals()
    clients, _ = clients_on_every_worker(workers)  # one SELECT each
    for conn in clients:
        with conn.transaction():  # BEGIN, SELECT, COMMIT: one more transaction
            conn.execute("SELECT 1")
    after = totals()
    # Two queries of it reach a server: with read/write splitting the router answers the
    # BEGIN itself, and sends it on with the statement that tells where the transaction goes.
    assert (after[0] - before[0], after[1] - before[1], after[2] - before[2]) == (
        2 * len(clients), 3 * len(clients), 2 * len(clients)
    )
    cur = console.execute("SHOW LISTS")
    lists = dict(cur.fetchall())
    assert int(lists["used_clients"]) >= len(clients) and lists["console_clients"] == "1"
    for conn in (console, *clients):
        conn.close()


def test_show_databases_and_nodes_count_every_worker_s_connections(workers: Workers) -> None:
    """SHOW DATABASES' current_connections and SHOW NODES' in_flight add up every worker's,
    whichever worker the console landed on: read-only transactions held open on replicas
    through both workers are all counted, and so are their server connections."""
    clients, _ = clients_on_every_worker(workers)
    for conn in clients:
        conn.execute("BEGIN READ ONLY")
        conn.execute("SELECT 1")  # on a replica, held
    console = psycopg.connect(f"postgresql://alice:alice-pw@127.0.0.1:{workers.port}/pgrouter", autocommit=True)

    def table(command: str) -> list[dict]:
        cur = console.execute(command)
        names = [d.name for d in cur.description]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]

    try:
        in_flight = sum(int(node["in_flight"]) for node in table("SHOW NODES") if node["role"] == "replica")
        assert in_flight == len(clients)
        servers = sum(int(pool["servers"]) for pool in table("SHOW POOLS") if pool["database"] == "app")
        app = next(db for db in table("SHOW DATABASES") if db["name"] == "app")
        assert int(app["current_connections"]) == servers >= len(clients)
    finally:
        for conn in clients:
            conn.execute("COMMIT")
            conn.close()
        console.close()


def test_show_config_tells_the_whole_router_s_settings(workers: Workers) -> None:
    """SHOW CONFIG on whichever worker: the settings file's values, not the worker's part of
    the limits (pool_size 4 over two workers) nor its own admin_port (only worker 0 serves it)."""
    seen: set[int] = set()
    consoles = []
    while seen != set(range(WORKERS)):
        assert len(consoles) < 60, "SO_REUSEPORT never spread the consoles over both workers"
        console = psycopg.connect(f"postgresql://alice:alice-pw@127.0.0.1:{workers.port}/pgrouter", autocommit=True)
        consoles.append(console)
        worker = workers.worker_of(client_port(console))
        if worker in seen:
            continue
        seen.add(worker)
        config = {row[0]: row[1] for row in console.execute("SHOW CONFIG").fetchall()}
        assert (config["pool_size"], config["admin_port"], config["workers"]) == ("4", str(workers.admin_port), "2"), worker
    for console in consoles:
        console.close()


def test_an_unknown_cancel_key_is_ignored(workers: Workers) -> None:
    before = workers.metrics()
    conn = psycopg.connect(workers.proc.dsn("carol"), autocommit=True)
    owner = workers.worker_of(client_port(conn))
    result: list = []
    thread = threading.Thread(target=lambda: result.append(conn.execute("SELECT pg_sleep(1), 5").fetchone()[1]))
    thread.start()
    pid = conn.info.backend_pid
    # Wrong keys for the running client, through its worker and through the other one, and
    # a process id that no client has.
    for wanted, cancel in [(owner, (pid, 1)), (1 - owner, (pid, 2)), (owner, (pid ^ 2, 3))]:
        sock, _ = connection_on(workers, wanted=wanted)
        sock.sendall(build_cancel_request(*cancel))
        assert sock.recv(1) == b""  # closed without an answer, as by PostgreSQL
        sock.close()
    thread.join(10)
    assert result == [5]
    conn.close()
    after = workers.metrics()
    name = "pgrouter_cancel_requests_total"
    assert sample(after, name, outcome="unknown") - sample(before, name, outcome="unknown") == 3
    assert sample(after, name, outcome="local") == sample(before, name, outcome="local")


def test_metrics_are_the_sum_over_workers(workers: Workers) -> None:
    conns, served = [], set()
    while len(served) < WORKERS:  # until each worker ran some transactions
        assert len(conns) < 100, f"100 connections, all on workers {served}"
        conn = psycopg.connect(workers.proc.dsn("carol"), autocommit=True)
        conns.append(conn)
        for _ in range(3):
            conn.execute("SELECT 1")
        served.add(workers.worker_of(client_port(conn)))
    own = [workers.worker_metrics(i) for i in range(WORKERS)]
    merged = workers.metrics()
    name = "pgrouter_transaction_duration_seconds_count"
    parts = [sample(text, name) for text in own]
    assert all(part > 0 for part in parts), parts  # both served some
    assert sample(merged, name) == sum(parts)
    assert sample(merged, "pgrouter_workers") == WORKERS
    assert sample(merged, "pgrouter_workers_reporting") == WORKERS
    # GET /queries: one statement run on both workers is one entry with every call.
    for conn in conns:
        conn.execute("SELECT count(*) FROM pg_namespace WHERE nspname = 'workers'")

    def marker() -> dict | None:
        answer = json.loads(workers.admin_get("/queries?limit=1000"))
        shown = "SELECT count(*) FROM pg_namespace WHERE nspname = $1"  # constants redacted
        return next((q for q in answer["queries"] if q["query"] == shown), None)

    wait_for(lambda: (marker() or {}).get("calls") == len(conns), 10, f"{len(conns)} calls in /queries")
    assert sum(marker()["roles"].values()) == len(conns)
    for conn in conns:
        conn.close()
    # Measurements of the same node are not added up: a node is up (1), not "2".
    for part in own:
        assert sample(part, "pgrouter_node_up", role="primary") == 1
    assert sample(merged, "pgrouter_node_up", role="primary") == 1
    assert sample(merged, "pgrouter_node_up", role="replica") == 1


def test_a_bad_control_request_gets_no_answer(workers: Workers) -> None:
    for garbage in [b"X", b"P\xff\xfe", b"C" + b"\x00" * 16, b"M" * 500]:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(5)
            sock.connect(str(workers.runtime_dir() / "worker-1.sock"))
            sock.sendall(garbage)
            sock.shutdown(socket.SHUT_WR)
            assert sock.recv(1) == b""
    assert "pgrouter_client_connections" in workers.worker_metrics(1)  # still answering


def test_a_worker_that_dies_is_restarted_and_sigterm_exits_zero(cluster: Cluster, tmp_path: Path) -> None:
    workers = start_workers(cluster, tmp_path, shutdown_timeout=20)
    try:
        before = workers.pids()
        os.kill(before[1], signal.SIGKILL)  # a crash, not a shutdown
        wait_for(lambda: workers.pids().get(1) not in (None, before[1]), 20, "worker 1 to be restarted")
        wait_for(lambda: (workers.runtime_dir() / "worker-1.sock").exists(), 20, "worker 1 to listen again")
        sock, _ = connection_on(workers, wanted=1)  # it serves clients again
        sock.close()
        with psycopg.connect(workers.proc.dsn("carol"), autocommit=True) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        # A transaction in flight on some worker: SIGTERM lets it finish, then all exit 0.
        busy = psycopg.connect(workers.proc.dsn("carol"))
        busy.execute("SELECT 1")
        runtime = workers.runtime_dir()
        pids = workers.pids()
        workers.proc.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: _refused(workers.proc), 10, "the listeners to close")
        assert workers.proc.proc.poll() is None, "the router exited with a transaction running"
        assert busy.execute("SELECT 41 + 1").fetchone() == (42,)
        busy.commit()
        busy.close()
        assert workers.proc.proc.wait(20) == 0
        assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE for pid in pids.values())
        assert not runtime.exists()
    finally:
        workers.proc.stop()


def psycopg_on(workers: Workers, index: int, **kwargs) -> psycopg.Connection:
    """A psycopg connection that worker ``index`` accepted."""
    for _ in range(200):
        conn = psycopg.connect(workers.proc.dsn("carol"), **kwargs)
        if workers.worker_of(client_port(conn)) == index:
            return conn
        conn.close()
    raise AssertionError(f"200 connections and none on worker {index}")


def read_lines(proc: RouterProcess, prefix: str, count: int, timeout: float = 10.0) -> list[str]:
    """The next ``count`` lines of the router's stdout starting with ``prefix``. Read from the
    file descriptor: the workers' lines may arrive together, and a buffered readline would
    keep the second where select() cannot see it."""
    assert proc.proc is not None and proc.proc.stdout is not None
    fd = proc.proc.stdout.fileno()
    deadline = time.monotonic() + timeout
    pending, found = b"", []
    while len(found) < count:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
            raise AssertionError(f"{len(found)} of {count} lines starting with {prefix!r} within {timeout}s")
        chunk = os.read(fd, 65536)
        if not chunk:
            raise AssertionError(f"the router closed its output after {found}")
        pending += chunk
        *lines, pending = pending.split(b"\n")
        found += [line.decode() for line in lines if line.decode().startswith(prefix)]
    return found


def test_limits_are_split_and_reloads_reach_every_worker(cluster: Cluster, tmp_path: Path) -> None:
    import urllib.request

    admin_port = free_port()
    config = router_config(
        cluster, workers=WORKERS, admin_port=admin_port, admin_token="reload-token", pool_size=2,
        query_wait_timeout=0.5,
    )  # fmt: skip
    path = write_toml(tmp_path / "router.toml", config)
    workers = Workers(RouterProcess(path).start(), admin_port)
    try:
        # pool_size = 2 over two workers: one server connection each. A transaction holds
        # worker 1's; another client of worker 1 waits, then gets 53300.
        holder = psycopg_on(workers, 1)
        holder.execute("SELECT 1")
        other = psycopg_on(workers, 1, autocommit=True)
        with pytest.raises(psycopg.errors.TooManyConnections):
            other.execute("SELECT 2")
        # POST /reload on worker 0: worker 1 re-reads the file too and gets its larger share.
        write_toml(path, {**config, "pool_size": 4})
        request = urllib.request.Request(f"http://127.0.0.1:{admin_port}/reload", method="POST")
        request.add_header("Authorization", "Bearer reload-token")
        with urllib.request.urlopen(request, timeout=10) as reply:
            assert json.loads(reply.read())["applied"] == ["pool_size"]
        assert other.execute("SELECT 3").fetchone() == (3,)
        holder.commit()
        # SIGHUP to the supervisor: every worker reloads and says so.
        write_toml(path, {**config, "pool_size": 6})
        workers.proc.proc.send_signal(signal.SIGHUP)
        for line in read_lines(workers.proc, "reloaded:", WORKERS):
            assert '"pool_size"' in line
        holder.close()
        other.close()
    finally:
        workers.proc.stop()


def test_reload_and_shutdown_from_the_console_reach_every_worker(cluster: Cluster, tmp_path: Path) -> None:
    """RELOAD on a console connection that worker 0 took re-reads the file in worker 1 too
    (its larger share of pool_size serves a client that got 53300 before); SHUTDOWN stops the
    supervisor and every worker, exit status 0."""
    admin_port = free_port()
    config = router_config(
        cluster, workers=WORKERS, admin_port=admin_port, admin_token="reload-token", pool_size=2,
        query_wait_timeout=0.5, admin_console_users=["alice"],
    )  # fmt: skip
    path = write_toml(tmp_path / "router.toml", config)
    workers = Workers(RouterProcess(path).start(), admin_port)
    try:
        holder = psycopg_on(workers, 1)
        holder.execute("SELECT 1")  # worker 1's only server connection, in a transaction
        other = psycopg_on(workers, 1, autocommit=True)
        with pytest.raises(psycopg.errors.TooManyConnections):
            other.execute("SELECT 2")
        write_toml(path, {**config, "pool_size": 4})
        for _ in range(200):
            console = psycopg.connect(workers.proc.dsn("alice", "alice-pw", "pgrouter"), autocommit=True)
            if workers.worker_of(client_port(console)) == 0:
                break
            console.close()
        notices: list[str] = []
        console.add_notice_handler(lambda diag: notices.append(diag.message_primary))
        assert console.execute("RELOAD").statusmessage == "RELOAD"
        assert notices == ["applied: pool_size; needs a restart: nothing"]
        assert other.execute("SELECT 3").fetchone() == (3,)  # worker 1 reloaded too
        holder.commit()
        assert console.execute("SHUTDOWN").statusmessage == "SHUTDOWN"
        assert workers.proc.proc.wait(20) == 0
        for conn in (holder, other, console):
            conn.close()
    finally:
        workers.proc.stop()


def test_a_killed_supervisor_takes_its_workers_with_it(cluster: Cluster, tmp_path: Path) -> None:
    import shutil

    workers = start_workers(cluster, tmp_path)
    pids, runtime = workers.pids(), workers.runtime_dir()
    try:
        workers.proc.proc.kill()  # SIGKILL: the supervisor cannot pass anything on
        workers.proc.proc.wait(10)

        def gone(pid: int) -> bool:
            try:
                return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                return True

        wait_for(lambda: all(gone(pid) for pid in pids.values()), 20, "the workers to exit")
        assert _refused(workers.proc)
    finally:
        workers.proc.stop()
        shutil.rmtree(runtime, ignore_errors=True)  # the supervisor could not remove it


def test_a_worker_that_cannot_start_stops_the_router(cluster: Cluster, tmp_path: Path) -> None:
    with socket.socket() as taken:  # a listener without SO_REUSEPORT: nobody can join it
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = router_config(cluster, workers=WORKERS, listen_port=port)
        proc = RouterProcess(write_toml(tmp_path / "router.toml", config))
        with pytest.raises(RuntimeError, match="did not start"):
            proc.start()
        assert proc.proc is not None and proc.proc.wait(20) == 1
        assert "workers did not start" in proc.log_path.read_text()


def _refused(proc: RouterProcess) -> bool:
    try:
        psycopg.connect(proc.dsn("carol"), connect_timeout=2).close()
    except psycopg.OperationalError:
        return True
    return False


def test_a_cancel_for_another_instance_goes_through_redis(start_router, cluster: Cluster) -> None:
    """Two router instances sharing a registry: a CancelRequest that reaches the one that did
    not issue the key is relayed over Redis to the one that did."""
    import uuid

    registry = {
        "redis_url": cluster.redis_url,
        "secret_key": f"k1:{generate_key()}",
        "registry_prefix": f"cancel-relay-{uuid.uuid4().hex[:8]}:",
    }
    issuer, other = start_router(**registry), start_router(**registry)
    for router in (issuer, other):
        router.wait_for(lambda r: r.cancel_relay.subscribed.is_set(), what="the relay subscribed")
    victim = RawClient(issuer.port)
    pid, key = next(m.parse_backend_key_data(body) for t, body in victim.login_trust() if t == b"K")
    outcome: list = []
    thread = threading.Thread(target=_run_sleep, args=(victim, "SELECT pg_sleep(30) /* relayed */", outcome))
    thread.start()
    wait_for(lambda: sleeping(cluster, "relayed"), 10, "the query to run")
    for wrong in [(pid, key ^ 1), (pid ^ 1, key)]:  # relayed too, and ignored by everyone
        raw = RawClient(other.port)
        raw.send(build_cancel_request(*wrong))
        assert raw.is_closed()
    assert sleeping(cluster, "relayed")
    raw = RawClient(other.port)
    raw.send(build_cancel_request(pid, key))
    assert raw.is_closed()
    thread.join(10)
    assert outcome == ["57014"]
    victim.close()
    assert other.call(lambda r: r.cancel_outcomes[CancelOutcome.RELAYED]) == 3
    assert issuer.call(lambda r: r.cancel_outcomes[CancelOutcome.LOCAL]) == 1


def test_a_tenant_move_waits_for_transactions_on_every_worker(cluster: Cluster, tmp_path: Path) -> None:
    """POST /tenants/{id}/move is served by worker 0, but the tenant's clients may be on any
    worker: a transaction running on worker 1 holds the move back (409 at the deadline), and
    once it is done the move goes through and worker 1's client follows the tenant."""
    import asyncio
    import urllib.error
    import urllib.request
    import uuid

    from router.registry.crypto import Keyring
    from router.registry.models import TenantCreate
    from router.registry.store import RedisStore

    databases = ["workers_move_from", "workers_move_to"]
    for db in databases:
        if cluster.psql(f"SELECT 1 FROM pg_database WHERE datname = '{db}'") != "1":
            cluster.psql(f"CREATE DATABASE {db} OWNER pgr_scram")
    secret_key, prefix = f"k1:{generate_key()}", f"workers-move-{uuid.uuid4().hex[:8]}:"

    async def create() -> None:
        store = RedisStore.from_url(cluster.redis_url, Keyring.from_specs(secret_key), prefix=prefix)
        try:
            await store.create(
                TenantCreate(
                    tenant_id="mover",
                    cluster={"primary": {"host": cluster.primary.host, "port": cluster.primary.port}},
                    database=databases[0], server_user="pgr_scram", server_password="scram-pw",
                    users=[{"name": "mo", "password": "mo-pw"}],
                )  # fmt: skip
            )
        finally:
            await store.close()

    asyncio.run(create())
    admin_port = free_port()
    config = router_config(
        cluster, workers=WORKERS, admin_port=admin_port, admin_token=ADMIN_TOKEN,
        redis_url=cluster.redis_url, secret_key=secret_key, registry_prefix=prefix,
        tenant_drop_timeout=1,
    )  # fmt: skip
    workers = Workers(RouterProcess(write_toml(tmp_path / "router.toml", config)).start(), admin_port)

    def on_worker_1() -> psycopg.Connection:
        for _ in range(200):
            conn = psycopg.connect(f"postgresql://mo:mo-pw@127.0.0.1:{workers.port}/mover")
            if workers.worker_of(client_port(conn)) == 1:
                return conn
            conn.close()
        raise AssertionError("200 connections and none on worker 1")

    def move() -> int:
        request = urllib.request.Request(
            f"http://127.0.0.1:{admin_port}/tenants/mover/move", method="POST",
            data=json.dumps({"database": databases[1]}).encode(),
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}", "Content-Type": "application/json"},
        )  # fmt: skip
        try:
            with urllib.request.urlopen(request, timeout=30) as reply:
                return reply.status
        except urllib.error.HTTPError as exc:
            return exc.code

    try:
        client = on_worker_1()
        assert client.execute("SELECT current_database()").fetchone() == (databases[0],)  # in a transaction now
        # GET /tenants/{id}/status, served by worker 0, counts worker 1's client and pool.
        status = json.loads(workers.admin_get("/tenants/mover/status"))
        assert status["clients"] == {"total": 1, "active": 1, "waiting": 0}
        assert [stats["active"] for stats in status["pools"].values()] == [1]
        # So does GET /pools, over every pool of every worker.
        pools = json.loads(workers.admin_get("/pools"))
        assert pools["clients"] == {"total": 1, "active": 1, "waiting": 0, "pinned": 0}
        assert sum(stats["active"] for stats in pools["pools"].values()) == 1
        assert move() == 409  # worker 1's transaction is still running
        assert client.execute("SELECT current_database()").fetchone() == (databases[0],)
        client.commit()
        assert move() == 200
        with client.transaction():
            assert client.execute("SELECT current_database()").fetchone() == (databases[1],)
        client.close()
    finally:
        workers.proc.stop()


def _connection_on_worker(workers: Workers, wanted: int) -> psycopg.Connection:
    for _ in range(200):
        conn = psycopg.connect(workers.proc.dsn("carol"), autocommit=True)
        if workers.worker_of(client_port(conn)) == wanted:
            return conn
        conn.close()
    raise AssertionError(f"200 connections and none on worker {wanted}")


def test_read_your_writes_tenant_across_workers(cluster: Cluster, tmp_path: Path) -> None:
    """read_your_writes = tenant with two workers: a row inserted through one worker is seen
    at once by a session of the same database entry on the other worker, 200 times, with a
    replica lagging (its replay paused, the lag limit too high to skip it): the write times
    are shared between the processes (router/causal.py)."""
    cluster.psql("CREATE TABLE IF NOT EXISTS ryw_rows (id int PRIMARY KEY)", dbname="app")
    cluster.psql("TRUNCATE ryw_rows", dbname="app")
    cluster.wait_replay()
    clusters = router_config(cluster, split=True)["clusters"]
    clusters["main"]["max_replica_lag"] = 3600
    workers = start_workers(cluster, tmp_path, clusters=clusters, read_your_writes="tenant")
    lagging = cluster.replicas[0]
    try:
        writer, reader = _connection_on_worker(workers, 0), _connection_on_worker(workers, 1)
        deadline = time.monotonic() + 20
        while reader.execute("SELECT pg_is_in_recovery()").fetchone() != (True,):  # the monitor is up
            assert time.monotonic() < deadline, "reads never reached a replica"
        cluster.psql("SELECT pg_wal_replay_pause()", node=lagging)
        with writer, reader:
            for i in range(200):
                writer.execute("INSERT INTO ryw_rows VALUES (%s)", (i,))
                seen, port = reader.execute(
                    "SELECT EXISTS (SELECT FROM ryw_rows WHERE id = %s), inet_server_port()", (i,)
                ).fetchone()
                assert seen, f"row {i}, written through worker 0, not seen through worker 1 (port {port})"
                assert port != lagging.port
    finally:
        cluster.psql("SELECT pg_wal_replay_resume()", node=lagging)
        workers.proc.stop()
