"""Client authentication (scram-sha-256, md5, trust), server authentication (SCRAM with and
without channel binding, md5, cleartext, trust), TLS on both sides."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import time

import asyncpg
import psycopg
import pytest
import trustme

from tests.cluster import SERVER_USERS
from tests.conftest import CLIENT_USERS, users_config
from tests.harness import login_error
from tests.rawclient import RawClient


@pytest.mark.parametrize("user", sorted(CLIENT_USERS))
def test_client_auth_right_password(router, user):
    _, password = CLIENT_USERS[user]
    with psycopg.connect(router.dsn(user, password)) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


@pytest.mark.parametrize("user", ["alice", "bob"])
def test_client_auth_wrong_password(router, user):
    with pytest.raises(psycopg.OperationalError) as exc:
        psycopg.connect(router.dsn(user, "wrong"))
    assert f'password authentication failed for user "{user}"' in str(exc.value)


def _verifier(password: str, iterations: int) -> str:
    """What PostgreSQL 16 stores with scram_iterations = ``iterations`` (RFC 5802, section 3)."""
    salt = os.urandom(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    server_key = hmac.new(salted, b"Server Key", "sha256").digest()
    b64 = lambda raw: base64.b64encode(raw).decode()  # noqa: E731
    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(hashlib.sha256(client_key).digest())}:{b64(server_key)}"


async def test_client_auth_with_a_verifier_below_4096_iterations(start_router):
    """PostgreSQL accepts any scram_iterations from 1 up, and libpq and asyncpg log in with
    whatever count the server sends: so does a router holding such a verifier."""
    users = {**users_config(), "dave": {"auth": "scram-sha-256", "password": _verifier("dave-pw", 1024)}}
    router = start_router(users=users)
    with psycopg.connect(router.dsn("dave", "dave-pw")) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    conn = await asyncpg.connect(router.dsn("dave", "dave-pw"))
    try:
        assert await conn.fetchval("SELECT 2") == 2
    finally:
        await conn.close()
    with pytest.raises(psycopg.OperationalError, match='password authentication failed for user "dave"'):
        psycopg.connect(router.dsn("dave", "wrong"))


def test_a_login_s_allowed_cidrs(start_router, cluster):
    """users.NAME.allowed_cidrs: a login from outside the list fails with 28000 once its
    password is proven (a wrong one still gets 28P01); other logins are not touched; a reload
    changes the list for the next login."""
    users = users_config()
    users["alice"]["allowed_cidrs"] = ["10.0.0.0/8", "2001:db8::/32"]
    router = start_router(users=users)
    code, message = login_error(router.dsn("alice", "alice-pw"))
    assert code == "28000" and message == 'host "127.0.0.1" is not in user "alice"\'s allowed_cidrs'
    assert login_error(router.dsn("alice", "wrong"))[0] == "28P01"
    assert login_error(router.dsn("bob", "bob-pw")) == (None, "connected")
    from router.config import Settings
    from tests.conftest import router_config

    users["alice"]["allowed_cidrs"] = ["127.0.0.0/8"]
    router.call(lambda r: r.reload(Settings(**router_config(cluster, users=users))))
    assert login_error(router.dsn("alice", "alice-pw")) == (None, "connected")


def test_unknown_user_looks_like_a_wrong_password(router):
    with pytest.raises(psycopg.OperationalError) as exc:
        psycopg.connect(router.dsn("mallory", "whatever"))
    assert 'password authentication failed for user "mallory"' in str(exc.value)


def test_unknown_database_is_3d000(router):
    with pytest.raises(psycopg.OperationalError) as exc:
        psycopg.connect(router.dsn("carol", dbname="nope"))
    assert 'database "nope" does not exist' in str(exc.value)


def test_unknown_database_comes_after_authentication_ok(router):
    """As from PostgreSQL: authentication succeeds, then the database is looked up."""
    raw = RawClient(router.port)
    raw.startup("carol", "nope")
    assert raw.recv_message() == (b"R", b"\0\0\0\0")  # AuthenticationOk
    fields = raw.error_and_close()
    assert fields["C"] == "3D000"


def test_authentication_ok_comes_with_the_session_greeting(start_router):
    """AuthenticationOk, ParameterStatus, BackendKeyData and ReadyForQuery go out in one write:
    one wakeup of the client per login. The first login to a pool waits for a server
    connection, so an AuthenticationOk written on its own would reach the client first."""
    router = start_router()
    raw = RawClient(router.port)
    raw.startup("carol", "app")
    first = raw.sock.recv(65536)
    assert first.startswith(b"R\0\0\0\x08\0\0\0\0"), first
    assert first.endswith(b"Z\0\0\0\x05I"), first
    raw.close()


@pytest.mark.parametrize("server_user", ["pgr_scram", "pgr_md5", "pgr_password", "pgr_trust"])
def test_server_auth_methods(start_router, server_user):
    router = start_router(
        databases={"app": {"cluster": "main", "server_user": server_user, "server_password": SERVER_USERS[server_user]}}
    )
    with psycopg.connect(router.dsn("carol")) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (server_user,)


@pytest.mark.parametrize("server_user", ["pgr_scram", "pgr_md5", "pgr_password"])
def test_server_auth_wrong_password_reaches_the_client(start_router, server_user):
    router = start_router(
        databases={"app": {"cluster": "main", "server_user": server_user, "server_password": "wrong"}}
    )
    with pytest.raises(psycopg.OperationalError) as exc:
        psycopg.connect(router.dsn("carol"))
    assert "password authentication failed" in str(exc.value)


ODD_PASSWORD = "odd\x1fpw\u0085"  # a control character and a C.2.2 one: SASLprep refuses both


def test_passwords_saslprep_refuses_work_as_on_postgresql(start_router, cluster):
    """A password SASLprep refuses (a control character, say): PostgreSQL and libpq derive
    the SCRAM keys from its bytes as they are, where scramp refuses it. The router's verifier
    of it is the one PostgreSQL stores (same salt and iterations), a client logs in with it
    through libpq, and the router logs into PostgreSQL with it as a server password."""
    from router.protocol.auth import ScramVerifier, saslprep_fails, scram_verifier

    assert saslprep_fails(ODD_PASSWORD)
    quoted = ODD_PASSWORD.replace("'", "''")
    cluster.psql(f"ALTER ROLE pgr_scram PASSWORD '{quoted}'")
    try:
        stored = cluster.psql("SELECT rolpassword FROM pg_authid WHERE rolname = 'pgr_scram'")
        parsed = ScramVerifier.parse(stored)
        assert scram_verifier(ODD_PASSWORD, parsed.iterations, parsed.salt) == stored
        users = {**users_config(), "odd": {"auth": "scram-sha-256", "password": scram_verifier(ODD_PASSWORD)}}
        router = start_router(
            users=users, databases={"app": {"cluster": "main", "server_user": "pgr_scram", "server_password": ODD_PASSWORD}}
        )
        with psycopg.connect(host="127.0.0.1", port=router.port, user="odd", password=ODD_PASSWORD, dbname="app") as conn:
            assert conn.execute("SELECT current_user").fetchone() == ("pgr_scram",)
        assert login_error(f"postgresql://odd:oddpw@127.0.0.1:{router.port}/app")[0] == "28P01"
    finally:
        cluster.psql(f"ALTER ROLE pgr_scram PASSWORD '{SERVER_USERS['pgr_scram']}'")


def _tls_server_user_router(start_router, cluster, **tls):
    return start_router(
        databases={"app": {"cluster": "main", "server_user": "pgr_scram_tls", "server_password": SERVER_USERS["pgr_scram_tls"]}},
        **tls,
    )


@pytest.mark.parametrize("binding", ["prefer", "disable", "require"])
def test_server_scram_over_tls_with_and_without_channel_binding(start_router, cluster, binding):
    router = _tls_server_user_router(start_router, cluster, server_tls="require", server_channel_binding=binding)
    with psycopg.connect(router.dsn("carol")) as conn:
        assert conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone() == (True,)
    bound = router.call(lambda r: [s.channel_bound for p in r.pools.pools.values() for s in p.servers])
    assert bound == [binding != "disable"]


def test_server_tls_verify_full(start_router, cluster):
    router = _tls_server_user_router(start_router, cluster, server_tls="verify-full", server_tls_ca=str(cluster.ca_cert_path))
    with psycopg.connect(router.dsn("carol")) as conn:
        assert conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone() == (True,)


def test_server_tls_verify_full_rejects_unknown_ca(start_router, cluster, tmp_path):
    other_ca = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other_ca))
    router = _tls_server_user_router(start_router, cluster, server_tls="verify-full", server_tls_ca=str(other_ca))
    # At once, with the reason (not after query_wait_timeout, 10 s here, naming the pool only).
    started = time.monotonic()
    with pytest.raises(psycopg.OperationalError, match="TLS with server .* failed: certificate verify failed"):
        psycopg.connect(router.dsn("carol"))
    assert time.monotonic() - started < 5


def test_server_tls_disabled_cannot_reach_hostssl_user(start_router, cluster):
    router = _tls_server_user_router(start_router, cluster, server_tls="disable")
    with pytest.raises(psycopg.OperationalError) as exc:
        psycopg.connect(router.dsn("carol"))
    assert "no encryption" in str(exc.value)


def _tls_router(start_router, client_cert, mode):
    return start_router(
        client_tls=mode,
        client_tls_cert=str(client_cert / "cert.pem"),
        client_tls_key=str(client_cert / "key.pem"),
    )


def test_client_tls_require(start_router, client_cert):
    router = _tls_router(start_router, client_cert, "require")
    dsn = router.dsn("alice", "alice-pw", sslmode="verify-full", sslrootcert=str(client_cert / "ca.pem"))
    with psycopg.connect(dsn) as conn:
        assert conn.pgconn.ssl_in_use
        assert conn.execute("SELECT 1").fetchone() == (1,)
    with pytest.raises(psycopg.OperationalError) as exc:
        psycopg.connect(router.dsn("alice", "alice-pw", sslmode="disable"))
    assert "TLS is required" in str(exc.value)


def test_client_tls_allow_takes_both(start_router, client_cert):
    router = _tls_router(start_router, client_cert, "allow")
    with psycopg.connect(router.dsn("carol", sslmode="require")) as conn:
        assert conn.pgconn.ssl_in_use
    with psycopg.connect(router.dsn("carol", sslmode="disable")) as conn:
        assert not conn.pgconn.ssl_in_use


def test_client_tls_disable_refuses_sslrequest(router):
    with pytest.raises(psycopg.OperationalError) as exc:
        psycopg.connect(router.dsn("carol", sslmode="require"))
    assert "server does not support SSL" in str(exc.value)
    with psycopg.connect(router.dsn("carol", sslmode="prefer")) as conn:
        assert not conn.pgconn.ssl_in_use
