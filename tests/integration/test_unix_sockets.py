"""Unix-domain sockets: servers reached through a socket directory (a node whose host is a
path, as libpq reads ``host=/var/run/postgresql``), and clients through the router's own
(unix_socket_dir)."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import threading

import psycopg
import pytest
from psycopg import errors

from router.config import Settings
from router.protocol.startup import build_ssl_request
from tests.cluster import Cluster, free_port
from tests.conftest import router_config
from tests.harness import RouterThread


def _unix_clusters(cluster: Cluster) -> dict:
    return {
        "main": {
            "primary": {"host": str(cluster.primary.socket_dir), "port": cluster.primary.port},
            "replicas": [{"host": str(r.socket_dir), "port": r.port} for r in cluster.replicas],
        }
    }


def test_servers_through_their_unix_sockets(start_router, cluster: Cluster) -> None:
    """Pools, the lag monitor and cancel reach every node through its socket directory;
    server_tls does not apply there (as libpq's sslmode), so `require` still connects."""
    router = start_router(clusters=_unix_clusters(cluster), server_tls="require")
    router.wait_for(
        lambda r: sum(n.eligible for split in r.splits.values() for n in split.topology.nodes) == 2,
        what="both replicas eligible, as the lag monitor sees them through their sockets",
    )
    with psycopg.connect(router.dsn("carol"), autocommit=True) as conn:
        # inet_server_addr() is NULL on a Unix-socket connection.
        assert conn.execute("SELECT inet_server_addr(), pg_is_in_recovery()").fetchone() == (None, True)
        with conn.transaction():
            assert conn.execute("SELECT inet_server_addr(), pg_is_in_recovery(), txid_current() > 0").fetchone() == (
                None,
                False,
                True,
            )
        outcome: list[str] = []

        def sleep() -> None:
            try:
                conn.execute("SELECT pg_sleep(30) /* unix cancel */")
            except errors.QueryCanceled as exc:
                outcome.append(exc.sqlstate)

        thread = threading.Thread(target=sleep)
        thread.start()
        sql = "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query LIKE '%unix cancel */'"
        router.wait_for(lambda r: any(s.pending for p in r.pools.pools.values() for s in p.servers), what="query sent")
        while not any(cluster.psql(sql, node=node) == "1" for node in (cluster.primary, *cluster.replicas)):
            assert thread.is_alive(), "the query ended before it was cancelled"
        conn.cancel_safe()  # the router's CancelRequest goes to the server's socket too
        thread.join(10)
        assert outcome == ["57014"]
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_clients_through_the_router_s_unix_socket(start_router, client_cert, tmp_path) -> None:
    """unix_socket_dir: the router also listens on <dir>/.s.PGSQL.<port> (mode
    unix_socket_mode), where psql and psycopg find it with host=<dir>. As PostgreSQL does,
    it answers an SSLRequest there with 'N' and does not require TLS of a local client; TCP
    clients still must use it. A stale socket file is replaced; the file goes at shutdown."""
    port = free_port()
    path = tmp_path / f".s.PGSQL.{port}"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))  # bound, never listening, closed: what a killed process leaves
    stale.close()
    router = start_router(
        listen_port=port,
        unix_socket_dir=str(tmp_path),
        unix_socket_mode=0o770,
        client_tls="require",
        client_tls_cert=str(client_cert / "cert.pem"),
        client_tls_key=str(client_cert / "key.pem"),
    )
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o770
    with psycopg.connect(host=str(tmp_path), port=port, user="carol", dbname="app", autocommit=True) as conn:
        assert conn.execute("SELECT current_user, 1").fetchone() == ("postgres", 1)
        assert conn.info.pgconn.ssl_in_use is False
    out = subprocess.run(
        ["psql", "-X", "-A", "-t", "-h", str(tmp_path), "-p", str(port), "-U", "alice", "-d", "app", "-c", "SELECT 7"],
        capture_output=True, text=True, timeout=30, env={**os.environ, "PGPASSWORD": "alice-pw"},
    )  # fmt: skip
    assert (out.returncode, out.stdout.strip()) == (0, "7"), out.stderr
    with socket.socket(socket.AF_UNIX) as raw:
        raw.settimeout(10)
        raw.connect(str(path))
        raw.sendall(build_ssl_request())
        assert raw.recv(1) == b"N"
    with pytest.raises(psycopg.OperationalError, match="TLS is required"):
        psycopg.connect(router.dsn("carol"), sslmode="disable")  # TCP: still required
    router.stop()
    assert not path.exists()


def test_a_unix_socket_another_server_listens_on_is_not_taken(cluster: Cluster, tmp_path) -> None:
    port = free_port()
    path = tmp_path / f".s.PGSQL.{port}"
    other = socket.socket(socket.AF_UNIX)
    other.bind(str(path))
    other.listen()
    handle = RouterThread(Settings(**router_config(cluster, listen_port=port, unix_socket_dir=str(tmp_path))))
    try:
        with pytest.raises(OSError, match="another server is listening there"):
            handle.start()
    finally:
        handle.stop()
        other.close()
    assert path.exists()  # still the other server's
