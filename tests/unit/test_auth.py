"""SCRAM-SHA-256 and md5 glue (PostgreSQL docs, 55.3.1 "SCRAM-SHA-256", 55.7
AuthenticationMD5Password; RFC 5802, RFC 7677, RFC 5929).

The SCRAM computations are re-done here with hashlib/hmac, independently of scramp, and
checked against the RFC 7677 test vector first so that the reference itself is trusted.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from router.protocol import messages as m
from router.protocol.auth import (
    SCRAM_ITERATIONS,
    SCRAM_SHA_256,
    SCRAM_SHA_256_PLUS,
    AuthFailed,
    ScramClientExchange,
    ScramKeysClientExchange,
    ScramServerExchange,
    ScramVerifier,
    is_scram_verifier,
    md5_check,
    md5_hash,
    md5_response,
    saslprep_fails,
    scram_verifier,
    tls_server_end_point,
)
from router.protocol.errors import ProtocolError


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _hmac(key: bytes, msg: bytes) -> bytes:
    return hmac.new(key, msg, hashlib.sha256).digest()


def salted_password(password: str, salt: bytes, iterations: int) -> bytes:
    return hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)


def derive_keys(password: str, salt: bytes, iterations: int) -> tuple[bytes, bytes]:
    """(StoredKey, ServerKey) of RFC 5802, section 3."""
    salted = salted_password(password, salt, iterations)
    return hashlib.sha256(_hmac(salted, b"Client Key")).digest(), _hmac(salted, b"Server Key")


def pg_verifier(password: str, salt: bytes, iterations: int = 4096) -> str:
    """The text PostgreSQL stores in pg_authid.rolpassword (src/common/scram-common.c)."""
    stored_key, server_key = derive_keys(password, salt, iterations)
    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"


class LibpqStyleClient:
    """A SCRAM-SHA-256 client written from RFC 5802, sending what libpq sends
    (src/interfaces/libpq/fe-auth-scram.c): ``n,,n=,r=<nonce>``, empty user name."""

    def __init__(self, password: str, nonce: str, user: str = "") -> None:
        self.password = password
        self.bare = f"n={user},r={nonce}"
        self.nonce = nonce

    def first(self) -> bytes:
        return f"n,,{self.bare}".encode()

    def final(self, server_first: bytes) -> bytes:
        attrs = dict(kv.split("=", 1) for kv in server_first.decode().split(","))
        assert attrs["r"].startswith(self.nonce)
        salted = salted_password(self.password, base64.b64decode(attrs["s"]), int(attrs["i"]))
        client_key = _hmac(salted, b"Client Key")
        without_proof = f"c=biws,r={attrs['r']}"
        auth_message = f"{self.bare},{server_first.decode()},{without_proof}".encode()
        signature = _hmac(hashlib.sha256(client_key).digest(), auth_message)
        self.expected_server_signature = _hmac(_hmac(salted, b"Server Key"), auth_message)
        proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
        return f"{without_proof},p={b64(proof)}".encode()

    def verify(self, server_final: bytes) -> None:
        assert server_final == b"v=" + b64(self.expected_server_signature).encode()


# RFC 7677, section 3: user "user", password "pencil".
RFC7677_SALT = base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ==")
RFC7677_VERIFIER = (
    "SCRAM-SHA-256$4096:W22ZaJ0SNY7soEsUEjb6gQ=="
    "$WG5d8oPm3OtcPnkdi4Uo7BkeZkBFzpcXkuLmtbsT4qY=:wfPLwcE6nTWhTAmQ7tl2KeoiWGPlZqQxSrmfPwDl2dU="
)


def test_reference_client_matches_rfc7677_vector():
    client = LibpqStyleClient("pencil", "rOprNGfwEbeRWgbNEkqO", user="user")
    server_first = (
        b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
    )
    assert client.final(server_first) == (
        b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
        b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
    )
    client.verify(b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=")
    assert pg_verifier("pencil", RFC7677_SALT) == RFC7677_VERIFIER


# --- Verifiers -------------------------------------------------------------------------------


def test_scram_verifier_round_trip_and_keys():
    text = scram_verifier("correct horse")
    parsed = ScramVerifier.parse(text)
    assert str(parsed) == text
    assert text.startswith("SCRAM-SHA-256$4096:")
    assert parsed.iterations == SCRAM_ITERATIONS == 4096
    assert len(parsed.salt) >= 16
    assert (parsed.stored_key, parsed.server_key) == derive_keys("correct horse", parsed.salt, 4096)


def test_scram_verifier_custom_iterations_and_fresh_salt():
    a, b = scram_verifier("pw", iterations=8192), scram_verifier("pw", iterations=8192)
    pa, pb = ScramVerifier.parse(a), ScramVerifier.parse(b)
    assert pa.iterations == pb.iterations == 8192
    assert pa.salt != pb.salt
    assert (pa.stored_key, pa.server_key) == derive_keys("pw", pa.salt, 8192)


def test_postgresql_verifier_parses():
    parsed = ScramVerifier.parse(RFC7677_VERIFIER)
    stored_key, server_key = derive_keys("pencil", RFC7677_SALT, 4096)
    assert parsed == ScramVerifier(4096, RFC7677_SALT, stored_key, server_key)
    assert str(parsed) == RFC7677_VERIFIER
    assert is_scram_verifier(RFC7677_VERIFIER)


KEY = b64(bytes(range(32)))
SALT = b64(bytes(range(16)))


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("", id="empty"),
        pytest.param("secret", id="plain-password"),
        pytest.param("md5" + "0" * 32, id="md5-hash"),
        pytest.param(f"SCRAM-SHA-1$4096:{SALT}${KEY}:{KEY}", id="other-scheme"),
        pytest.param(f"scram-sha-256$4096:{SALT}${KEY}:{KEY}", id="lowercase-scheme"),
        pytest.param(f"SCRAM-SHA-256$4096:{SALT}${KEY}", id="missing-server-key"),
        pytest.param(f"SCRAM-SHA-256${SALT}${KEY}:{KEY}", id="missing-iterations"),
        pytest.param(f"SCRAM-SHA-256$many:{SALT}${KEY}:{KEY}", id="iterations-not-a-number"),
        pytest.param(f"SCRAM-SHA-256$4096:!!notb64$${KEY}:{KEY}", id="bad-base64-salt"),
        pytest.param(f"SCRAM-SHA-256$4096:{SALT}${KEY}:{KEY[:-2]}", id="bad-base64-padding"),
        pytest.param(f"SCRAM-SHA-256$4096:{SALT}${KEY}:{KEY}$", id="extra-dollar"),
        pytest.param(f"SCRAM-SHA-256$4096:{SALT}:x${KEY}:{KEY}", id="extra-colon"),
        pytest.param(f"SCRAM-SHA-256$4096:{SALT}${KEY}:\u00e9", id="non-ascii"),
    ],
)
def test_verifier_parse_rejects(text):
    with pytest.raises(ValueError, match="not a SCRAM-SHA-256 verifier"):
        ScramVerifier.parse(text)
    assert is_scram_verifier(text) is False


def test_verifier_parse_rejects_short_keys():
    short = b64(b"12345")
    with pytest.raises(ValueError):
        ScramVerifier.parse(f"SCRAM-SHA-256$4096:{SALT}${short}:{short}")


# --- SCRAM exchange --------------------------------------------------------------------------


def exchange(verifier: ScramVerifier | None, password: str) -> tuple[bytes, ScramClientExchange]:
    """One whole exchange through the wire messages, as frontend and backend drive it."""
    client = ScramClientExchange([SCRAM_SHA_256_PLUS, SCRAM_SHA_256], "alice", password)
    server = ScramServerExchange(verifier)

    initial = m.sasl_initial_response(client.mechanism, client.first())
    assert initial[:1] == m.PASSWORD_MESSAGE
    mechanism, client_first = m.parse_sasl_initial_response(initial[5:])
    assert mechanism == SCRAM_SHA_256

    code, server_first = m.parse_authentication(
        m.auth_sasl_continue(server.first(client_first))[5:]
    )
    assert code == m.AUTH_SASL_CONTINUE

    client_final = m.sasl_response(client.final(server_first))[5:]
    server_final = server.final(client_final)
    code, payload = m.parse_authentication(m.auth_sasl_final(server_final)[5:])
    assert code == m.AUTH_SASL_FINAL
    client.verify(payload)
    return payload, client


def test_scram_exchange_right_password():
    verifier = ScramVerifier.parse(scram_verifier("s3cret"))
    server_final, client = exchange(verifier, "s3cret")
    assert client.mechanism == SCRAM_SHA_256  # no channel binding offered without TLS data
    assert server_final.startswith(b"v=")
    assert len(base64.b64decode(server_final[2:])) == 32


def test_scram_exchange_against_postgresql_verifier():
    server_final, _ = exchange(ScramVerifier.parse(RFC7677_VERIFIER), "pencil")
    assert server_final.startswith(b"v=")


@pytest.mark.parametrize(
    ("verifier", "password"),
    [
        pytest.param(ScramVerifier.parse(RFC7677_VERIFIER), "Pencil", id="wrong-password"),
        pytest.param(ScramVerifier.parse(RFC7677_VERIFIER), "", id="empty-password"),
        pytest.param(None, "pencil", id="unknown-user"),
        pytest.param(None, "", id="unknown-user-empty-password"),
    ],
)
def test_scram_exchange_fails(verifier, password):
    with pytest.raises(AuthFailed):
        exchange(verifier, password)


def test_server_with_independent_client_user_star():
    # The user name inside SCRAM is ignored by PostgreSQL; "*" is what pgbouncer sends.
    server = ScramServerExchange(ScramVerifier.parse(RFC7677_VERIFIER))
    client = LibpqStyleClient("pencil", "fyko+d2lbbFgONRv9qkxdawL", user="*")
    server_first = server.first(client.first())
    assert server_first.startswith(b"r=fyko+d2lbbFgONRv9qkxdawL")
    assert b",s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096" in server_first
    client.verify(server.final(client.final(server_first)))


def test_server_accepts_libpq_client_first_with_empty_user():
    server = ScramServerExchange(ScramVerifier.parse(RFC7677_VERIFIER))
    client = LibpqStyleClient("pencil", "fyko+d2lbbFgONRv9qkxdawL", user="")
    assert client.first() == b"n,,n=,r=fyko+d2lbbFgONRv9qkxdawL"
    client.verify(server.final(client.final(server.first(client.first()))))


def test_server_accepts_verifier_with_1024_iterations():
    """PostgreSQL 16's scram_iterations may be set below RFC 7677's 4096 (scramp's floor)."""
    verifier = ScramVerifier.parse(pg_verifier("pencil", RFC7677_SALT, 1024))
    assert verifier.iterations == 1024
    server = ScramServerExchange(verifier)
    client = LibpqStyleClient("pencil", "fyko+d2lbbFgONRv9qkxdawL", user="*")
    client.verify(server.final(client.final(server.first(client.first()))))


def test_client_accepts_server_with_1024_iterations():
    """A server whose scram_iterations is below 4096 sends that count: libpq logs in."""
    client = ScramClientExchange([SCRAM_SHA_256], "alice", "pencil")
    nonce = client.first().decode().split(",r=")[1]
    server_first = f"r={nonce}srv,s={b64(RFC7677_SALT)},i=1024".encode()
    client_final = client.final(server_first)
    assert client_final.startswith(f"c=biws,r={nonce}srv,p=".encode())


@pytest.mark.parametrize("iterations", [1, 1024, 4096, 100_000])
def test_router_as_client_and_as_server_at_any_count_postgresql_allows(iterations):
    verifier = ScramVerifier.parse(pg_verifier("pencil", RFC7677_SALT, iterations))
    server = ScramServerExchange(verifier)
    client = ScramClientExchange([SCRAM_SHA_256], "alice", "pencil")
    client.verify(server.final(client.final(server.first(client.first()))))
    wrong = ScramClientExchange([SCRAM_SHA_256], "alice", "pencil!")
    server = ScramServerExchange(verifier)
    with pytest.raises(AuthFailed):
        server.final(wrong.final(server.first(wrong.first())))


@pytest.mark.parametrize("count", ["0", "-1", "", "01", "x", "10000001"])
def test_client_refuses_an_iteration_count_postgresql_never_sends(count):
    client = ScramClientExchange([SCRAM_SHA_256], "alice", "pencil")
    nonce = client.first().decode().split(",r=")[1]
    with pytest.raises(ProtocolError):
        client.final(f"r={nonce}srv,s={b64(RFC7677_SALT)},i={count}".encode())


MALFORMED_CLIENT_FIRST = [
    pytest.param(b"", id="empty"),
    pytest.param(b"\xff\xfe", id="non-utf8"),
    pytest.param(b"n,,", id="no-bare-message"),
    pytest.param(b"x,,n=u,r=abc", id="bad-gs2-flag"),
    pytest.param(b"n,,r=abc", id="missing-user"),
    pytest.param(b"n,,n=u", id="missing-nonce"),
    pytest.param(b"n,,n=u,r=", id="empty-nonce"),
    pytest.param(b"n,,r=abc,n=u", id="attributes-swapped"),
    pytest.param(b"n,a=admin,n=u,r=abc", id="authzid"),
    pytest.param(b"n,,m=ext,n=u,r=abc", id="mandatory-extension"),
    pytest.param(b"n,,n=u=2X,r=abc", id="bad-saslname-escape"),
    pytest.param(b"p=tls-server-end-point,,n=u,r=abc", id="channel-binding-without-plus"),
]


@pytest.mark.parametrize("client_first", MALFORMED_CLIENT_FIRST)
def test_malformed_client_first(client_first):
    server = ScramServerExchange(ScramVerifier.parse(RFC7677_VERIFIER))
    with pytest.raises(ProtocolError) as info:
        server.first(client_first)
    assert info.value.sqlstate == "08P01"


@pytest.mark.parametrize(
    "client_final",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"c=biws", id="no-nonce-no-proof"),
        pytest.param(b"c=biws,r=fyko+d2lbbFgONRv9qkxdawL,p=AAAA", id="wrong-nonce"),
    ],
)
def test_bad_client_final_fails(client_final):
    server = ScramServerExchange(ScramVerifier.parse(RFC7677_VERIFIER))
    server.first(b"n,,n=*,r=fyko+d2lbbFgONRv9qkxdawL")
    with pytest.raises((AuthFailed, ProtocolError)):
        server.final(client_final)


