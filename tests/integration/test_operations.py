"""A real `pgrouter run` process: SIGHUP reloads what can change without dropping a connection,
SIGTERM drains (no new connections, running transactions finish) and exits 0."""

from __future__ import annotations

import select
import signal
import time

import psycopg
import pytest

from tests.cluster import Cluster
from tests.conftest import router_config
from tests.harness import RouterProcess, write_toml


def read_line(proc: RouterProcess, prefix: str, timeout: float = 10.0) -> str:
    """The next line of the router's stdout starting with ``prefix``."""
    assert proc.proc is not None and proc.proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.proc.stdout], [], [], deadline - time.monotonic())
        if not ready:
            break
        line = proc.proc.stdout.readline().decode()
        if line.startswith(prefix):
            return line
        if not line:
            break
    raise AssertionError(f"no line starting with {prefix!r} within {timeout}s")


def test_sighup_reload_keeps_connections(cluster: Cluster, tmp_path) -> None:
    config = router_config(cluster, pool_size=1, query_wait_timeout=0.5)
    path = write_toml(tmp_path / "router.toml", config)
    proc = RouterProcess(path).start()
    try:
        holder = psycopg.connect(proc.dsn("carol"))
        holder.execute("SELECT 1")  # a transaction holds the only server connection
        with pytest.raises(psycopg.errors.TooManyConnections):
            with psycopg.connect(proc.dsn("carol"), autocommit=True) as other:
                other.execute("SELECT 1")
        write_toml(path, {**config, "pool_size": 2, "log_level": "DEBUG", "listen_port": 1})
        proc.proc.send_signal(signal.SIGHUP)
        line = read_line(proc, "reloaded:")
        assert '"pool_size"' in line and '"log_level"' in line
        assert '"listen_port"' in line.split('"restart_required"')[1]  # reported, not applied
        # The held transaction survived, and the bigger pool serves a second client at once.
        assert holder.execute("SELECT 2").fetchone() == (2,)
        with psycopg.connect(proc.dsn("carol"), autocommit=True) as other:
            assert other.execute("SELECT 3").fetchone() == (3,)
        holder.commit()
        holder.close()
    finally:
        proc.stop()


def test_sigterm_drains_then_exits_zero(cluster: Cluster, tmp_path) -> None:
    path = write_toml(tmp_path / "router.toml", router_config(cluster, shutdown_timeout=20))
    proc = RouterProcess(path).start()
    try:
        busy = psycopg.connect(proc.dsn("carol"))
        busy.execute("SELECT 1")  # in a transaction now
        proc.proc.send_signal(signal.SIGTERM)
        # New connections are refused once the listener is closed...
        deadline = time.monotonic() + 10
        while True:
            try:
                psycopg.connect(proc.dsn("carol"), connect_timeout=2).close()
            except psycopg.OperationalError:
                break
            assert time.monotonic() < deadline, "the router kept accepting connections"
            time.sleep(0.05)
        assert proc.proc.poll() is None, "the router exited with a transaction running"
        # ...while the running transaction carries on and commits.
        assert busy.execute("SELECT 41 + 1").fetchone() == (42,)
        busy.commit()
        assert proc.proc.wait(20) == 0
        busy.close()
    finally:
        proc.stop()


def test_post_reload(cluster: Cluster, tmp_path) -> None:
    import json
    import urllib.error
    import urllib.request

    from tests.cluster import free_port

    port = free_port()
    config = router_config(cluster, admin_port=port, admin_token="reload-token")
    path = write_toml(tmp_path / "router.toml", config)
    proc = RouterProcess(path).start()
    try:
        with psycopg.connect(proc.dsn("carol")) as held:
            held.execute("SELECT 1")
            write_toml(path, {**config, "pool_size": 7})

            def post(token: str | None):
                request = urllib.request.Request(f"http://127.0.0.1:{port}/reload", method="POST")
                if token:
                    request.add_header("Authorization", f"Bearer {token}")
                return urllib.request.urlopen(request, timeout=10)

            with pytest.raises(urllib.error.HTTPError) as refused:
                post(None)
            assert refused.value.code == 401
            answer = json.loads(post("reload-token").read())
            assert answer["applied"] == ["pool_size"] and answer["restart_required"] == []
            assert held.execute("SELECT 2").fetchone() == (2,)  # nothing dropped
    finally:
        proc.stop()


