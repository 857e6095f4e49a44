"""Tenants from the Redis registry: login by database name, user.tenant and startup option,
isolation in shared-schema mode (RLS on a real table), pause/resume, delete, several router
instances, and Redis going away. Records are written with RedisStore directly (the admin API
has tests of its own)."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Iterator

import psycopg
import pytest

from router.registry.crypto import Keyring, generate_key
from router.registry.models import TenantCreate
from router.registry.store import RedisStore
from tests.cluster import Cluster, free_port
from tests.harness import RouterThread, login_error

SERVER_USER, SERVER_PASSWORD = "pgr_scram", "scram-pw"


@pytest.fixture(scope="module")
def tenant_dbs(cluster: Cluster) -> dict[str, str]:
    """Two tenant databases, and a shared one with an RLS-protected table owned by another role."""
    dbs = {"acme": "tenant_acme", "globex": "tenant_globex"}
    for db in [*dbs.values(), "tenants_shared"]:
        if cluster.psql(f"SELECT 1 FROM pg_database WHERE datname = '{db}'") != "1":
            cluster.psql(f"CREATE DATABASE {db} OWNER {SERVER_USER}")
    cluster.psql(
        """
        DO $$ BEGIN
          IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'rls_owner') THEN CREATE ROLE rls_owner; END IF;
          IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'rls_app') THEN
            CREATE ROLE rls_app LOGIN PASSWORD 'rls-pw' NOBYPASSRLS NOSUPERUSER;
          END IF;
        END $$;
        DROP TABLE IF EXISTS notes;
        CREATE TABLE notes (tenant_id uuid NOT NULL, body text);
        ALTER TABLE notes OWNER TO rls_owner;
        ALTER TABLE notes ENABLE ROW LEVEL SECURITY;
        CREATE POLICY tenant_isolation ON notes
          USING (tenant_id = current_setting('app.current_tenant')::uuid);
        GRANT SELECT, INSERT ON notes TO rls_app;
        """,
        dbname="tenants_shared",
    )
    cluster.wait_replay()
    return dbs


@pytest.fixture
def registry(cluster: Cluster) -> Iterator[tuple[str, str, str]]:
    """(redis_url, secret_key, prefix): a registry namespace of this test's own."""
    yield cluster.redis_url, f"k1:{generate_key()}", f"pgr-test-{uuid.uuid4().hex[:8]}:"


def run(coro):
    return asyncio.run(coro)


async def _store_call(registry, fn):
    url, key, prefix = registry
    store = RedisStore.from_url(url, Keyring.from_specs(key), prefix=prefix)
    try:
        return await fn(store)
    finally:
        await store.close()


def store_do(registry, fn):
    return run(_store_call(registry, fn))


def tenant_body(cluster: Cluster, tenant_id: str, database: str, users: dict[str, str], **extra) -> TenantCreate:
    return TenantCreate(
        tenant_id=tenant_id,
        cluster={"primary": {"host": cluster.primary.host, "port": cluster.primary.port},
                 "tls": extra.pop("tls", "disable")},
        database=database,
        server_user=extra.pop("server_user", SERVER_USER),
        server_password=extra.pop("server_password", SERVER_PASSWORD),
        users=[{"name": name, "password": pw} for name, pw in users.items()],
        **extra,
    )


@pytest.fixture
def tenant_router(start_router, registry, cluster, tenant_dbs) -> RouterThread:
    url, key, prefix = registry
    store_do(registry, lambda s: s.create(tenant_body(cluster, "acme", tenant_dbs["acme"], {"alice": "alice-t"})))
    store_do(registry, lambda s: s.create(tenant_body(cluster, "globex", tenant_dbs["globex"], {"bob": "bob-t"})))
    return start_router(redis_url=url, secret_key=key, registry_prefix=prefix)


def dsn(router: RouterThread, user: str, password: str, db: str, **params) -> str:
    return router.dsn(user, password, db, **params)


def test_login_by_database_user_suffix_and_option(tenant_router: RouterThread, tenant_dbs) -> None:
    for conninfo in (
        dsn(tenant_router, "alice", "alice-t", "acme"),
        dsn(tenant_router, "alice.acme", "alice-t", "whatever"),
        dsn(tenant_router, "alice", "alice-t", "whatever", options="-c%20pgrouter.tenant%3Dacme"),
    ):
        with psycopg.connect(conninfo, autocommit=True) as conn:
            assert conn.execute("SELECT current_database(), current_user").fetchone() == (
                tenant_dbs["acme"], SERVER_USER,
            )


