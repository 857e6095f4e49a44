"""Sealing of server passwords: round trip, and every way of failing to open fails closed with a
message naming the tenant and the key id."""

from __future__ import annotations

import base64
import dataclasses

import pytest

from router.registry.crypto import (
    KEY_BYTES,
    EncryptedSecret,
    Keyring,
    KeyringError,
    generate_key,
    parse_key,
    parse_key_spec,
)
from router.registry.errors import RegistryDecryptError


def ring(current: str, *old: str) -> Keyring:
    return Keyring.from_specs(current, old)


K1 = f"k1:{generate_key()}"
K2 = f"k2:{generate_key()}"


def test_round_trip_with_a_fresh_nonce_each_time() -> None:
    keyring = ring(K1)
    first = keyring.encrypt("pässwörd", tenant_id="acme")
    second = keyring.encrypt("pässwörd", tenant_id="acme")
    assert first.kid == "k1"
    assert first.nonce != second.nonce and first.ct != second.ct
    assert "pässwörd".encode() not in first.ct
    assert keyring.decrypt(first, tenant_id="acme") == "pässwörd"
    stored = first.to_json()
    assert set(stored) == {"kid", "nonce", "ct"}
    assert (
        keyring.decrypt(EncryptedSecret.from_json(stored, tenant_id="acme"), tenant_id="acme")
        == "pässwörd"
    )


def test_wrong_key_fails_closed() -> None:
    sealed = ring(K1).encrypt("pw", tenant_id="acme")
    impostor = ring(f"k1:{generate_key()}")  # same key id, another key
    with pytest.raises(RegistryDecryptError) as caught:
        impostor.decrypt(sealed, tenant_id="acme")
    message = str(caught.value)
    assert '"acme"' in message and '"k1"' in message and "wrong key" in message
    assert caught.value.tenant_id == "acme" and caught.value.kid == "k1"


def test_unknown_key_id_fails_closed() -> None:
    sealed = ring(K2).encrypt("pw", tenant_id="acme")
    with pytest.raises(RegistryDecryptError) as caught:
        ring(K1).decrypt(sealed, tenant_id="acme")
    message = str(caught.value)
    assert '"acme"' in message and '"k2"' in message and "unknown key id" in message
    assert "k1" in message  # says what the keyring does hold


@pytest.mark.parametrize("part", ["ct", "nonce", "tag"])
def test_tampered_ciphertext_fails_closed(part: str) -> None:
    keyring = ring(K1)
    sealed = keyring.encrypt("pw", tenant_id="acme")
    if part == "nonce":
        tampered = dataclasses.replace(sealed, nonce=_flip(sealed.nonce, 0))
    elif part == "ct":
        tampered = dataclasses.replace(sealed, ct=_flip(sealed.ct, 0))
    else:  # the last 16 bytes are GCM's tag
        tampered = dataclasses.replace(sealed, ct=_flip(sealed.ct, len(sealed.ct) - 1))
    with pytest.raises(RegistryDecryptError, match=r'tenant "acme" \(key id "k1"\).*altered'):
        keyring.decrypt(tampered, tenant_id="acme")


def test_ciphertext_is_bound_to_its_tenant_and_key_id() -> None:
    keyring = ring(K1, K2)
    sealed = keyring.encrypt("pw", tenant_id="acme")
    with pytest.raises(RegistryDecryptError, match='"globex"'):
        keyring.decrypt(sealed, tenant_id="globex")  # copied into another tenant's record
    relabelled = dataclasses.replace(sealed, kid="k2")  # both keys are known: still refused
    with pytest.raises(RegistryDecryptError, match='"k2"'):
        keyring.decrypt(relabelled, tenant_id="acme")


def test_malformed_stored_field_fails_closed() -> None:
    for stored in (
        {"kid": "k1", "nonce": "%%%", "ct": "AAAA"},
        {"kid": "k1"},
        {"nonce": "AA"},
        "x",
    ):
        with pytest.raises(RegistryDecryptError, match='"acme"'):
            EncryptedSecret.from_json(stored, tenant_id="acme")
    short_nonce = EncryptedSecret(kid="k1", nonce=b"", ct=b"0" * 20)
    with pytest.raises(RegistryDecryptError):
        ring(K1).decrypt(short_nonce, tenant_id="acme")


def test_old_keys_open_the_current_key_seals() -> None:
    old = ring(K1).encrypt("pw", tenant_id="acme")
    rotated = ring(K2, K1)
    assert rotated.current_kid == "k2" and rotated.kids == {"k1", "k2"}
    assert rotated.decrypt(old, tenant_id="acme") == "pw"
    assert rotated.encrypt("pw", tenant_id="acme").kid == "k2"


def test_keys_parse_from_standard_or_urlsafe_base64() -> None:
    raw = bytes(range(256))[-KEY_BYTES:]  # has bytes that encode to + / and - _
    std, urlsafe = base64.b64encode(raw).decode(), base64.urlsafe_b64encode(raw).decode()
    assert std != urlsafe
    assert parse_key(std) == parse_key(urlsafe) == parse_key(urlsafe.rstrip("=")) == raw
    assert parse_key_spec(f"main-2024.1:{std}") == ("main-2024.1", raw)
    assert len(parse_key(generate_key())) == KEY_BYTES
    assert generate_key() != generate_key()


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (f"nokid{generate_key()}", "kid:base64key"),
        (f":{generate_key()}", "key id"),
        (f"bad kid:{generate_key()}", "key id"),
        ("k1:c2hvcnQ=", "32 bytes"),
        ("k1:not base64!", "base64"),
    ],
)
def test_malformed_key_specs_are_refused(spec: str, message: str) -> None:
    with pytest.raises(KeyringError, match=message):
        parse_key_spec(spec)


def test_keyring_consistency() -> None:
    with pytest.raises(KeyringError, match="given twice"):
        ring(K1, f"k1:{generate_key()}")
    with pytest.raises(KeyringError, match="current key id"):
        Keyring("k9", {"k1": parse_key(generate_key())})
    with pytest.raises(KeyringError, match="bytes"):
        Keyring("k1", {"k1": b"short"})


def test_repr_shows_key_ids_not_keys() -> None:
    spec = f"k1:{generate_key()}"
    text = repr(ring(spec))
    assert "k1" in text and spec.split(":", 1)[1] not in text


def _flip(data: bytes, index: int) -> bytes:
    mutable = bytearray(data)
    mutable[index] ^= 0x01
    return bytes(mutable)
