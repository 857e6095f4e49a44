"""Function catalogs across a failover: read from the cluster's current primary (issue 3).

The old primary is stopped and a replica promoted, so this runs on a cluster of its own
(module-scoped). Waits are polls with deadlines, never sleeps.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import psycopg
import pytest

from router.config import Settings
from router.routing.functions import STABLE, VOLATILE
from router.routing.verdict import Reason
from tests.cluster import Cluster, Node
from tests.conftest import router_config
from tests.harness import RouterThread

KEY = ("main", "app")  # the catalog of database app in cluster main (DatabaseRoute.catalog_key)
WHERE = "SELECT {call}, pg_is_in_recovery(), inet_server_port()"
DEADLINE = 20.0  # seconds for a failover, a replay or a catalog load on a loaded machine


@pytest.fixture(scope="module")
def failover_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    base = tmp_path_factory.mktemp("catalog_failover")
    with Cluster(base, replicas=2, redis=False, ssl=False, pgbench_scale=None) as cluster:
        yield cluster


def poll(condition, what: str, timeout: float = DEADLINE) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.05)


def follow(cluster: Cluster, standby: Node, primary: Node) -> None:
    """Point a standby at another primary (primary_conninfo reloads without a restart; the
    default recovery_target_timeline = latest follows the promoted node's timeline)."""
    conninfo = (f"host={primary.socket_dir} port={primary.port} user=postgres "
                f"application_name={standby.name}")
    cluster.psql(f"ALTER SYSTEM SET primary_conninfo = '{conninfo}'", node=standby)
    cluster.psql("SELECT pg_reload_conf()", node=standby)


def test_catalog_reloads_from_the_promoted_primary(failover_cluster: Cluster) -> None:
    cluster = failover_cluster
    old_primary, promoted, follower = cluster.primary, *cluster.replicas
    cluster.psql("CREATE FUNCTION f_flip() RETURNS int LANGUAGE sql STABLE AS 'SELECT 1'", dbname="app")
    cluster.wait_replay()
    # Reloads only when asked (invalidate): the refresh timer must not do it behind our back.
    # Read-your-writes off: a volatile call would send the session's next reads to the primary.
    settings = Settings(**router_config(cluster, split=True, lag_check_interval=0.25,
                                        function_catalog_refresh=600, read_your_writes="off"))
    router = RouterThread(settings).start()
    topology = lambda r: r.splits["main"].topology  # noqa: E731
    node = lambda r, n: topology(r).node(n.host, n.port)  # noqa: E731
    try:
        router.wait_for(lambda r: len(topology(r).eligible_replicas()) == 2, timeout=DEADLINE,
                        what="both replicas eligible")
        with psycopg.connect(router.dsn("carol"), autocommit=True) as conn:
            # The first client of the database registers its catalog; f_flip is STABLE there.
            conn.execute("SELECT 1")
            router.wait_for(lambda r: r.catalogs.stats(KEY).loads >= 1, timeout=DEADLINE,
                            what="the first catalog load")
            assert router.call(lambda r: r.catalogs.get(KEY).volatility("f_flip")) == STABLE
            assert conn.execute(WHERE.format(call="f_flip()")).fetchone()[1] is True

            old_primary.stop()
            promoted.promote()
            follow(cluster, follower, promoted)
            router.wait_for(lambda r: topology(r).primary is node(r, promoted), timeout=DEADLINE,
                            what="the promoted replica to become the primary")

            # Changes the configured primary never saw: a new VOLATILE function, and f_flip
            # turned VOLATILE (while the follower, a replica, still takes reads).
            cluster.psql(
                """
                CREATE FUNCTION f_new() RETURNS int LANGUAGE sql VOLATILE AS 'SELECT 2';
                ALTER FUNCTION f_flip() VOLATILE;
                """,
                node=promoted,
                dbname="app",
            )
            lsn = cluster.psql("SELECT pg_current_wal_insert_lsn()", node=promoted)
            poll(lambda: cluster.psql(f"SELECT pg_last_wal_replay_lsn() >= '{lsn}'", node=follower) == "t",
                 "the follower to replay the new primary's changes")
            router.wait_for(lambda r: node(r, follower).eligible, timeout=DEADLINE,
                            what="the follower to serve reads again")

            before = router.call(lambda r: r.catalogs.stats(KEY).loads)
            router.call(lambda r: r.catalogs.invalidate(KEY))
            try:
                router.wait_for(lambda r: r.catalogs.stats(KEY).loads > before, timeout=DEADLINE)
            except AssertionError:
                pytest.fail(f"no catalog reload succeeded: {router.call(lambda r: r.catalogs.stats(KEY))}")
            stats = router.call(lambda r: r.catalogs.stats(KEY))
            assert stats.source == (promoted.host, promoted.port), stats
            assert router.call(lambda r: r.catalogs.get(KEY).volatility("f_new")) == VOLATILE

            # Routed by the new catalog: a volatile function (not merely an unknown one) goes to
            # the primary, and so does f_flip, which the old catalog would send to the follower.
            assert conn.execute(WHERE.format(call="f_new()")).fetchone() == (2, False, promoted.port)
            route = lambda r: next(  # noqa: E731
                route for (name, key), route in r.db_routes.items() if (name, key.dbname, key.user) == ("main", "app", "postgres")
            )
            verdict = router.call(lambda r: route(r).verdicts.verdict(b"SELECT f_new()"))
            assert verdict.reason is Reason.VOLATILE_FUNCTION, verdict
            assert conn.execute(WHERE.format(call="f_flip()")).fetchone() == (1, False, promoted.port)
            # ... while plain reads still go to the follower.
            assert conn.execute(WHERE.format(call="1")).fetchone() == (1, True, follower.port)
    finally:
        router.stop()