@pytest.mark.parametrize("suffix", ["db.test", None], ids=["sni", "sni-off"])
def test_login_by_tls_server_name(start_router, registry, cluster, tenant_dbs, client_cert, suffix) -> None:
    """tenant_sni_suffix: a client that connects to host acme.db.test over TLS (libpq sends
    the host name as SNI) logs into tenant acme, whatever database it names; a host name that
    names no tenant leaves the other ways. The startup option still comes first."""
    url, key, prefix = registry
    store_do(registry, lambda s: s.create(tenant_body(cluster, "acme", tenant_dbs["acme"], {"alice": "alice-t"})))
    store_do(registry, lambda s: s.create(tenant_body(cluster, "globex", tenant_dbs["globex"], {"bob": "bob-t"})))
    router = start_router(
        redis_url=url, secret_key=key, registry_prefix=prefix, tenant_sni_suffix=suffix,
        client_tls="require", client_tls_cert=str(client_cert / "cert.pem"), client_tls_key=str(client_cert / "key.pem"),
    )  # fmt: skip

    def database(host: str, user: str, password: str, dbname: str, **params) -> str:
        conninfo = psycopg.conninfo.make_conninfo(
            host=host, hostaddr="127.0.0.1", port=router.port, user=user, password=password, dbname=dbname,
            sslmode="verify-full", sslrootcert=str(client_cert / "ca.pem"), **params,
        )  # fmt: skip
        with psycopg.connect(conninfo, autocommit=True) as conn:
            return conn.execute("SELECT current_database()").fetchone()[0]

    if suffix is None:
        with pytest.raises(psycopg.OperationalError, match='database "whatever" does not exist'):
            database("acme.db.test", "alice", "alice-t", "whatever")
        return
    assert database("acme.db.test", "alice", "alice-t", "whatever") == tenant_dbs["acme"]
    assert database("GLOBEX.db.test", "bob", "bob-t", "whatever") == tenant_dbs["globex"]
    # No such tenant, or not under the suffix: the user name or the database decides.
    assert database("nosuch.db.test", "alice.acme", "alice-t", "whatever") == tenant_dbs["acme"]
    assert database("localhost", "bob", "bob-t", "globex") == tenant_dbs["globex"]
    assert database("acme.other.db.test", "bob", "bob-t", "globex") == tenant_dbs["globex"]
    # The startup option names the tenant before the host does.
    assert database("acme.db.test", "bob", "bob-t", "x", options="-c pgrouter.tenant=globex") == tenant_dbs["globex"]
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        database("acme.db.test", "bob", "bob-t", "globex")  # tenant acme has no bob


def test_allowed_cidrs_refuse_other_addresses_after_the_password(tenant_router: RouterThread, registry) -> None:
    """limits.allowed_cidrs: a login from outside the list fails with 28000, but only once its
    password is proven (a wrong one still gets 28P01, as from anywhere); the tenant's other
    clients and other tenants are not touched, and a change applies to the next login."""
    from router.registry.models import TenantPatch

    connected = psycopg.connect(dsn(tenant_router, "alice", "alice-t", "acme"), autocommit=True)

    def limit(cidrs: list[str]) -> None:
        patch = TenantPatch.model_validate({"limits": {"allowed_cidrs": cidrs}})
        tenant = store_do(registry, lambda s: s.patch("acme", patch))
        tenant_router.wait_for(
            lambda r: [str(n) for n in r.tenants.cache.cached("acme").limits.allowed_cidrs] == cidrs,
            what="the router sees the new allowed_cidrs",
        )
        assert [str(n) for n in tenant.limits.allowed_cidrs] == cidrs

    limit(["10.0.0.0/8", "2001:db8::/32"])
    code, message = login_error(dsn(tenant_router, "alice", "alice-t", "acme"))
    assert code == "28000" and '"127.0.0.1"' in message and "allowed_cidrs" in message
    assert login_error(dsn(tenant_router, "alice", "wrong", "acme"))[0] == "28P01"
    assert connected.execute("SELECT 1").fetchone() == (1,)  # connected before: kept
    with psycopg.connect(dsn(tenant_router, "bob", "bob-t", "globex")) as other:
        assert other.execute("SELECT 1").fetchone() == (1,)
    limit(["127.0.0.0/8"])
    with psycopg.connect(dsn(tenant_router, "alice", "alice-t", "acme")) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    connected.close()


def test_a_tenant_s_pool_min_size(start_router, registry, cluster, tenant_dbs) -> None:
    """pool.min_size of a tenant's record: once its first client has logged in (the pool
    exists), the pool keeps that many server connections open, whatever min_pool_size says."""
    url, key, prefix = registry
    body = tenant_body(cluster, "acme", tenant_dbs["acme"], {"alice": "alice-t"}, pool={"size": 4, "min_size": 3})
    store_do(registry, lambda s: s.create(body))
    router = start_router(redis_url=url, secret_key=key, registry_prefix=prefix, min_pool_size=1)
    with psycopg.connect(dsn(router, "alice", "alice-t", "acme")) as conn:
        conn.execute("SELECT 1")
    router.wait_for(lambda r: [len(p.servers) for p in r.pools.pools.values() if p.key.dbname == tenant_dbs["acme"]] == [3],
                    what="the tenant's pool at its min_size")


def test_a_tenant_s_new_pool_size_applies_to_its_pool(tenant_router: RouterThread, registry, tenant_dbs) -> None:
    """PATCH pool.size / pool.min_size / limits.query_wait_timeout: the tenant's existing pool
    follows at once (clients stay connected), not only pools opened later."""
    from router.registry.models import TenantPatch

    conn = psycopg.connect(dsn(tenant_router, "alice", "alice-t", "acme"), autocommit=True)
    conn.execute("SELECT 1")

    def settings(r) -> list[tuple[int, int, float]]:
        return [
            (p.settings.size, p.settings.min_size, p.settings.query_wait_timeout)
            for p in r.pools.pools.values() if p.key.dbname == tenant_dbs["acme"]
        ]  # fmt: skip

    assert tenant_router.call(settings) == [(20, 0, 120.0)]
    patch = TenantPatch.model_validate({"pool": {"size": 3, "min_size": 2}, "limits": {"query_wait_timeout": 7}})
    store_do(registry, lambda s: s.patch("acme", patch))
    tenant_router.wait_for(lambda r: settings(r) == [(3, 2, 7.0)], what="the pool following the record")
    assert conn.execute("SELECT 2").fetchone() == (2,)
    conn.close()