def test_reload_adds_and_removes_logins(start_router, cluster: Cluster) -> None:
    """[users] and admin_console_users change with a reload (PgBouncer re-reads its auth_file
    on RELOAD): a login added can log in at once; one removed cannot log in again, while its
    session already open goes on."""
    from router.config import Settings
    from router.protocol.auth import scram_verifier

    router = start_router()
    dave = router.dsn("dave", "dave-pw")
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(dave)
    config = router_config(cluster)
    users = {**config["users"], "dave": {"auth": "scram-sha-256", "password": scram_verifier("dave-pw")}}
    result = router.call(lambda r: r.reload(Settings(**{**config, "users": users, "admin_console_users": ["dave"]})))
    assert result["applied"] == ["admin_console_users", "users"] and result["restart_required"] == []
    with psycopg.connect(dave, autocommit=True) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("postgres",)
    with psycopg.connect(router.dsn("dave", "dave-pw", "pgrouter"), autocommit=True) as console:
        assert console.execute("SHOW VERSION").fetchone()
    open_session = psycopg.connect(dave, autocommit=True)
    router.call(lambda r: r.reload(Settings(**config)))
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(dave)
    assert open_session.execute("SELECT 1").fetchone() == (1,)
    open_session.close()


def test_reload_applies_nothing_that_needs_a_restart(start_router, cluster: Cluster) -> None:
    """A reload that also changes the listen port reports it as needing a restart and does not
    apply it: new logins go on meeting the listener the router started with, not half of the
    new configuration; what is live (pool_size, a cluster removed) applies."""
    from router.config import Settings

    router = start_router(clusters={**router_config(cluster)["clusters"], "spare": router_config(cluster)["clusters"]["main"]})
    config = router_config(cluster)  # without the cluster "spare"
    changed = {**config, "listen_port": 1, "pool_size": 9}
    result = router.call(lambda r: r.reload(Settings(**changed)))
    assert {"pool_size", "clusters.spare"} <= set(result["applied"])  # (and users: each router_config() hashes anew)
    assert result["restart_required"] == ["listen_port"]
    with psycopg.connect(router.dsn("carol"), autocommit=True) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    assert router.call(lambda r: (r.settings.pool_size, r.settings.listen_port, sorted(r.settings.clusters))) == (
        9, 0, ["main"],
    )  # fmt: skip
    # SHOW CONFIG's values: those in effect.
    assert router.call(lambda r: (r.configured_settings.pool_size, r.configured_settings.listen_port)) == (9, 0)