def test_client_final_non_utf8_is_protocol_error():
    server = ScramServerExchange(ScramVerifier.parse(RFC7677_VERIFIER))
    server.first(b"n,,n=*,r=fyko+d2lbbFgONRv9qkxdawL")
    with pytest.raises(ProtocolError):
        server.final(b"c=biws,r=\xff")


# --- Client side -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mechanisms", "binding", "expected"),
    [
        pytest.param([SCRAM_SHA_256], None, SCRAM_SHA_256, id="plain"),
        pytest.param(
            [SCRAM_SHA_256_PLUS, SCRAM_SHA_256], None, SCRAM_SHA_256, id="plus-offered-no-tls"
        ),
        pytest.param(
            [SCRAM_SHA_256_PLUS, SCRAM_SHA_256],
            ("tls-server-end-point", b"\x01" * 32),
            SCRAM_SHA_256_PLUS,
            id="plus-with-binding",
        ),
    ],
)
def test_client_mechanism_choice(mechanisms, binding, expected):
    client = ScramClientExchange(mechanisms, "alice", "pw", channel_binding=binding)
    assert client.mechanism == expected
    first = client.first()
    if expected == SCRAM_SHA_256_PLUS:
        assert first.startswith(b"p=tls-server-end-point,,")
    else:
        assert first.startswith((b"n,,", b"y,,"))