def test_a_tenant_s_raised_pool_size_serves_its_waiting_client_at_once(
    start_router, registry, cluster, tenant_dbs
) -> None:
    """PATCH pool.size up while a client waits for the tenant's full pool: it gets a server
    connection at once, not when the busy one is released."""
    from router.registry.models import TenantPatch

    url, key, prefix = registry
    body = tenant_body(cluster, "acme", tenant_dbs["acme"], {"alice": "alice-t"}, pool={"size": 1})
    store_do(registry, lambda s: s.create(body))
    router = start_router(redis_url=url, secret_key=key, registry_prefix=prefix)
    holder, waiter = (psycopg.connect(dsn(router, "alice", "alice-t", "acme"), autocommit=True) for _ in range(2))
    holder.execute("BEGIN")
    holder.execute("SELECT 1")
    got: list = []
    thread = threading.Thread(target=lambda: got.append(waiter.execute("SELECT 2").fetchone()))
    thread.start()
    router.wait_for(lambda r: [len(p.waiters) for p in r.pools.pools.values() if p.key.dbname == tenant_dbs["acme"]] == [1],
                    what="the client waiting for the tenant's pool")
    store_do(registry, lambda s: s.patch("acme", TenantPatch.model_validate({"pool": {"size": 2}})))
    thread.join(timeout=10)
    assert got == [(2,)], "the raised pool.size should have served the waiting client"
    holder.execute("COMMIT")
    for conn in (holder, waiter):
        conn.close()


def test_a_tenant_s_max_db_connections_caps_its_pools_together(start_router, registry, cluster, tenant_dbs) -> None:
    """limits.max_db_connections: the tenant's pools (one per login here, auth_query) hold at
    most that many server connections together on a node, though each pool's size allows
    more. A client of a pool at the cap waits and gets the slot a sibling pool's released
    connection frees; PATCHing the cap up serves a waiting client at once."""
    from router.registry.models import TenantPatch

    for role in ("pgr_cap_a", "pgr_cap_b"):
        cluster.psql(
            f"DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{role}') THEN "
            f"CREATE ROLE {role} LOGIN PASSWORD '{role}-pw'; END IF; END $$"
        )
    url, key, prefix = registry
    store_do(registry, lambda s: s.create(TenantCreate(
        tenant_id="capped",
        cluster={"primary": {"host": cluster.primary.host, "port": cluster.primary.port}},
        database=tenant_dbs["acme"], server_user="postgres", auth_query=True,
        pool={"size": 2}, limits={"max_db_connections": 2, "query_wait_timeout": 60},
    )))  # fmt: skip
    router = start_router(redis_url=url, secret_key=key, registry_prefix=prefix)
    a1, a2, b1, b2 = (
        psycopg.connect(dsn(router, role, f"{role}-pw", "capped"), autocommit=True)
        for role in ("pgr_cap_a", "pgr_cap_a", "pgr_cap_b", "pgr_cap_b")
    )
    held = "SELECT count(*) FROM pg_stat_activity WHERE usename IN ('pgr_cap_a', 'pgr_cap_b')"

    def waiting(r) -> list[tuple[str, int]]:
        return sorted((p.key.user, len(p.waiters)) for p in r.pools.pools.values() if p.key.user.startswith("pgr_cap_"))

    def in_thread(conn, sql: str) -> tuple[threading.Thread, list]:
        got: list = []
        thread = threading.Thread(target=lambda: got.append(conn.execute(sql).fetchone()))
        thread.start()
        return thread, got

    with psycopg.connect(cluster.primary.dsn(tenant_dbs["acme"]), autocommit=True) as direct:
        for conn in (a1, a2):
            conn.execute("BEGIN")
            conn.execute("SELECT 1")  # pgr_cap_a's pool: both of the tenant's connections
        thread, got = in_thread(b1, "SELECT current_user")
        router.wait_for(lambda r: ("pgr_cap_b", 1) in waiting(r), what="pgr_cap_b's client waiting at the cap")
        assert direct.execute(held).fetchone() == (2,)
        a1.execute("COMMIT")  # released while pgr_cap_b's client waits: the slot goes to it
        thread.join(timeout=10)
        assert got == [("pgr_cap_b",)]
        assert direct.execute(held).fetchone() == (2,)
        b1.execute("BEGIN")
        b1.execute("SELECT 1")  # a2 and b1 hold the two
        thread, got = in_thread(b2, "SELECT 2")
        router.wait_for(lambda r: ("pgr_cap_b", 1) in waiting(r), what="pgr_cap_b's second client waiting")
        store_do(registry, lambda s: s.patch("capped", TenantPatch.model_validate({"limits": {"max_db_connections": 3}})))
        thread.join(timeout=10)
        assert got == [(2,)], "the raised cap should have served the waiting client"
        assert direct.execute(held).fetchone() == (3,)
    for conn in (a2, b1):
        conn.execute("COMMIT")
    for conn in (a1, a2, b1, b2):
        conn.close()


def test_a_tenant_s_reserve_pool(start_router, registry, cluster, tenant_dbs) -> None:
    """pool.reserve_size: a client of the tenant that has waited reserve_pool_timeout for its
    full pool gets a connection beyond pool.size (the global reserve being 0); a PATCH sets
    the existing pool's reserve at once."""
    from router.registry.models import TenantPatch

    url, key, prefix = registry
    body = tenant_body(
        cluster, "acme", tenant_dbs["acme"], {"alice": "alice-t"},
        pool={"size": 1, "reserve_size": 1}, limits={"query_wait_timeout": 3},
    )  # fmt: skip
    store_do(registry, lambda s: s.create(body))
    router = start_router(redis_url=url, secret_key=key, registry_prefix=prefix, reserve_pool_timeout=0.2)
    holder, second = (psycopg.connect(dsn(router, "alice", "alice-t", "acme"), autocommit=True) for _ in range(2))
    holder.execute("BEGIN")
    holder_pid = holder.execute("SELECT pg_backend_pid()").fetchone()[0]
    assert second.execute("SELECT pg_backend_pid()").fetchone()[0] != holder_pid  # the reserve's
    holder.execute("COMMIT")

    def reserves(r) -> list[int]:
        return [p.settings.reserve_size for p in r.pools.pools.values() if p.key.dbname == tenant_dbs["acme"]]

    assert router.call(reserves) == [1]
    store_do(registry, lambda s: s.patch("acme", TenantPatch.model_validate({"pool": {"reserve_size": 3}})))
    router.wait_for(lambda r: reserves(r) == [3], what="the PATCHed reserve")
    store_do(registry, lambda s: s.patch("acme", TenantPatch.model_validate({"pool": {"reserve_size": None}})))
    router.wait_for(lambda r: reserves(r) == [0], what="the global reserve again")
    for conn in (holder, second):
        conn.close()