def test_reload_removes_a_cluster_once_its_clients_have_left(start_router, cluster: Cluster) -> None:
    """A cluster removed by a reload, with its entry: new logins to the entry get 3D000, the
    client already in keeps its pool (the same server connection) and the cluster's lag
    monitor; once it leaves, the pool's connections (its min_pool_size ones too) close, the
    monitor stops and the function catalogs read from the cluster are forgotten."""
    from router.config import Settings

    config = router_config(cluster)
    spare = {**router_config(cluster, split=True)["clusters"]["main"]}
    clusters = {**config["clusters"], "spare": spare}
    databases = {
        **config["databases"],
        "gone": {"cluster": "spare", "dbname": "app", "server_user": "pgr_trust", "min_pool_size": 2},
    }
    router = start_router(clusters=clusters, databases=databases)
    held = "SELECT count(*) FROM pg_stat_activity WHERE usename = 'pgr_trust' AND application_name NOT LIKE 'pgrouter-%'"
    with psycopg.connect(cluster.primary.dsn("app"), autocommit=True) as direct:
        gone = psycopg.connect(router.dsn("carol", dbname="gone"), autocommit=True)
        pid = gone.execute("/* pgrouter: primary */ SELECT pg_backend_pid()").fetchone()[0]
        router.wait_for(lambda r: r.splits["spare"].monitor.running, what="spare's lag monitor")
        split = router.call(lambda r: r.splits["spare"])
        assert router.call(lambda r: any(key[0] == "spare" for key in r.catalogs.keys()))
        result = router.call(lambda r: r.reload(Settings(**config)))
        assert {"clusters.spare", "databases.gone"} <= set(result["applied"]) and result["restart_required"] == []
        with pytest.raises(psycopg.OperationalError, match='database "gone" does not exist'):
            psycopg.connect(router.dsn("carol", dbname="gone"))
        # Already in: the same pool and server connection, its cluster's monitor still running,
        # past two janitor passes (which sweep what no client uses).
        passes = router.call(lambda r: r.pools.passes)
        router.wait_for(lambda r: r.pools.passes >= passes + 2, what="two janitor passes")
        for _ in range(3):
            assert gone.execute("/* pgrouter: primary */ SELECT pg_backend_pid()").fetchone() == (pid,)
        assert router.call(lambda r: split.monitor.running and "spare" not in r.splits)
        assert direct.execute(held).fetchone()[0] >= 1
        gone.close()
        router.wait_for(lambda r: not split.monitor.running and not r.leftover_clusters, what="spare's monitor stopped")
        router.wait_for(lambda r: not any(key[0] == "spare" for key in r.catalogs.keys()), what="catalogs forgotten")
        router.wait_for(
            lambda r: not any(p.key.user == "pgr_trust" for p in r.pools.pools.values()), what="the pools dropped"
        )
        deadline = time.monotonic() + 10
        while direct.execute(held).fetchone()[0] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert direct.execute(held).fetchone()[0] == 0
    with psycopg.connect(router.dsn("carol"), autocommit=True) as conn:  # app goes on
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_reload_moves_a_cluster_to_its_new_primary(start_router, cluster: Cluster) -> None:
    """As PgBouncer follows a host changed in its file: a reload naming a new primary for a
    cluster sends the next transactions of clients already connected there, and new logins;
    a transaction running at the reload finishes where it began, and the old node's pool is
    retired once its connections come back. (The new "node" is the same server through its
    Unix socket: inet_server_addr() is NULL there.)"""
    from router.config import Settings

    router = start_router(admin_console_users=["alice"])
    config = router_config(cluster, admin_console_users=["alice"])
    idle = psycopg.connect(router.dsn("carol"), autocommit=True)
    busy = psycopg.connect(router.dsn("carol"), autocommit=True)
    over_tcp = "SELECT inet_server_addr() IS NOT NULL"
    assert idle.execute(over_tcp).fetchone() == (True,)
    busy.execute("BEGIN")
    assert busy.execute(over_tcp).fetchone() == (True,)

    moved = {**config, "clusters": {"main": {"primary": {"host": str(cluster.primary.socket_dir), "port": cluster.primary.port}}}}
    result = router.call(lambda r: r.reload(Settings(**moved)))
    assert "clusters.main" in result["applied"] and result["restart_required"] == []
    assert idle.execute(over_tcp).fetchone() == (False,)  # the same client, on the new node
    # Its function catalog is read from there too.
    assert router.call(lambda r: r.catalogs.reads_from(("main", "app"))) == (str(cluster.primary.socket_dir), cluster.primary.port)
    with psycopg.connect(router.dsn("carol"), autocommit=True) as new:
        assert new.execute(over_tcp).fetchone() == (False,)
    assert busy.execute(over_tcp).fetchone() == (True,)  # its transaction goes on where it began
    busy.execute("COMMIT")
    assert busy.execute(over_tcp).fetchone() == (False,)

    def hosts() -> list[str]:
        return sorted(pool.key.host for pool in router.call(lambda r: list(r.pools.pools.values())))

    router_poll = time.monotonic() + 10
    while hosts() != [str(cluster.primary.socket_dir)]:
        assert time.monotonic() < router_poll, f"the old node's pool is still there: {hosts()}"
        time.sleep(0.05)
    for conn in (idle, busy):
        conn.close()


