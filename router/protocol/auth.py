"""Password verification glue: SCRAM-SHA-256 through scramp, and md5.

No I/O. The frontend drives a ``ScramServerExchange`` with the bytes of the client's
SASLInitialResponse and SASLResponse; the backend drives a ``ScramClientExchange`` with
the server's AuthenticationSASL* payloads (PostgreSQL docs, 55.3.1 "SCRAM-SHA-256").
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from dataclasses import dataclass

from scramp import ScramClient, ScramException, ScramMechanism
from scramp.core import IterationCount
from scramp.utils import saslprep

from router.protocol.errors import ProtocolError

# PostgreSQL takes any iteration count from 1 up (scram_iterations, PostgreSQL 16 and later;
# a verifier made there may carry one below 4096), and so does libpq from a server. scramp
# refuses fewer than the 4096 RFC 7677 recommends, as a server and as a client, by a class
# attribute: lowered here, so the router logs in wherever libpq would and accepts every
# verifier PostgreSQL would. (scramp still refuses more than ten million, its DoS guard.)
IterationCount.MIN_ITERATION_COUNT = 1

SCRAM_SHA_256 = "SCRAM-SHA-256"
SCRAM_SHA_256_PLUS = "SCRAM-SHA-256-PLUS"
# PostgreSQL's default scram_iterations.
SCRAM_ITERATIONS = 4096

_mechanism = ScramMechanism(SCRAM_SHA_256)


@dataclass(frozen=True, slots=True)
class ScramVerifier:
    """What PostgreSQL stores in pg_authid.rolpassword for a SCRAM password:
    ``SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`` (base64 fields)."""

    iterations: int
    salt: bytes
    stored_key: bytes
    server_key: bytes

    @classmethod
    def parse(cls, text: str) -> ScramVerifier:
        try:
            scheme, iter_salt, keys = text.split("$")
            iterations, salt = iter_salt.split(":")
            stored_key, server_key = keys.split(":")
            if scheme != SCRAM_SHA_256:
                raise ValueError(scheme)
            verifier = cls(
                int(iterations),
                base64.b64decode(salt, validate=True),
                base64.b64decode(stored_key, validate=True),
                base64.b64decode(server_key, validate=True),
            )
            # As PostgreSQL's parse_scram_secret(): keys are SHA-256 sized.
            if len(verifier.stored_key) != 32 or len(verifier.server_key) != 32 or verifier.iterations < 1:
                raise ValueError("bad key length")
            return verifier
        except ValueError as exc:
            raise ValueError("not a SCRAM-SHA-256 verifier") from exc

    def __str__(self) -> str:
        b64 = lambda b: base64.b64encode(b).decode()  # noqa: E731
        return (
            f"{SCRAM_SHA_256}${self.iterations}:{b64(self.salt)}"
            f"${b64(self.stored_key)}:{b64(self.server_key)}"
        )


def saslprep_fails(password: str) -> bool:
    """SASLprep (RFC 4013) refuses ``password`` (a prohibited character, such as a control
    character, or a malformed bidirectional string). PostgreSQL, server and libpq alike, then
    derives the SCRAM keys from the password's bytes as they are; scramp refuses it."""
    try:
        saslprep(password)
    except ScramException:
        return True
    return False


def raw_password_keys(password: bytes, salt: bytes, iterations: int) -> tuple[bytes, bytes]:
    """(ClientKey, ServerKey) of RFC 5802 section 3 from a password not SASLprepped:
    SaltedPassword = Hi(password, salt, i), which is PBKDF2 with HMAC-SHA-256."""
    salted = hashlib.pbkdf2_hmac("sha256", password, salt, iterations)
    return (
        hmac.new(salted, b"Client Key", hashlib.sha256).digest(),
        hmac.new(salted, b"Server Key", hashlib.sha256).digest(),
    )


def scram_verifier(password: str, iterations: int = SCRAM_ITERATIONS, salt: bytes | None = None) -> str:
    """The SCRAM verifier of ``password``, in PostgreSQL's text format: the one PostgreSQL
    stores for it, SASLprep failing included (see ``saslprep_fails``)."""
    if saslprep_fails(password):
        salt = salt if salt is not None else secrets.token_bytes(16)  # PostgreSQL's salt length
        client_key, server_key = raw_password_keys(password.encode(), salt, iterations)
        return str(ScramVerifier(iterations, salt, hashlib.sha256(client_key).digest(), server_key))
    salt, stored_key, server_key, iterations = _mechanism.make_auth_info(
        password, iteration_count=iterations, salt=salt
    )
    return str(ScramVerifier(iterations, salt, stored_key, server_key))


def is_scram_verifier(text: str) -> bool:
    try:
        ScramVerifier.parse(text)
    except ValueError:
        return False
    return True