def test_a_tenant_s_patch_resizes_its_pools_on_replicas_too(start_router, registry, cluster, tenant_dbs) -> None:
    """A tenant with replicas: PATCHing pool.size and limits.max_db_connections reaches the
    pools its reads opened on the replicas, not only its primary's."""
    from router.registry.models import TenantPatch

    url, key, prefix = registry
    body = TenantCreate(
        tenant_id="acme",
        cluster={"primary": {"host": cluster.primary.host, "port": cluster.primary.port},
                 "replicas": [{"host": r.host, "port": r.port} for r in cluster.replicas]},
        database=tenant_dbs["acme"], server_user=SERVER_USER, server_password=SERVER_PASSWORD,
        users=[{"name": "alice", "password": "alice-t"}], pool={"size": 1},
    )  # fmt: skip
    store_do(registry, lambda s: s.create(body))
    router = start_router(redis_url=url, secret_key=key, registry_prefix=prefix)
    with psycopg.connect(dsn(router, "alice", "alice-t", "acme"), autocommit=True) as conn:
        replica_ports = {r.port for r in cluster.replicas}
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:  # reads reach a replica once the monitor finds it eligible
            if conn.execute("SELECT inet_server_port()").fetchone()[0] in replica_ports:
                break
        else:
            raise AssertionError("no read reached a replica")

        def sizes(r) -> dict[bool, set[tuple[int, int]]]:
            out: dict[bool, set[tuple[int, int]]] = {}
            for p in r.pools.pools.values():
                if p.key.dbname == tenant_dbs["acme"]:
                    limits = {cap.limit for cap in p.caps} or {0}
                    out.setdefault(p.key.port in replica_ports, set()).add((p.settings.size, max(limits)))
            return out

        assert router.call(sizes) == {False: {(1, 0)}, True: {(1, 0)}}
        patch = {"pool": {"size": 3}, "limits": {"max_db_connections": 2}}
        store_do(registry, lambda s: s.patch("acme", TenantPatch.model_validate(patch)))
        router.wait_for(lambda r: sizes(r) == {False: {(3, 2)}, True: {(3, 2)}}, what="every pool resized and capped")