def test_a_retired_pool_stays_while_a_client_still_uses_it(start_router, cluster: Cluster) -> None:
    """A client that a reload could not move (its database DISABLEd, so no new pool is made
    for it) goes on through its old pool, now retired: the pool closes each connection once
    released and stays in the janitor's care while the client is there, then goes."""
    from router.config import Settings

    router = start_router()
    config = router_config(cluster)
    conn = psycopg.connect(router.dsn("carol"), autocommit=True)
    assert conn.execute("SELECT inet_server_addr() IS NOT NULL").fetchone() == (True,)
    router.call(lambda r: r.database_command("DISABLE", "app"))
    moved = {**config, "clusters": {"main": {"primary": {"host": str(cluster.primary.socket_dir), "port": cluster.primary.port}}}}
    router.call(lambda r: r.reload(Settings(**moved)))
    assert conn.execute("SELECT inet_server_addr() IS NOT NULL").fetchone() == (True,)  # not moved

    def old_pool() -> tuple[bool, int, int]:
        return router.call(
            lambda r: next(
                ((True, len(p.servers), r.pools.passes) for p in r.pools.pools.values() if p.key.host == cluster.primary.host),
                (False, 0, r.pools.passes),
            )
        )

    deadline = time.monotonic() + 10
    while old_pool()[1]:  # its connection is closed once released
        assert time.monotonic() < deadline, "the retired pool kept its connection"
        time.sleep(0.05)
    passes = old_pool()[2]
    while old_pool()[2] < passes + 2:  # two janitor passes with the pool empty
        assert time.monotonic() < deadline + 5
        time.sleep(0.05)
    assert old_pool()[0], "dropped while a client still used it"
    conn.close()
    while old_pool()[0]:
        assert time.monotonic() < deadline + 10, "the retired pool outlived its last client"
        time.sleep(0.05)
    router.call(lambda r: r.database_command("ENABLE", "app"))


def test_reload_moves_a_database_to_another_server_user(start_router, cluster: Cluster) -> None:
    """A [databases] entry whose server_user, then dbname, a reload changes: its connected
    clients' next transactions run there, and the old pool is retired each time."""
    from router.config import Settings

    router = start_router()
    config = router_config(cluster)
    conn = psycopg.connect(router.dsn("carol"), autocommit=True)
    assert conn.execute("SELECT current_user").fetchone() == ("postgres",)
    moved = {**config, "databases": {"app": {**config["databases"]["app"], "server_user": "pgr_trust"}}}
    result = router.call(lambda r: r.reload(Settings(**moved)))
    assert "databases.app" in result["applied"] and result["restart_required"] == []
    assert conn.execute("SELECT current_user").fetchone() == ("pgr_trust",)
    deadline = time.monotonic() + 10
    while router.call(lambda r: sorted(p.key.user for p in r.pools.pools.values())) != ["pgr_trust"]:
        assert time.monotonic() < deadline, "the old server user's pool is still there"
        time.sleep(0.05)
    again = {**moved, "databases": {"app": {**moved["databases"]["app"], "dbname": "postgres"}}}
    assert "databases.app" in router.call(lambda r: r.reload(Settings(**again)))["applied"]
    assert conn.execute("SELECT current_database()").fetchone() == ("postgres",)
    while router.call(lambda r: sorted(p.key.dbname for p in r.pools.pools.values())) != ["postgres"]:
        assert time.monotonic() < deadline + 10, "the old database's pool is still there"
        time.sleep(0.05)
    conn.close()