def md5_hash(user: str, password: str) -> str:
    """PostgreSQL's stored md5 form: 'md5' + md5(password + user)."""
    return "md5" + hashlib.md5((password + user).encode()).hexdigest()


def md5_response(stored_md5: str, salt: bytes) -> bytes:
    """What a client sends for AuthenticationMD5Password: 'md5' + md5(md5hex(pw+user) + salt)."""
    return b"md5" + hashlib.md5(stored_md5[3:].encode() + salt).hexdigest().encode()


def md5_check(stored_md5: str, salt: bytes, response: bytes) -> bool:
    return hmac.compare_digest(md5_response(stored_md5, salt), response)


class AuthFailed(Exception):
    """The client's proof or password did not match (reported as 28P01 by the caller)."""


def _gs2_header_end(client_first: str) -> int:
    """Offset just past the GS2 header ("n,," or "p=tls-server-end-point,,") of a
    client-first-message (RFC 5802, section 7)."""
    first = client_first.find(",")
    second = client_first.find(",", first + 1) if first >= 0 else -1
    if second < 0:
        raise ProtocolError("malformed SCRAM client-first-message")
    return second + 1


class ScramServerExchange:
    """Server side of one SCRAM-SHA-256 exchange against a stored verifier.

    PostgreSQL ignores the user name inside the SCRAM messages (the startup packet's user
    counts), so the verifier is looked up by the caller and bound here.
    """

    def __init__(self, verifier: ScramVerifier | None) -> None:
        # With no verifier (unknown user) we still run the whole exchange against a dummy
        # so that timing does not reveal which users exist; it then always fails.
        self._known = verifier is not None
        if verifier is None:
            salt, stored_key, server_key, iters = _dummy_auth_info()
        else:
            salt, stored_key, server_key, iters = (
                verifier.salt,
                verifier.stored_key,
                verifier.server_key,
                verifier.iterations,
            )
        self._server = _mechanism.make_server(lambda _user: (salt, stored_key, server_key, iters))

    def first(self, client_first: bytes) -> bytes:
        try:
            text = client_first.decode("utf-8")
            # libpq sends an empty user name ("n,,n=,r=...": PostgreSQL takes the user from
            # the startup packet), which scramp refuses. Let scramp parse a stand-in name,
            # then restore the exact text the client signed: its proof covers those bytes.
            gs2_end = _gs2_header_end(text)
            bare = text[gs2_end:]
            if bare.startswith("n=,"):
                self._server.set_client_first(text[:gs2_end] + "n=*," + bare[3:])
                self._server.client_first_bare = bare
            else:
                self._server.set_client_first(text)
            return self._server.get_server_first().encode()
        except (ScramException, UnicodeDecodeError) as exc:
            raise ProtocolError(f"malformed SCRAM client-first-message: {exc}") from exc

    def final(self, client_final: bytes) -> bytes:
        try:
            self._server.set_client_final(client_final.decode("utf-8"))
            server_final = self._server.get_server_final().encode()
        except ScramException as exc:
            raise AuthFailed(str(exc)) from exc
        except UnicodeDecodeError as exc:
            raise ProtocolError("malformed SCRAM client-final-message") from exc
        if not self._known:
            raise AuthFailed("unknown user")
        return server_final

    def client_key(self, client_final: bytes) -> bytes:
        """The ClientKey the client proved it holds (RFC 5802, section 3: ClientKey =
        ClientProof XOR HMAC(StoredKey, AuthMessage)). Call after a successful ``final``; with
        the verifier's ServerKey it lets the router log into PostgreSQL as this user
        (``ScramKeysClientExchange``) without ever knowing the password."""
        text = client_final.decode("utf-8")
        without_proof, _, proof = text.rpartition(",p=")
        auth_message = ",".join(
            (self._server.client_first_bare, self._server.server_first, without_proof)
        ).encode()
        signature = hmac.new(self._server.stored_key, auth_message, hashlib.sha256).digest()
        return bytes(a ^ b for a, b in zip(base64.b64decode(proof), signature, strict=True))


_DUMMY: tuple | None = None


def _dummy_auth_info() -> tuple:
    global _DUMMY  # computed once; derived from a random password nobody knows
    if _DUMMY is None:
        import secrets

        _DUMMY = _mechanism.make_auth_info(secrets.token_hex(16), iteration_count=SCRAM_ITERATIONS)
    return _DUMMY