@pytest.mark.parametrize(
    ("mechanisms", "binding"),
    [
        pytest.param([], None, id="none"),
        pytest.param(["OAUTHBEARER"], None, id="unknown-mechanism"),
        pytest.param([SCRAM_SHA_256_PLUS], None, id="plus-only-without-tls"),
    ],
)
def test_client_no_usable_mechanism(mechanisms, binding):
    with pytest.raises(ProtocolError, match="no supported SASL mechanism"):
        ScramClientExchange(mechanisms, "alice", "pw", channel_binding=binding)


def _client_after_server_first() -> ScramClientExchange:
    client = ScramClientExchange([SCRAM_SHA_256], "alice", "pencil")
    server = ScramServerExchange(ScramVerifier.parse(RFC7677_VERIFIER))
    client.final(server.first(client.first()))
    return client


@pytest.mark.parametrize(
    "server_final",
    [
        pytest.param(b"v=" + b64(b"\x00" * 32).encode(), id="wrong-signature"),
        pytest.param(b"e=invalid-proof", id="server-error"),
        pytest.param(b"", id="empty"),
    ],
)
def test_client_rejects_bad_server_final(server_final):
    with pytest.raises(ProtocolError):
        _client_after_server_first().verify(server_final)


@pytest.mark.parametrize(
    "server_first",
    [
        pytest.param(b"", id="empty"),
        pytest.param(
            b"r=someone-elses-nonce,s=" + b64(bytes(16)).encode() + b",i=4096", id="foreign-nonce"
        ),
        pytest.param(b"e=other-error", id="server-error"),
    ],
)
def test_client_rejects_bad_server_first(server_first):
    client = ScramClientExchange([SCRAM_SHA_256], "alice", "pencil")
    client.first()
    with pytest.raises(ProtocolError):
        client.final(server_first)