def test_reload_moves_a_database_to_server_tls(start_router, cluster: Cluster) -> None:
    """An entry given server_tls by a reload: its connected client's next transaction runs
    over TLS, on a new pool, and the plaintext pool is retired."""
    from router.config import Settings

    router = start_router()
    config = router_config(cluster)
    conn = psycopg.connect(router.dsn("carol"), autocommit=True)
    tls_sql = "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
    assert conn.execute(tls_sql).fetchone() == (False,)
    moved = {**config, "databases": {"app": {**config["databases"]["app"], "server_tls": "require"}}}
    result = router.call(lambda r: r.reload(Settings(**moved)))
    assert "databases.app" in result["applied"] and result["restart_required"] == []
    assert conn.execute(tls_sql).fetchone() == (True,)
    deadline = time.monotonic() + 10
    while router.call(lambda r: [p.key.tls for p in r.pools.pools.values()]) != ["require"]:
        assert time.monotonic() < deadline, "the plaintext pool is still there"
        time.sleep(0.05)
    conn.close()


def test_reload_changes_a_database_s_pool_mode_for_new_logins(start_router, cluster: Cluster) -> None:
    """An entry's pool_mode changed by a reload: logins from then on get the new mode, in
    pools of their own (min_pool_size opened); a client already in keeps the mode it logged
    in with, and its pool keeps no connections open for min_pool_size any more."""
    from router.config import Settings

    config = router_config(cluster, databases={"app": {"cluster": "main", "server_user": "postgres", "min_pool_size": 1}})
    router = start_router(databases=config["databases"])
    before = psycopg.connect(router.dsn("carol"), autocommit=True)
    before.execute("SELECT 1")
    changed = {**config, "databases": {"app": {**config["databases"]["app"], "pool_mode": "session"}}}
    result = router.call(lambda r: r.reload(Settings(**changed)))
    assert "databases.app" in result["applied"] and result["restart_required"] == []

    def pools(r) -> list[tuple[str, int, bool]]:
        return sorted((p.key.mode.value, p.settings.min_size, bool(p.servers)) for p in r.pools.pools.values())

    router.wait_for(lambda r: pools(r)[0] == ("session", 1, True), what="the session pool at its minimum")
    assert router.call(pools)[1][:2] == ("transaction", 0)
    after = psycopg.connect(router.dsn("carol"), autocommit=True)
    pid = after.execute("SELECT pg_backend_pid()").fetchone()[0]
    modes = router.call(lambda r: sorted((c.pool_mode.value, c.pool.key.mode.value) for c in r.clients.values()))
    assert modes == [("session", "session"), ("transaction", "transaction")]
    # The session-mode client holds its server connection between transactions.
    assert router.call(lambda r: sum(c.server is not None for c in r.clients.values())) == 1
    assert before.execute("SELECT pg_backend_pid()").fetchone()[0] != pid
    assert after.execute("SELECT pg_backend_pid()").fetchone() == (pid,)
    # Back to transaction mode, and to another server user: both clients move with the entry,
    # each in its own mode; the session-mode one keeps its server connection until it leaves.
    again = {**config, "databases": {"app": {**config["databases"]["app"], "server_user": "pgr_trust"}}}
    assert "databases.app" in router.call(lambda r: r.reload(Settings(**again)))["applied"]
    assert before.execute("SELECT current_user").fetchone() == ("pgr_trust",)
    assert after.execute("SELECT current_user, pg_backend_pid()").fetchone() == ("postgres", pid)
    modes = router.call(lambda r: sorted((c.pool_mode.value, c.pool.key.mode.value, c.pool.key.user) for c in r.clients.values()))
    assert modes == [("session", "session", "pgr_trust"), ("transaction", "transaction", "pgr_trust")]
    before.close()
    after.close()
    # Both gone: the pools no entry makes any more close (the session one it kept too).
    router.wait_for(
        lambda r: sorted((p.key.mode.value, p.key.user) for p in r.pools.pools.values()) == [("transaction", "pgr_trust")],
        what="only the pool the entry makes now",
    )


