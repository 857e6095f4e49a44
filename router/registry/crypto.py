"""Encryption at rest of the one secret a tenant record holds: its backend ``server_password``.

Client logins need no encryption: they are stored as SCRAM verifiers or md5 hashes, which is what
PostgreSQL itself keeps. The server password must be usable in plaintext (the router logs into
PostgreSQL with it), so it is sealed with AES-256-GCM under a key from the settings, and whoever
reads Redis (a backup, a replica, a debugging session) sees only ciphertext.

A keyring holds the current key, which seals every write, and older keys, which only open: keys
are rotated by adding a new current key everywhere, re-sealing every record under it
(``RedisStore.rotate_keys``, ``pgrouter rotate-key``), then dropping the old keys.

The associated data binds each ciphertext to its tenant id and key id, so a ciphertext copied
into another tenant's record, or relabelled with another key id, fails to open like an altered
one. Every failure to open raises ``RegistryDecryptError``: fail closed, never an empty password.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from router.registry.errors import RegistryDecryptError

KEY_BYTES = 32  # AES-256
# 96-bit random nonces, the size GCM is specified for (NIST SP 800-38D, 8.2.2). That document caps
# one key at 2**32 random-nonce encryptions; registry writes stay many orders of magnitude below.
NONCE_BYTES = 12
KID_PATTERN = re.compile(r"[A-Za-z0-9_.-]{1,64}")


class KeyringError(ValueError):
    """A key or key id given in the settings is malformed."""


@dataclass(frozen=True, slots=True)
class EncryptedSecret:
    """A sealed secret as stored beside the record: ``{"kid", "nonce", "ct"}`` (base64)."""

    kid: str
    nonce: bytes
    ct: bytes  # ciphertext followed by the 16-byte GCM tag

    def to_json(self) -> dict[str, str]:
        return {
            "kid": self.kid,
            "nonce": base64.b64encode(self.nonce).decode(),
            "ct": base64.b64encode(self.ct).decode(),
        }

    @classmethod
    def from_json(cls, data: Any, *, tenant_id: str) -> EncryptedSecret:
        kid = data.get("kid") if isinstance(data, dict) else None
        try:
            if not isinstance(kid, str):
                raise ValueError("no key id")
            return cls(
                kid=kid,
                nonce=base64.b64decode(data["nonce"], validate=True),
                ct=base64.b64decode(data["ct"], validate=True),
            )
        except (KeyError, TypeError, ValueError, binascii.Error) as exc:
            raise RegistryDecryptError(
                tenant_id, str(kid), f"malformed encrypted field ({exc})"
            ) from exc


class Keyring:
    """The current key (seals and opens) and older keys (open only), by key id."""

    __slots__ = ("_current_kid", "_ciphers")

    def __init__(self, current_kid: str, keys: Mapping[str, bytes]) -> None:
        for kid, key in keys.items():
            check_kid(kid)
            if len(key) != KEY_BYTES:
                raise KeyringError(f'key "{kid}" has {len(key)} bytes, not {KEY_BYTES}')
        if current_kid not in keys:
            raise KeyringError(f'the current key id "{current_kid}" has no key')
        self._current_kid = current_kid
        self._ciphers = {kid: AESGCM(key) for kid, key in keys.items()}

    @classmethod
    def from_specs(cls, current: str, old: Iterable[str] = ()) -> Keyring:
        """From settings strings ``kid:base64key``: the current key and any older ones."""
        current_kid, current_key = parse_key_spec(current)
        keys = {current_kid: current_key}
        for spec in old:
            kid, key = parse_key_spec(spec)
            if kid in keys and keys[kid] != key:
                raise KeyringError(f'key id "{kid}" is given twice with different keys')
            keys[kid] = key
        return cls(current_kid, keys)

    @property
    def current_kid(self) -> str:
        return self._current_kid

    @property
    def kids(self) -> frozenset[str]:
        return frozenset(self._ciphers)

    def encrypt(self, plaintext: str, *, tenant_id: str) -> EncryptedSecret:
        nonce = os.urandom(NONCE_BYTES)
        kid = self._current_kid
        ct = self._ciphers[kid].encrypt(nonce, plaintext.encode(), _associated_data(tenant_id, kid))
        return EncryptedSecret(kid=kid, nonce=nonce, ct=ct)

    def decrypt(self, secret: EncryptedSecret, *, tenant_id: str) -> str:
        cipher = self._ciphers.get(secret.kid)
        if cipher is None:
            known = ", ".join(sorted(self._ciphers))
            raise RegistryDecryptError(
                tenant_id, secret.kid, f"unknown key id (the keyring holds: {known})"
            )
        try:
            plaintext = cipher.decrypt(
                secret.nonce, secret.ct, _associated_data(tenant_id, secret.kid)
            )
            return plaintext.decode()
        except InvalidTag as exc:
            raise RegistryDecryptError(
                tenant_id, secret.kid, "wrong key, or the stored ciphertext was altered"
            ) from exc
        except (ValueError, UnicodeDecodeError) as exc:  # e.g. a nonce of the wrong size
            raise RegistryDecryptError(
                tenant_id, secret.kid, f"malformed ciphertext ({exc})"
            ) from exc

    def __repr__(self) -> str:  # never the keys themselves
        return f"Keyring(current={self._current_kid!r}, kids={sorted(self._ciphers)!r})"


def generate_key() -> str:
    """A fresh random key, urlsafe base64 (what ``parse_key`` and the settings take)."""
    return base64.urlsafe_b64encode(os.urandom(KEY_BYTES)).decode()


def parse_key(text: str) -> bytes:
    """A 32-byte key from standard or urlsafe base64, padding optional."""
    cleaned = text.strip().replace("-", "+").replace("_", "/")
    cleaned += "=" * (-len(cleaned) % 4)
    try:
        key = base64.b64decode(cleaned, validate=True)
    except binascii.Error as exc:
        raise KeyringError(f"a key must be base64 ({exc})") from exc
    if len(key) != KEY_BYTES:
        raise KeyringError(f"a key must decode to {KEY_BYTES} bytes, not {len(key)}")
    return key


def parse_key_spec(spec: str) -> tuple[str, bytes]:
    """``kid:base64key`` -> (kid, key)."""
    kid, sep, key = spec.strip().partition(":")
    if not sep:
        raise KeyringError('a key must be given as "kid:base64key"')
    check_kid(kid)
    try:
        return kid, parse_key(key)
    except KeyringError as exc:
        raise KeyringError(f'key "{kid}": {exc}') from None


def check_kid(kid: str) -> None:
    if not KID_PATTERN.fullmatch(kid):
        raise KeyringError(f"key id {kid!r} must be 1-64 characters of [A-Za-z0-9_.-]")


def _associated_data(tenant_id: str, kid: str) -> bytes:
    return f"pgrouter/tenant/{tenant_id}/server_password/{kid}".encode()