def test_client_non_utf8_server_first_is_protocol_error():
    client = ScramClientExchange([SCRAM_SHA_256], "alice", "pencil")
    client.first()
    with pytest.raises(ProtocolError):
        client.final(b"r=\xff")


def test_client_non_utf8_server_final_is_protocol_error():
    with pytest.raises(ProtocolError):
        _client_after_server_first().verify(b"v=\xff")


# --- md5 -------------------------------------------------------------------------------------


def test_md5_hash_known_postgresql_vector():
    # SELECT 'md5' || md5('postgres' || 'postgres'): the classic postgres/postgres value.
    assert md5_hash("postgres", "postgres") == "md53175bce1d3201d16594cebf9d7eb3f9d"
    assert md5_hash("postgres", "postgres") == "md5" + hashlib.md5(b"postgrespostgres").hexdigest()


@pytest.mark.parametrize(
    ("user", "password"),
    [
        pytest.param("alice", "s3cret", id="ascii"),
        pytest.param("jos\u00e9", "p\u00e4ss", id="utf8"),
        pytest.param("u", "", id="empty-password"),
    ],
)
def test_md5_hash_is_md5_of_password_then_user(user, password):
    expected = "md5" + hashlib.md5(password.encode() + user.encode()).hexdigest()
    assert md5_hash(user, password) == expected
    assert len(expected) == 35