def test_reload_moves_clients_of_an_entry_whose_pool_mode_changed_too(start_router, cluster: Cluster) -> None:
    """One reload changes an entry's pool_mode and moves it to a cluster added with it (as
    after a failover, to a new primary): the clients already in keep the mode they logged in
    with, but their next transactions run where the entry points now; the pool in that old
    mode is closed once the last of them has left."""
    from router.config import Settings

    config = router_config(cluster, databases={"app": {"cluster": "main", "server_user": "postgres"}})
    router = start_router(databases=config["databases"])
    tcp = "SELECT inet_server_addr() IS NOT NULL, pg_backend_pid()"
    before = psycopg.connect(router.dsn("carol"), autocommit=True)
    assert before.execute(tcp).fetchone()[0] is True
    local = {"primary": {"host": str(cluster.primary.socket_dir), "port": cluster.primary.port}}
    changed = {
        **config,
        "clusters": {**config["clusters"], "local": local},
        "databases": {"app": {"cluster": "local", "server_user": "postgres", "pool_mode": "session"}},
    }
    assert "databases.app" in router.call(lambda r: r.reload(Settings(**changed)))["applied"]
    assert {before.execute(tcp).fetchone()[0] for _ in range(3)} == {False}
    after = psycopg.connect(router.dsn("carol"), autocommit=True)
    assert after.execute(tcp).fetchone()[0] is False

    def pools(r) -> list[tuple[str, str]]:
        return sorted((p.key.mode.value, "tcp" if p.key.host.startswith("127.") else "unix") for p in r.pools.pools.values())

    modes = router.call(lambda r: sorted((c.pool_mode.value, c.pool.key.mode.value) for c in r.clients.values()))
    assert modes == [("session", "session"), ("transaction", "transaction")]
    assert ("transaction", "unix") in router.call(pools)
    before.close()
    router.wait_for(lambda r: pools(r) == [("session", "unix")], what="only the pool the entry makes now")
    assert after.execute(tcp).fetchone()[0] is False
    after.close()


def test_reload_pool_mode_change_closes_replica_pools_opened_after_it(start_router, cluster: Cluster) -> None:
    """With read/write splitting, a client kept in its old pool mode by a reload opens replica
    pools in that mode as its reads go there; they are leftovers as well, closed once it has
    left, so no pool in a mode no entry has outlives its clients."""
    from router.config import Settings

    config = router_config(cluster, split=True)
    router = start_router(clusters=config["clusters"])
    before = psycopg.connect(router.dsn("carol"), autocommit=True)
    session = {**config, "databases": {"app": {**config["databases"]["app"], "pool_mode": "session"}}}
    assert "databases.app" in router.call(lambda r: r.reload(Settings(**session)))["applied"]
    ports = {before.execute("SELECT inet_server_port()").fetchone()[0] for _ in range(40)}
    assert ports == {r.port for r in cluster.replicas}  # both replica pools opened since the reload

    def modes(r) -> list[tuple[str, int]]:
        return sorted((p.key.mode.value, p.key.port) for p in r.pools.pools.values())

    assert [port for mode, port in router.call(modes) if mode == "transaction"] == sorted(
        [cluster.primary.port, *(r.port for r in cluster.replicas)]
    )
    before.close()
    router.wait_for(lambda r: {mode for mode, _ in modes(r)} == {"session"}, what="only session-mode pools")


def test_reload_moves_a_database_to_another_cluster(start_router, cluster: Cluster) -> None:
    """A [databases] entry whose cluster a reload changes takes its connected clients along;
    its other changes follow the same rules (here a live pool_size)."""
    from router.config import Settings

    clusters = {
        **router_config(cluster)["clusters"],
        "local": {"primary": {"host": str(cluster.primary.socket_dir), "port": cluster.primary.port}},
    }
    router = start_router(clusters=clusters)
    config = router_config(cluster, clusters=clusters)
    conn = psycopg.connect(router.dsn("carol"), autocommit=True)
    assert conn.execute("SELECT inet_server_addr() IS NOT NULL").fetchone() == (True,)
    moved = {**config, "databases": {"app": {**config["databases"]["app"], "cluster": "local", "pool_size": 3}}}
    result = router.call(lambda r: r.reload(Settings(**moved)))
    assert "databases.app" in result["applied"] and result["restart_required"] == []
    assert conn.execute("SELECT inet_server_addr() IS NOT NULL").fetchone() == (False,)
    sizes = router.call(lambda r: {p.key.host: p.settings.size for p in r.pools.pools.values()})
    assert sizes[str(cluster.primary.socket_dir)] == 3
    conn.close()


