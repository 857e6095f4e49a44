"""The real-cluster harness itself: processes, replication, auth methods, TLS, Redis, shutdown."""

import os
import time

import psycopg
import pytest
import redis

from tests.cluster import SERVER_USERS, Cluster


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie has exited; it just awaits its reaper
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with Cluster(tmp_path_factory.mktemp("cluster")) as c:
        yield c


def test_roles_and_streaming(cluster):
    assert cluster.psql("SELECT pg_is_in_recovery()") == "f"
    for replica in cluster.replicas:
        assert cluster.psql("SELECT pg_is_in_recovery()", replica) == "t"
    streaming = cluster.psql(
        "SELECT application_name FROM pg_stat_replication WHERE state = 'streaming'")
    assert sorted(streaming.split()) == ["replica1", "replica2"]


def test_start_is_idempotent(cluster):
    pids = [n.pid() for n in cluster.nodes]
    cluster.start()
    assert [n.pid() for n in cluster.nodes] == pids


def test_row_reaches_replicas_after_wait_replay(cluster):
    cluster.psql("CREATE TABLE harness_t (v text); INSERT INTO harness_t VALUES ('hello')")
    cluster.wait_replay()
    for replica in cluster.replicas:
        assert cluster.psql("SELECT v FROM harness_t", replica) == "hello"


def _insert_offset(cluster) -> int:
    """Where in its 8 KiB WAL page the primary will insert the next record."""
    return int(cluster.psql("SELECT pg_current_wal_insert_lsn()").split("/")[1], 16) % 8192


def test_wait_replay_when_the_last_record_ends_a_page(cluster):
    """With the last record ending exactly at a page boundary, the insert position lies past
    the next page's header (…0018) and no replayed record ends there until another is written:
    wait_replay must still return on an idle primary (it once waited out its timeout)."""
    emit = "SELECT pg_logical_emit_message(false, 'harness', repeat('a', {}))"
    offset = _insert_offset(cluster)
    cluster.psql(emit.format(100))
    overhead = _insert_offset(cluster) - offset - 100  # a message record's size beyond its text
    adjust = 0
    for _ in range(200):
        offset = _insert_offset(cluster)
        if offset == 24:  # SizeOfXLogShortPHD: the page before ended with a record
            break
        if offset < 200 and offset != 24:
            adjust += offset - 24  # the last aim overshot the boundary by this much
        size = 8192 - offset - overhead - adjust
        cluster.psql(emit.format(size if 0 <= size <= 4000 else 3000))
    else:
        pytest.fail("could not end a record at a page boundary")
    cluster.wait_replay(timeout=5)


def test_pgbench_tables_on_replicas(cluster):
    assert cluster.psql("SELECT count(*) FROM pgbench_accounts", cluster.replicas[0],
                        dbname="app") == "100000"


@pytest.mark.parametrize("user", sorted(SERVER_USERS))
def test_server_user_logs_in_over_tcp(cluster, user):
    for node in cluster.nodes:
        with psycopg.connect(node.dsn(user=user, password=SERVER_USERS[user])) as conn:
            assert conn.execute("SELECT current_user").fetchone() == (user,)
    # Read/write grants let test users run pgbench against `app`.
    with psycopg.connect(cluster.primary.dsn("app", user, SERVER_USERS[user])) as conn:
        conn.execute("UPDATE pgbench_branches SET bbalance = bbalance WHERE bid = 1")


@pytest.mark.parametrize("user", ["pgr_scram", "pgr_scram_tls", "pgr_md5", "pgr_password"])
def test_wrong_password_is_refused(cluster, user):
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(cluster.primary.dsn(user=user, password="wrong"))


def test_tls_only_user_is_refused_without_tls(cluster):
    dsn = cluster.primary.dsn(user="pgr_scram_tls", password=SERVER_USERS["pgr_scram_tls"])
    with pytest.raises(psycopg.OperationalError, match="pg_hba.conf rejects"):
        psycopg.connect(dsn, sslmode="disable")


def test_tls_verify_full(cluster):
    for node in cluster.nodes:
        dsn = node.dsn(user="pgr_scram_tls", password=SERVER_USERS["pgr_scram_tls"])
        with psycopg.connect(dsn, sslmode="verify-full",
                             sslrootcert=str(cluster.ca_cert_path)) as conn:
            ssl = conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
            assert ssl.fetchone() == (True,)


def test_redis_stop_and_restart(cluster):
    client = redis.Redis.from_url(cluster.redis_url)
    assert client.ping()
    cluster.stop_redis()
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(cluster.redis_url).ping()
    cluster.stop_redis()  # already stopped: no error
    cluster.start_redis()
    assert redis.Redis.from_url(cluster.redis_url).ping()


def test_stop_leaves_no_process_and_start_again(cluster):
    """Last in the module: it stops the shared cluster (the fixture's stop is then a no-op)."""
    pids = [n.pid() for n in cluster.nodes] + [cluster.redis_pid()]
    assert all(pids)
    cluster.stop()
    cluster.stop()
    assert not any(alive(pid) for pid in pids)
    cluster.start()  # same data and ports, replicas streaming again
    assert cluster.psql("SELECT v FROM harness_t", cluster.replicas[1]) == "hello"
    pids = [n.pid() for n in cluster.nodes] + [cluster.redis_pid()]
    cluster.stop()
    assert not any(alive(pid) for pid in pids)


def test_reuse_keeps_data_and_leaves_others_processes(tmp_path):
    base = tmp_path / "dev"
    first = Cluster(base, replicas=1, redis=False, ssl=False, pgbench_scale=None, reuse=True)
    with first:
        first.psql("CREATE TABLE marker (v int); INSERT INTO marker VALUES (42)")
        first.wait_replay()
        # A second user of the same directory attaches; its stop() leaves first's servers up.
        attached = Cluster(base, reuse=True).start()
        assert attached.primary.port == first.primary.port
        attached.stop()
        assert all(n.is_running() for n in first.nodes)
    assert not any(n.is_running() for n in first.nodes)

    t0 = time.monotonic()
    with Cluster(base, reuse=True) as again:
        assert time.monotonic() - t0 < 10  # reused, not re-created
        assert [r.name for r in again.replicas] == ["replica1"]  # stored layout wins
        assert again.psql("SELECT v FROM marker", again.replicas[0]) == "42"
    assert not any(n.is_running() for n in again.nodes)


def test_fresh_dir_required_without_reuse(tmp_path):
    (tmp_path / "stray").write_text("")
    with pytest.raises(RuntimeError, match="not empty"):
        Cluster(tmp_path, redis=False).start()