def test_md5_response_and_check():
    stored = md5_hash("alice", "s3cret")
    salt = b"\x9a\x00\xff\x10"
    inner = hashlib.md5(b"s3cretalice").hexdigest().encode()
    expected = b"md5" + hashlib.md5(inner + salt).hexdigest().encode()
    assert md5_response(stored, salt) == expected
    assert md5_check(stored, salt, expected) is True
    assert md5_check(stored, b"\x9a\x00\xff\x11", expected) is False
    assert md5_check(md5_hash("alice", "S3cret"), salt, expected) is False
    assert md5_check(md5_hash("alicf", "s3cret"), salt, expected) is False
    assert md5_check(stored, salt, expected[:-1]) is False
    assert md5_check(stored, salt, b"") is False


def test_md5_response_through_password_message():
    stored = md5_hash("postgres", "postgres")
    code, salt = m.parse_authentication(m.auth_md5(b"abcd")[5:])
    assert (code, salt) == (m.AUTH_MD5, b"abcd")
    sent = m.parse_password_message(m.password_message(md5_response(stored, salt))[5:])
    assert md5_check(stored, b"abcd", sent)


# --- tls-server-end-point ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "key_type",
    [pytest.param(trustme.KeyType.ECDSA, id="ecdsa"), pytest.param(trustme.KeyType.RSA, id="rsa")],
)
def test_tls_server_end_point_trustme_cert(key_type):
    ca = trustme.CA(key_type=key_type)
    pem = ca.issue_cert("db.example.test", key_type=key_type).cert_chain_pems[0].bytes()
    cert = x509.load_pem_x509_certificate(pem)
    assert isinstance(cert.signature_hash_algorithm, hashes.SHA256)
    der = cert.public_bytes(Encoding.DER)
    assert tls_server_end_point(der) == hashlib.sha256(der).digest()


def _self_signed(algorithm: hashes.HashAlgorithm) -> bytes:
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pgrouter-test")])
    start = datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(7)
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=1))
        .sign(key, algorithm)
    )
    return cert.public_bytes(Encoding.DER)