def test_unknown_tenant_wrong_password_and_cross_tenant_login(tenant_router: RouterThread) -> None:
    code, message = login_error(dsn(tenant_router, "alice", "alice-t", "nosuch"))
    assert code == "3D000" and "nosuch" in message
    assert login_error(dsn(tenant_router, "alice", "wrong", "acme"))[0] == "28P01"
    # Tenant A's user trying tenant B's database.
    assert login_error(dsn(tenant_router, "alice", "alice-t", "globex"))[0] == "28P01"
    # And the router still serves everyone else.
    with psycopg.connect(dsn(tenant_router, "bob", "bob-t", "globex")) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_shared_schema_isolation(start_router, registry, cluster, tenant_dbs) -> None:
    url, key, prefix = registry
    keys = {"t1": uuid.uuid4(), "t2": uuid.uuid4()}
    for tid, tkey in keys.items():
        store_do(registry, lambda s, tid=tid, tkey=tkey: s.create(tenant_body(
            cluster, tid, "tenants_shared", {f"user_{tid}": "pw"}, mode="shared", tenant_key=tkey,
            server_user="rls_app", server_password="rls-pw", pool={"size": 1},
        )))
        cluster.psql(f"INSERT INTO notes VALUES ('{tkey}', 'note of {tid}')", dbname="tenants_shared")
    router = start_router(redis_url=url, secret_key=key, registry_prefix=prefix)
    c1 = psycopg.connect(dsn(router, "user_t1", "pw", "t1"), autocommit=True)
    c2 = psycopg.connect(dsn(router, "user_t2", "pw", "t2"), autocommit=True)
    try:
        pids = set()
        for _ in range(5):
            for conn, tid in ((c1, "t1"), (c2, "t2")):
                rows = conn.execute("SELECT body, pg_backend_pid() FROM notes").fetchall()
                assert [r[0] for r in rows] == [f"note of {tid}"]
                pids.add(rows[0][1])
        assert len(pids) == 1, "the two tenants were not served by the same server connection"
        # One pool, but each tenant's traffic is its own (SHOW STATS rows by tenant id).
        counts = router.call(lambda r: {name: t.xact_count for name, t in r.pools.traffic.items()})
        assert counts == {"t1": 5, "t2": 5}
        # The client cannot change the setting...
        for sql in (
            f"SET app.current_tenant = '{keys['t2']}'",
            "SET LOCAL app.current_tenant = 'x'",
            "RESET app.current_tenant",
            f"SELECT set_config('app.current_tenant', '{keys['t2']}', false)",
            "SELECT 1; RESET ALL",
            "DO $$ BEGIN PERFORM set_config('app.current_tenant', 'x', false); END $$",
            # Names built at run time: no text names them, so DO, CALL and the creation of
            # functions (which could run such code, or carry a SET of the setting) are refused
            # whatever they say.
            "DO $$ BEGIN EXECUTE format('SELECT %s(%L, %L, false)', 'set_' || 'config', "
            f"'app.current_' || 'tenant', '{keys['t2']}'); END $$",
            "CREATE FUNCTION pg_temp.peek() RETURNS SETOF notes LANGUAGE sql "
            f"SET app.current_tenant = '{keys['t2']}' AS 'SELECT * FROM notes'",
            "create or replace procedure pg_temp.p() language plpgsql as $$ begin null; end $$",
            # Unicode escapes: neither the function nor the setting is named in the text.
            f"SELECT U&\"set\\005fconfig\"(U&'app.current\\005ftenant', '{keys['t2']}', false)",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                c1.execute(sql)
            assert [r[0] for r in c1.execute("SELECT body FROM notes").fetchall()] == ["note of t1"]
        # Those words elsewhere refuse nothing.
        assert c1.execute("SELECT 'what do you call a function or a procedure?'").fetchone() is not None
        # ...and a lone RESET ALL / DISCARD ALL between transactions is put right at once.
        c1.execute("RESET ALL")
        assert [r[0] for r in c1.execute("SELECT body FROM notes").fetchall()] == ["note of t1"]
        c1.execute("DISCARD ALL")
        assert [r[0] for r in c1.execute("SELECT body FROM notes").fetchall()] == ["note of t1"]
        # Other settings are the client's own.
        c1.execute("SET search_path = public")
        assert [r[0] for r in c2.execute("SELECT body FROM notes").fetchall()] == ["note of t2"]
    finally:
        c1.close()
        c2.close()


def test_pause_and_resume(tenant_router: RouterThread, registry) -> None:
    with psycopg.connect(dsn(tenant_router, "alice", "alice-t", "acme"), autocommit=True) as conn:
        store_do(registry, lambda s: s.pause("acme"))
        tenant_router.wait_for(lambda r: "acme" in r.tenants.gates, timeout=2, what="the pause to arrive")
        done = threading.Event()
        result = []

        def query() -> None:
            result.append(conn.execute("SELECT 42").fetchone()[0])
            done.set()

        thread = threading.Thread(target=query, daemon=True)
        thread.start()
        tenant_router.wait_for(lambda r: len(r.tenants.gates["acme"].waiters) == 1, what="the query to wait")
        assert not done.is_set()
        store_do(registry, lambda s: s.resume("acme"))
        assert done.wait(5), "the waiting transaction was not released by resume"
        assert result == [42]


def test_delete_closes_the_tenants_connections(tenant_router: RouterThread, registry) -> None:
    acme = psycopg.connect(dsn(tenant_router, "alice", "alice-t", "acme"), autocommit=True)
    globex = psycopg.connect(dsn(tenant_router, "bob", "bob-t", "globex"), autocommit=True)
    try:
        acme.execute("SELECT 1")
        store_do(registry, lambda s: s.delete("acme"))
        tenant_router.wait_for(lambda r: not r.tenants.clients.get("acme"), timeout=5,
                               what="acme's clients to be closed")
        with pytest.raises(psycopg.OperationalError):
            acme.execute("SELECT 1")
        assert globex.execute("SELECT 1").fetchone() == (1,)
        assert login_error(dsn(tenant_router, "alice", "alice-t", "acme"))[0] == "3D000"
    finally:
        acme.close()
        globex.close()


def test_two_instances_see_a_new_tenant_at_once(start_router, registry, cluster, tenant_dbs) -> None:
    url, key, prefix = registry
    r1 = start_router(redis_url=url, secret_key=key, registry_prefix=prefix)
    r2 = start_router(redis_url=url, secret_key=key, registry_prefix=prefix)
    for r in (r1, r2):  # an earlier miss must not hide the tenant once it exists
        assert login_error(dsn(r, "carl", "carl-pw", "initech"))[0] == "3D000"
    store_do(registry, lambda s: s.create(tenant_body(cluster, "initech", tenant_dbs["acme"], {"carl": "carl-pw"})))
    created = time.monotonic()
    deadline = created + 5
    while True:
        try:
            with psycopg.connect(dsn(r2, "carl", "carl-pw", "initech")) as conn:
                conn.execute("SELECT 1")
            break
        except psycopg.OperationalError:
            assert time.monotonic() < deadline, "the other instance never saw the new tenant"
            time.sleep(0.01)
    print(f"new tenant routable through the other instance after {1000 * (time.monotonic() - created):.0f} ms")
    conns = [psycopg.connect(dsn(r, "carl", "carl-pw", "initech"), autocommit=True) for r in (r1, r2)]
    try:
        store_do(registry, lambda s: s.delete("initech"))
        for r in (r1, r2):
            r.wait_for(lambda rt: not rt.tenants.clients.get("initech"), timeout=5, what="initech closed")
        for conn in conns:
            with pytest.raises(psycopg.OperationalError):
                conn.execute("SELECT 1")
    finally:
        for conn in conns:
            conn.close()


def test_redis_down_known_tenants_keep_working(tenant_router: RouterThread, cluster: Cluster) -> None:
    with psycopg.connect(dsn(tenant_router, "alice", "alice-t", "acme"), autocommit=True) as held:
        cluster.stop_redis()
        try:
            tenant_router.wait_for(lambda r: r.tenants.cache.stale, timeout=10, what="the cache to notice")
            assert held.execute("SELECT 1").fetchone() == (1,)  # nothing connected is dropped
            with psycopg.connect(dsn(tenant_router, "alice", "alice-t", "acme")) as again:
                assert again.execute("SELECT 2").fetchone() == (2,)  # cached tenant, new login
            code, message = login_error(dsn(tenant_router, "bob", "bob-t", "globex-uncached"))
            assert code == "57P03" and "registry" in message.lower(), (code, message)
        finally:
            cluster.start_redis()
        tenant_router.wait_for(lambda r: not r.tenants.cache.stale, timeout=15, what="the cache to resync")
        assert held.execute("SELECT 3").fetchone() == (3,)


def _on_nodes(nodes: dict, tenant_id: str, database: str, user: str, **limits) -> TenantCreate:
    return TenantCreate(
        tenant_id=tenant_id, cluster=nodes, database=database, server_user=SERVER_USER,
        server_password=SERVER_PASSWORD, users=[{"name": user, "password": "pw"}], limits=limits,
    )  # fmt: skip


def test_a_tenant_s_replica_fallback(start_router, registry, cluster, tenant_dbs) -> None:
    """limits.replica_fallback is the tenant's own: two tenants on the same nodes, whose only
    replica is down; the one with ``error`` gets 57P03 naming it for its reads (its writes and
    its connection are unaffected), the other reads from the primary. A PATCH applies to the
    connected client."""
    from router.registry.models import TenantPatch

    url, key, prefix = registry
    nodes = {"primary": {"host": cluster.primary.host, "port": cluster.primary.port},
             "replicas": [{"host": "127.0.0.1", "port": free_port()}]}  # nothing listens there  # fmt: skip
    for tenant_id, user, fallback in [("strict", "sam", "error"), ("lenient", "lee", "primary")]:
        body = _on_nodes(nodes, tenant_id, tenant_dbs["acme"], user, replica_fallback=fallback)
        store_do(registry, lambda s, body=body: s.create(body))
    router = start_router(redis_url=url, secret_key=key, registry_prefix=prefix)
    read = "SELECT pg_is_in_recovery()"
    with (
        psycopg.connect(dsn(router, "sam", "pw", "strict"), autocommit=True) as strict,
        psycopg.connect(dsn(router, "lee", "pw", "lenient"), autocommit=True) as lenient,
    ):
        for _ in range(3):
            with pytest.raises(psycopg.errors.CannotConnectNow, match='tenant "strict" can serve reads: every replica is down'):
                strict.execute(read)
            assert lenient.execute(read).fetchone() == (False,)
        with strict.transaction():  # a read-write transaction runs on the primary
            assert strict.execute(read).fetchone() == (False,)
        store_do(registry, lambda s: s.patch("strict", TenantPatch.model_validate({"limits": {"replica_fallback": "primary"}})))
        router.wait_for(lambda r: all(c.tenant.limits.replica_fallback == "primary" for c in r.clients.values()),
                        what="the PATCH to reach the connected client")  # fmt: skip
        assert strict.execute(read).fetchone() == (False,)


def test_a_tenant_s_replica_affinity(start_router, registry, cluster, tenant_dbs) -> None:
    """limits.replica_affinity is the tenant's own: on the same two replicas, a client of the
    tenant with ``session`` keeps to one while they are equally idle; the other tenant's
    client reads from both."""
    url, key, prefix = registry
    nodes = {"primary": {"host": cluster.primary.host, "port": cluster.primary.port},
             "replicas": [{"host": r.host, "port": r.port} for r in cluster.replicas]}  # fmt: skip
    for tenant_id, user, affinity in [("sticky", "sid", "session"), ("roving", "rob", "transaction")]:
        body = _on_nodes(nodes, tenant_id, tenant_dbs["acme"], user, replica_affinity=affinity)
        store_do(registry, lambda s, body=body: s.create(body))
    router = start_router(redis_url=url, secret_key=key, registry_prefix=prefix)
    replicas = {r.port for r in cluster.replicas}
    with (
        psycopg.connect(dsn(router, "sid", "pw", "sticky"), autocommit=True) as sticky,
        psycopg.connect(dsn(router, "rob", "pw", "roving"), autocommit=True) as roving,
    ):
        router.wait_for(lambda r: all(len(s.topology.eligible_replicas()) == 2 for s in r.splits.values()),
                        what="both replicas eligible")  # fmt: skip
        ports = lambda conn: {conn.execute("SELECT inet_server_port()").fetchone()[0] for _ in range(60)}  # noqa: E731
        assert len(ports(sticky)) == 1 and ports(sticky) <= replicas
        assert ports(roving) == replicas  # (all 60 on one replica: p = 2^-59)


def test_a_tenant_s_read_your_writes(start_router, registry, cluster, tenant_dbs) -> None:
    """limits.read_your_writes = tenant overrides the global session scope for that tenant: a
    row one of its sessions inserts is seen at once by another of its sessions, with a replica
    lagging; PATCHed back to null (the global session scope), the other session does miss
    rows there, which is what the setting prevented."""
    from router.registry.models import TenantPatch

    url, key, prefix = registry
    database = tenant_dbs["acme"]
    with psycopg.connect(cluster.primary.dsn(database), autocommit=True) as direct:
        direct.execute("CREATE TABLE IF NOT EXISTS ryw_rows (id int PRIMARY KEY)")
        direct.execute("ALTER TABLE ryw_rows OWNER TO pgr_scram")
        direct.execute("TRUNCATE ryw_rows")
    cluster.wait_replay()
    nodes = {"primary": {"host": cluster.primary.host, "port": cluster.primary.port},
             "replicas": [{"host": r.host, "port": r.port} for r in cluster.replicas]}  # fmt: skip
    body = _on_nodes(nodes, "causal", database, "cas", read_your_writes="tenant", max_replica_lag=3600)
    store_do(registry, lambda s: s.create(body))
    router = start_router(redis_url=url, secret_key=key, registry_prefix=prefix)
    lagging = cluster.replicas[0]
    seen_sql = "SELECT EXISTS (SELECT FROM ryw_rows WHERE id = %s), inet_server_port()"
    with (
        psycopg.connect(dsn(router, "cas", "pw", "causal"), autocommit=True) as writer,
        psycopg.connect(dsn(router, "cas", "pw", "causal"), autocommit=True) as reader,
    ):
        deadline = time.monotonic() + 20
        while reader.execute("SELECT pg_is_in_recovery()").fetchone() != (True,):  # the monitor is up
            assert time.monotonic() < deadline, "reads never reached a replica"
        cluster.psql("SELECT pg_wal_replay_pause()", node=lagging)
        try:
            for i in range(200):
                writer.execute("INSERT INTO ryw_rows VALUES (%s)", (i,))
                seen, port = reader.execute(seen_sql, (i,)).fetchone()
                assert seen and port != lagging.port, f"row {i} not seen by the tenant's other session"
            patch = TenantPatch.model_validate({"limits": {"read_your_writes": None}})
            store_do(registry, lambda s: s.patch("causal", patch))
            router.wait_for(lambda r: all(c.tenant.limits.read_your_writes is None for c in r.clients.values()),
                            what="the PATCH to reach the connected clients")  # fmt: skip
            stale = 0
            for i in range(200, 400):
                writer.execute("INSERT INTO ryw_rows VALUES (%s)", (i,))
                stale += not reader.execute(seen_sql, (i,)).fetchone()[0]
            assert stale > 0
        finally:
            cluster.psql("SELECT pg_wal_replay_resume()", node=lagging)


def test_tenant_limits(start_router, registry, cluster, tenant_dbs) -> None:
    """Per-tenant query_wait_timeout, max_client_conn and statements_per_second."""
    url, key, prefix = registry
    store_do(registry, lambda s: s.create(tenant_body(
        cluster, "limited", tenant_dbs["acme"], {"lim": "lim-pw"}, pool={"size": 1},
        limits={"query_wait_timeout": 0.3, "max_client_conn": 3, "statements_per_second": 20},
    )))
    router = start_router(redis_url=url, secret_key=key, registry_prefix=prefix)
    conns = [psycopg.connect(dsn(router, "lim", "lim-pw", "limited"), autocommit=True) for _ in range(3)]
    try:
        assert login_error(dsn(router, "lim", "lim-pw", "limited"))[0] == "53300"  # max_client_conn
        conns[0].execute("BEGIN")
        conns[0].execute("SELECT 1")  # holds the only server connection
        started = time.monotonic()
        with pytest.raises(psycopg.errors.TooManyConnections, match="query_wait_timeout"):
            conns[1].execute("SELECT 1")
        assert time.monotonic() - started < 5  # the tenant's 0.3 s, not the global 10 s
        conns[0].execute("COMMIT")
        ok = limited = 0
        for _ in range(100):
            try:
                conns[2].execute("SELECT 1")
                ok += 1
            except psycopg.errors.ConfigurationLimitExceeded:
                limited += 1
        # A burst of 100 at 20/s: about a second's worth passes, the rest get 53400.
        assert limited > 0 and 10 <= ok < 60, (ok, limited)
    finally:
        for conn in conns:
            conn.close()


def test_auth_query_logs_in_as_the_client_without_its_password(start_router, registry, cluster, tenant_dbs) -> None:
    """auth_query: the client's verifier comes from pg_authid; the router then logs into the
    server as that user (scram-sha-256 in pg_hba for pgr_scram) with the SCRAM keys learnt
    from the client's exchange. The router never sees the password."""
    url, key, prefix = registry
    store_do(registry, lambda s: s.create(TenantCreate(
        tenant_id="aq",
        cluster={"primary": {"host": cluster.primary.host, "port": cluster.primary.port},
                 "replicas": [{"host": r.host, "port": r.port} for r in cluster.replicas]},
        database=tenant_dbs["acme"], server_user="postgres", auth_query=True,
    )))
    router = start_router(redis_url=url, secret_key=key, registry_prefix=prefix)
    with psycopg.connect(dsn(router, SERVER_USER, SERVER_PASSWORD, "aq"), autocommit=True) as conn:
        assert conn.execute("SELECT current_user, current_database()").fetchone() == (SERVER_USER, tenant_dbs["acme"])
        for _ in range(20):  # reads on replicas log in the same way
            assert conn.execute("SELECT current_user").fetchone() == (SERVER_USER,)
        with conn.transaction():
            assert conn.execute("SELECT current_user, pg_is_in_recovery()").fetchone() == (SERVER_USER, False)
    passwords = router.call(lambda r: [p.password for p in r.pools.pools.values() if p.key.user == SERVER_USER])
    assert passwords and all(p is None for p in passwords)
    assert login_error(dsn(router, SERVER_USER, "wrong", "aq"))[0] == "28P01"
    assert login_error(dsn(router, "no_such_role", "x", "aq"))[0] == "28P01"


def test_wrong_secret_key_fails_closed(start_router, registry, cluster, tenant_dbs) -> None:
    url, key, prefix = registry
    store_do(registry, lambda s: s.create(tenant_body(cluster, "sealed", tenant_dbs["acme"], {"sue": "sue-pw"})))
    router = start_router(redis_url=url, secret_key=f"k1:{generate_key()}", registry_prefix=prefix)
    code, message = login_error(dsn(router, "sue", "sue-pw", "sealed"))
    assert code is not None and "decrypt" in message and "sealed" in message, (code, message)
    # The right key still opens it, on another instance.
    good = start_router(redis_url=url, secret_key=key, registry_prefix=prefix)
    with psycopg.connect(dsn(good, "sue", "sue-pw", "sealed")) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_delete_lets_a_running_transaction_finish(start_router, registry, cluster, tenant_dbs) -> None:
    url, key, prefix = registry
    store_do(registry, lambda s: s.create(tenant_body(cluster, "leaving", tenant_dbs["acme"], {"lou": "lou-pw"})))
    router = start_router(redis_url=url, secret_key=key, registry_prefix=prefix, tenant_drop_timeout=10)
    conn = psycopg.connect(dsn(router, "lou", "lou-pw", "leaving"))
    try:
        conn.execute("SELECT 1")  # a transaction is open
        store_do(registry, lambda s: s.delete("leaving"))
        router.wait_for(lambda r: "leaving" in r.tenants.gates, what="the deletion to arrive")
        assert conn.execute("SELECT 2").fetchone() == (2,)  # still running...
        conn.commit()  # ...and it commits
        router.wait_for(lambda r: not r.tenants.clients.get("leaving"), timeout=5, what="the client closed")
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 3")
    finally:
        conn.close()


def test_tenant_cluster_tls_and_fallback_tenant(start_router, registry, cluster, tenant_dbs) -> None:
    """A tenant's own TLS setting reaches its server connections (pgr_scram_tls may only log
    in over TLS); the fallback tenant "*" serves database names no tenant claims, under the
    requested name."""
    url, key, prefix = registry
    store_do(registry, lambda s: s.create(tenant_body(
        cluster, "secure", tenant_dbs["acme"], {"sec": "sec-pw"},
        server_user="pgr_scram_tls", server_password="scram-tls-pw", tls="require",
    )))
    store_do(registry, lambda s: s.create(tenant_body(cluster, "*", "unused", {"any": "any-pw"})))
    router = start_router(redis_url=url, secret_key=key, registry_prefix=prefix)
    with psycopg.connect(dsn(router, "sec", "sec-pw", "secure")) as conn:
        assert conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone() == (True,)
    with psycopg.connect(dsn(router, "any", "any-pw", tenant_dbs["globex"])) as conn:
        assert conn.execute("SELECT current_database()").fetchone() == (tenant_dbs["globex"],)


def test_tenant_move_under_load(start_router, registry, cluster, tenant_dbs) -> None:
    """POST /tenants/{id}/move to another database while a client runs transactions: it sees
    a short wait and no error, and its later transactions land in the new database."""
    import json
    import urllib.request

    for db in tenant_dbs.values():
        cluster.psql("CREATE TABLE IF NOT EXISTS moves (id int)", dbname=db)
    url, key, prefix = registry
    store_do(registry, lambda s: s.create(tenant_body(cluster, "mover", tenant_dbs["acme"], {"mo": "mo-pw"})))
    router = start_router(redis_url=url, secret_key=key, registry_prefix=prefix,
                          admin_port=0, admin_token="move-token")
    admin_port = router.call(lambda r: r.admin.port)
    seen: list[str] = []
    errors: list[Exception] = []
    stop = threading.Event()

    def run() -> None:
        with psycopg.connect(dsn(router, "mo", "mo-pw", "mover"), autocommit=True) as conn:
            i = 0
            while not stop.is_set():
                i += 1
                try:
                    with conn.transaction():
                        conn.execute("INSERT INTO moves VALUES (%s)", (i,))
                        seen.append(conn.execute("SELECT current_database()").fetchone()[0])
                except psycopg.Error as exc:
                    errors.append(exc)
                    return

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while len(seen) < 50 and time.monotonic() < deadline:
        time.sleep(0.01)
    request = urllib.request.Request(
        f"http://127.0.0.1:{admin_port}/tenants/mover/move", method="POST",
        data=json.dumps({"database": tenant_dbs["globex"]}).encode(),
        headers={"Authorization": "Bearer move-token", "Content-Type": "application/json"},
    )
    started = time.monotonic()
    answer = json.loads(urllib.request.urlopen(request, timeout=30).read())
    moved_in = time.monotonic() - started
    assert answer["database"] == tenant_dbs["globex"] and answer["paused"] is False
    before = len(seen)
    while len(seen) < before + 50 and time.monotonic() < deadline + 10 and not errors:
        time.sleep(0.01)
    stop.set()
    thread.join(10)
    assert not errors, errors
    switch = [i for i in range(1, len(seen)) if seen[i] != seen[i - 1]]
    assert seen[0] == tenant_dbs["acme"] and seen[-1] == tenant_dbs["globex"] and len(switch) == 1, switch
    print(f"tenant moved in {moved_in * 1000:.0f} ms under load, {len(seen)} transactions, no errors")


def test_a_tenant_s_new_pool_mode_applies_to_new_logins(tenant_router: RouterThread, registry, tenant_dbs) -> None:
    """PATCH pool.mode: logins from then on get the new mode, in a pool of their own;
    a client already in keeps the mode it logged in with, and the old mode's pool keeps no
    connections open for min_size."""
    from router.registry.models import TenantPatch

    before = psycopg.connect(dsn(tenant_router, "alice", "alice-t", "acme"), autocommit=True)
    before.execute("SELECT 1")
    store_do(registry, lambda s: s.patch("acme", TenantPatch.model_validate({"pool": {"mode": "session", "min_size": 1}})))
    tenant_router.wait_for(
        lambda r: all(c.tenant.pool.mode == "session" for c in r.clients.values() if c.tenant is not None),
        what="the new record",
    )
    after = psycopg.connect(dsn(tenant_router, "alice", "alice-t", "acme"), autocommit=True)
    pid = after.execute("SELECT pg_backend_pid()").fetchone()[0]

    def modes(r) -> list[tuple[str, bool, int]]:
        return sorted((c.pool.key.mode.value, c.session_mode, c.pool.settings.min_size) for c in r.clients.values())

    assert tenant_router.call(modes) == [("session", True, 1), ("transaction", False, 0)]
    # The session-mode client holds its server connection between transactions; the other
    # one runs beside it on another.
    assert tenant_router.call(lambda r: sum(c.server is not None for c in r.clients.values())) == 1
    assert before.execute("SELECT pg_backend_pid()").fetchone()[0] != pid
    assert after.execute("SELECT pg_backend_pid()").fetchone() == (pid,)
    before.close()
    after.close()
