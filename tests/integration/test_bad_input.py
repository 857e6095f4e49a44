"""Bad input from a client: an ErrorResponse with the right SQLSTATE where the protocol
allows one, the connection closed, one log line, and nobody else affected."""

from __future__ import annotations

import logging
import struct
import threading

import psycopg
import pytest

from router.protocol import messages as m
from router.protocol.framing import frame
from router.protocol.startup import PROTOCOL_3_0, build_gssenc_request
from tests.rawclient import RawClient, raw_packet


@pytest.fixture
def bystander(router):
    """A client in the middle of a transaction while someone else misbehaves."""
    conn = psycopg.connect(router.dsn("carol"), autocommit=True)
    conn.execute("BEGIN")
    conn.execute("CREATE TEMP TABLE bystander_t (x int)")
    conn.execute("INSERT INTO bystander_t VALUES (1)")
    yield conn
    # Its transaction survived whatever happened meanwhile.
    assert conn.execute("SELECT x FROM bystander_t").fetchone() == (1,)
    conn.execute("COMMIT")
    conn.close()


def assert_no_leak(router) -> None:
    # After the bystander finishes, every server connection is idle in its pool.
    router.wait_for(
        lambda r: all(p.stats()["active"] == 0 for p in r.pools.pools.values()),
        what="all server connections back in the pool",
    )


def one_warning(caplog, text: str) -> None:
    lines = [r for r in caplog.records if r.name.startswith("pgrouter") and text in r.getMessage()]
    assert len(lines) == 1, [r.getMessage() for r in caplog.records]


def test_oversized_startup_packet(router, bystander, caplog):
    caplog.set_level(logging.INFO, logger="pgrouter")
    client = RawClient(router.port)
    client.send(raw_packet(20000, struct.pack("!I", PROTOCOL_3_0) + b"user\0carol\0\0"))
    fields = client.error_and_close()
    assert fields["C"] == "08P01"
    assert "startup packet length" in fields["M"]
    one_warning(caplog, "startup packet length")


@pytest.mark.parametrize(
    "body, message",
    [
        (b"user\0carol\0database\0app", "not NUL-terminated"),
        (b"user\0carol\0database\0\0", "without a value"),
        (b"\0carol\0\0", "empty parameter name"),
        (b"user\0\xff\xfe\0\0", "UTF-8"),
    ],
    ids=["unterminated", "name-without-value", "empty-name", "not-utf8"],
)
def test_malformed_startup_packet(router, bystander, caplog, body, message):
    caplog.set_level(logging.INFO, logger="pgrouter")
    payload = struct.pack("!I", PROTOCOL_3_0) + body
    client = RawClient(router.port)
    client.send(raw_packet(len(payload) + 4, payload))
    fields = client.error_and_close()
    assert fields["C"] == "08P01"
    assert message in fields["M"]
    one_warning(caplog, message)


def test_unsupported_protocol_version(router):
    client = RawClient(router.port)
    payload = struct.pack("!I", 2 << 16) + b"user\0carol\0\0"
    client.send(raw_packet(len(payload) + 4, payload))
    fields = client.error_and_close()
    assert fields["C"] == "0A000"


def test_newer_minor_version_gets_negotiate_protocol_version(router):
    client = RawClient(router.port)
    params = b"user\0carol\0database\0app\0_pq_.future_thing\0on\0\0"
    payload = struct.pack("!I", (3 << 16) | 2) + params
    client.send(raw_packet(len(payload) + 4, payload))
    msg = client.recv_message()
    assert msg is not None and msg[0] == b"v"
    assert m.parse_negotiate_protocol_version(msg[1]) == (0, ["_pq_.future_thing"])
    # ... and the session carries on in 3.0.
    assert client.recv_until(b"Z")[-1] == (b"Z", b"I")
    client.send(m.query("SELECT 41 + 1"))
    rows = [body for t, body in client.recv_until(b"Z") if t == b"D"]
    assert rows and rows[0].endswith(b"42")