@pytest.mark.parametrize(
    ("algorithm", "digest"),
    [
        pytest.param(hashes.SHA384(), hashlib.sha384, id="sha384-signed"),
        pytest.param(hashes.SHA512(), hashlib.sha512, id="sha512-signed"),
    ],
)
def test_tls_server_end_point_uses_signature_hash(algorithm, digest):
    # RFC 5929, 4.1: the certificate's own signature hash, unless it is MD5 or SHA-1.
    der = _self_signed(algorithm)
    assert tls_server_end_point(der) == digest(der).digest()


def test_scram_with_keys_instead_of_a_password() -> None:
    """auth_query: the ClientKey recovered from a client's exchange, with the verifier's
    ServerKey, passes a server's SCRAM check for that user (here scramp's, holding the same
    verifier), and a wrong key does not."""
    from router.protocol.auth import ScramKeysClientExchange, ScramServerExchange, ScramVerifier

    verifier = ScramVerifier.parse(scram_verifier("s3cret"))
    # 1. A client logs into the router; the router learns its ClientKey.
    client = ScramClientExchange([SCRAM_SHA_256], "u", "s3cret")
    router_side = ScramServerExchange(verifier)
    server_first = router_side.first(client.first())
    client_final = client.final(server_first)
    client.verify(router_side.final(client_final))
    client_key = router_side.client_key(client_final)
    # 2. The router logs into the server with the keys.
    for key, ok in ((client_key, True), (bytes(32), False)):
        keys_client = ScramKeysClientExchange([SCRAM_SHA_256], key, verifier.server_key)
        server = ScramServerExchange(verifier)
        first = server.first(keys_client.first())
        final = keys_client.final(first)
        if ok:
            keys_client.verify(server.final(final))
        else:
            with pytest.raises(AuthFailed):
                server.final(final)


# SASLprep (RFC 4013) refuses these; PostgreSQL and libpq then use the password's bytes as they
# are (the LibpqStyleClient above never SASLpreps, which is what libpq does with them).
UNPREPPABLE = ["odd\x1fpw", "tab\tpw", "next\u0085line", "\u0627abc"]  # controls, C.2.2, bad bidi


@pytest.mark.parametrize("password", UNPREPPABLE)
def test_a_password_saslprep_refuses_gets_postgresql_s_verifier(password):
    assert saslprep_fails(password)
    assert scram_verifier(password, salt=RFC7677_SALT) == pg_verifier(password, RFC7677_SALT)
    server = ScramServerExchange(ScramVerifier.parse(scram_verifier(password)))
    client = LibpqStyleClient(password, "fyko+d2lbbFgONRv9qkxdawL")
    client.verify(server.final(client.final(server.first(client.first()))))


@pytest.mark.parametrize("password", UNPREPPABLE)
def test_the_router_logs_in_with_a_password_saslprep_refuses(password):
    verifier = ScramVerifier.parse(pg_verifier(password, RFC7677_SALT))
    server = ScramServerExchange(verifier)
    client = ScramKeysClientExchange([SCRAM_SHA_256], b"", b"", raw_password=password.encode())
    client.verify(server.final(client.final(server.first(client.first()))))
    wrong = ScramKeysClientExchange([SCRAM_SHA_256], b"", b"", raw_password=password.encode() + b"!")
    server = ScramServerExchange(verifier)
    with pytest.raises(AuthFailed):
        server.final(wrong.final(server.first(wrong.first())))


def test_a_plain_password_is_saslprepped_as_before():
    assert not saslprep_fails("pencil")
    assert not saslprep_fails("I\u00adX")  # B.1, mapped to nothing: prepared, not refused
    assert scram_verifier("pencil", salt=RFC7677_SALT) == RFC7677_VERIFIER


@pytest.mark.parametrize("server_first", ["r={nonce}srv,i=4096", "r={nonce}srv,s=!!,i=4096",
                                          "r={nonce}srv,s=" + b64(RFC7677_SALT) + ",i=0",
                                          "r={nonce}srv,s=" + b64(RFC7677_SALT) + ",i=x"])  # fmt: skip
def test_the_raw_password_client_refuses_a_bad_server_first(server_first):
    client = ScramKeysClientExchange([SCRAM_SHA_256], b"", b"", raw_password=b"odd\x1fpw")
    nonce = client.first().decode().split(",r=")[1]
    with pytest.raises(ProtocolError):
        client.final(server_first.format(nonce=nonce).encode())