def test_reload_adds_a_replica_to_a_cluster(start_router, cluster: Cluster) -> None:
    """A replica added to a cluster by a reload gets a lag monitor and serves reads once it
    is eligible, to the clients already connected too."""
    from router.config import Settings

    first, second = cluster.replicas
    config = router_config(cluster, split=True)
    one = {"main": {**config["clusters"]["main"], "replicas": [{"host": first.host, "port": first.port}]}}
    router = start_router(split=True, clusters=one)
    conn = psycopg.connect(router.dsn("carol"), autocommit=True)
    assert conn.execute("SELECT 1").fetchone() == (1,)
    result = router.call(lambda r: r.reload(Settings(**config)))
    assert "clusters.main" in result["applied"]
    router.wait_for(
        lambda r: sum(n.eligible for n in r.splits["main"].topology.nodes) == 2, timeout=30, what="both replicas eligible"
    )
    ports = {conn.execute("SELECT inet_server_port()").fetchone()[0] for _ in range(60)}
    assert ports == {first.port, second.port}
    conn.close()


def test_reload_adds_changes_and_removes_databases(start_router, cluster: Cluster) -> None:
    """[databases] with a reload, as PgBouncer's RELOAD: an entry added serves new logins at
    once; a changed pool_size (or query_wait_timeout, reserve_pool_size, server_password,
    max_db_connections) applies to the entry's existing pools; an entry removed refuses new
    logins while its clients go on."""
    from router.config import Settings

    router = start_router()
    config = router_config(cluster)
    with psycopg.connect(router.dsn("carol"), autocommit=True) as conn:
        conn.execute("SELECT 1")  # app's pool exists
    app2 = {"cluster": "main", "dbname": "app", "server_user": "pgr_trust"}

    def reload(databases: dict) -> dict:
        result = router.call(lambda r: r.reload(Settings(**{**config, "databases": databases})))
        result["applied"] = [name for name in result["applied"] if name != "users"]
        return result

    assert reload({**config["databases"], "app2": app2}) == {"applied": ["databases.app2"], "restart_required": []}
    in_app2 = psycopg.connect(router.dsn("carol", dbname="app2"), autocommit=True)
    assert in_app2.execute("SELECT current_user").fetchone() == ("pgr_trust",)
    app = {**config["databases"]["app"], "pool_size": 2, "server_password": "rotated"}
    assert reload({"app": app, "app2": app2}) == {"applied": ["databases.app"], "restart_required": []}

    def app_pool():
        return router.call(
            lambda r: next((p.settings.size, p.password) for p in r.pools.pools.values() if p.key.user == "postgres")
        )

    assert app_pool() == (2, "rotated")
    capped = {**app, "max_db_connections": 1}
    assert reload({"app": capped, "app2": app2}) == {"applied": ["databases.app"], "restart_required": []}
    caps = router.call(lambda r: sorted((cap.name, cap.limit, len(cap.pools)) for cap in r.pools.caps.values()))
    assert caps == [(f"database app on 127.0.0.1:{cluster.primary.port}", 1, 2)]  # app's pool and app2's
    with psycopg.connect(router.dsn("carol"), autocommit=True) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("postgres",)
    assert reload({"app": app}) == {"applied": ["databases.app", "databases.app2"], "restart_required": []}
    assert router.call(lambda r: r.pools.caps) == {}
    with pytest.raises(psycopg.OperationalError, match='database "app2" does not exist'):
        psycopg.connect(router.dsn("carol", dbname="app2"))
    assert in_app2.execute("SELECT 2").fetchone() == (2,)  # already in: goes on
    in_app2.close()