class ScramClientExchange:
    """Client side of SCRAM-SHA-256[-PLUS], for the router logging into PostgreSQL."""

    def __init__(
        self,
        mechanisms: list[str],
        user: str,
        password: str,
        channel_binding: tuple[str, bytes] | None = None,
    ) -> None:
        offered = [m for m in mechanisms if m in (SCRAM_SHA_256, SCRAM_SHA_256_PLUS)]
        if channel_binding is None:
            offered = [m for m in offered if m == SCRAM_SHA_256]
        if not offered:
            raise ProtocolError(f"server offers no supported SASL mechanism: {mechanisms}")
        try:
            self._client = ScramClient(offered, user or "*", password, channel_binding=channel_binding)
        except ScramException as exc:  # (a user name SASLprep refuses, say)
            raise ProtocolError(f"SCRAM exchange with server failed: {exc}") from exc
        self.mechanism = self._client.mechanism_name

    def first(self) -> bytes:
        return self._client.get_client_first().encode()

    def final(self, server_first: bytes) -> bytes:
        try:
            self._client.set_server_first(server_first.decode())
            return self._client.get_client_final().encode()
        except (ScramException, UnicodeDecodeError) as exc:
            raise ProtocolError(f"SCRAM exchange with server failed: {exc}") from exc

    def verify(self, server_final: bytes) -> None:
        try:
            self._client.set_server_final(server_final.decode())
        except (ScramException, UnicodeDecodeError) as exc:
            raise ProtocolError(f"server's SCRAM signature is wrong: {exc}") from exc


class ScramKeysClientExchange:
    """Client side of SCRAM-SHA-256 from keys instead of a password: the ClientKey learnt from
    the client's own exchange and the ServerKey of the user's verifier (auth_query), or those
    derived from a password SASLprep refuses (``raw_password``). scramp
    derives both from a password, which the router never has; the arithmetic of RFC 5802,
    section 3 is all that remains: ClientProof = ClientKey XOR HMAC(H(ClientKey), AuthMessage),
    and the server proves itself with HMAC(ServerKey, AuthMessage). No channel binding."""

    mechanism = SCRAM_SHA_256

    def __init__(
        self, mechanisms: list[str], client_key: bytes, server_key: bytes, raw_password: bytes | None = None
    ) -> None:
        if SCRAM_SHA_256 not in mechanisms:
            raise ProtocolError(f"server offers no supported SASL mechanism: {mechanisms}")
        self._client_key = client_key
        self._server_key = server_key
        # A password SASLprep refuses (saslprep_fails): the keys come from it and the salt
        # and iteration count of the server's first message.
        self._raw_password = raw_password
        self._nonce = base64.b64encode(secrets.token_bytes(18)).decode()
        self._first_bare = f"n=,r={self._nonce}"
        self._expected: bytes | None = None

    def first(self) -> bytes:
        return f"n,,{self._first_bare}".encode()

    def final(self, server_first: bytes) -> bytes:
        text = server_first.decode()
        fields = dict(part.split("=", 1) for part in text.split(",") if "=" in part)
        nonce = fields.get("r", "")
        if not nonce.startswith(self._nonce) or len(nonce) <= len(self._nonce):
            raise ProtocolError("SCRAM exchange with server failed: nonce mismatch")
        if self._raw_password is not None:
            try:
                salt, iterations = base64.b64decode(fields["s"], validate=True), int(fields["i"])
            except (KeyError, ValueError) as exc:
                raise ProtocolError(f"SCRAM exchange with server failed: bad server-first message: {exc}") from exc
            if not 1 <= iterations <= 10_000_000:  # scramp's bounds for the other path
                raise ProtocolError(f"SCRAM exchange with server failed: iteration count {iterations}")
            self._client_key, self._server_key = raw_password_keys(self._raw_password, salt, iterations)
        without_proof = f"c=biws,r={nonce}"
        auth_message = f"{self._first_bare},{text},{without_proof}".encode()
        stored_key = hashlib.sha256(self._client_key).digest()
        signature = hmac.new(stored_key, auth_message, hashlib.sha256).digest()
        proof = bytes(a ^ b for a, b in zip(self._client_key, signature, strict=True))
        self._expected = hmac.new(self._server_key, auth_message, hashlib.sha256).digest()
        return f"{without_proof},p={base64.b64encode(proof).decode()}".encode()

    def verify(self, server_final: bytes) -> None:
        text = server_final.decode()
        if not text.startswith("v=") or self._expected is None or not hmac.compare_digest(
            base64.b64decode(text[2:]), self._expected
        ):
            raise ProtocolError("server's SCRAM signature is wrong")


def tls_server_end_point(peer_cert_der: bytes) -> bytes:
    """Channel-binding data of type tls-server-end-point (RFC 5929): the hash of the server
    certificate, with SHA-256 standing in for MD5/SHA-1 signature hashes."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    cert = x509.load_der_x509_certificate(peer_cert_der)
    algorithm = cert.signature_hash_algorithm
    if algorithm is None or isinstance(algorithm, hashes.MD5 | hashes.SHA1):
        algorithm = hashes.SHA256()
    digest = hashes.Hash(algorithm)
    digest.update(peer_cert_der)
    return digest.finalize()