def test_gssenc_request_is_refused_then_login_works(router):
    client = RawClient(router.port)
    client.send(build_gssenc_request())
    assert client.sock.recv(1) == b"N"
    assert client.login_trust()[-1] == (b"Z", b"I")


def test_message_over_max_message_size(start_router, caplog):
    router = start_router(max_message_size=64 * 1024)
    caplog.set_level(logging.INFO, logger="pgrouter")
    client = RawClient(router.port)
    client.login_trust()
    client.send(m.query("SELECT '" + "x" * 100_000 + "'"))
    fields = client.error_and_close()
    assert fields["C"] == "54000"
    assert "max_message_size" in fields["M"]
    one_warning(caplog, "exceeds max_message_size")
    # A message just under the limit is fine on a new connection.
    other = RawClient(router.port)
    other.login_trust()
    other.send(m.query("SELECT '" + "x" * 60_000 + "'"))
    assert other.recv_until(b"Z")[-1] == (b"Z", b"I")
    assert_no_leak(router)


def test_invalid_message_type_after_login(router, bystander, caplog):
    caplog.set_level(logging.INFO, logger="pgrouter")
    client = RawClient(router.port)
    client.login_trust()
    client.send(frame(b"Z", b"I"))  # a backend-only message type
    fields = client.error_and_close()
    assert fields["C"] == "08P01"
    assert "invalid frontend message type" in fields["M"]
    one_warning(caplog, "invalid frontend message type")


def test_invalid_message_during_authentication(router):
    client = RawClient(router.port)
    client.startup("alice")  # SCRAM: the router now expects a SASLInitialResponse ('p')
    assert client.recv_message()[0] == b"R"
    client.send(m.query("SELECT 1"))
    fields = client.error_and_close()
    assert fields["C"] == "08P01"


def test_silent_client_hits_login_timeout(start_router, caplog):
    router = start_router(client_login_timeout=0.5)
    caplog.set_level(logging.INFO, logger="pgrouter")
    bystander = psycopg.connect(router.dsn("carol"), autocommit=True)
    silent = RawClient(router.port)
    fields = silent.error_and_close()
    assert fields["C"] == "08P01"
    assert "client_login_timeout" in fields["M"]
    one_warning(caplog, "client_login_timeout")
    assert bystander.execute("SELECT 1").fetchone() == (1,)
    bystander.close()


def test_half_finished_authentication_times_out(start_router):
    router = start_router(client_login_timeout=0.5)
    client = RawClient(router.port)
    client.startup("alice")
    assert client.recv_message()[0] == b"R"  # AuthenticationSASL, then silence
    fields = client.error_and_close()
    assert "client_login_timeout" in fields["M"]


def test_many_bad_clients_at_once_do_not_disturb_others(router):
    good = psycopg.connect(router.dsn("carol"), autocommit=True)
    errors: list[str] = []

    def misbehave(i: int) -> None:
        client = RawClient(router.port)
        if i % 2:
            client.send(raw_packet(3, b""))
        else:
            client.login_trust()
            client.send(b"\x00\x00\x00\x00\x00")
        errors.append(client.error_and_close()["C"])

    threads = [threading.Thread(target=misbehave, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for _ in range(50):
        assert good.execute("SELECT 2").fetchone() == (2,)
    for t in threads:
        t.join()
    assert sorted(set(errors)) == ["08P01"] and len(errors) == 20
    good.close()
    assert_no_leak(router)


@pytest.mark.parametrize("value", ["database", "true", "on"])
def test_replication_connection_is_refused(router, bystander, value):
    """A walsender connection (replication=...) cannot be pooled: FATAL 0A000 at login, not a
    normal session that answers IDENTIFY_SYSTEM with a syntax error."""
    client = RawClient(router.port)
    client.startup("carol", replication=value)
    fields = client.error_and_close()
    assert (fields["S"], fields["C"]) == ("FATAL", "0A000")
    assert "replication" in fields["M"]


def test_replication_off_is_a_normal_login(router):
    client = RawClient(router.port)
    client.startup("carol", replication="false")
    assert client.recv_until(b"Z")[-1] == (b"Z", b"I")
