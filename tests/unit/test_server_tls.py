"""asyncpg's ``ssl`` argument for the router's control connections, per server_tls mode: the
same meanings as the pools' own connections (libpq's sslmode)."""

from __future__ import annotations

import ssl

import pytest

from router.config import ServerTLS
from router.pools.manager import asyncpg_tls


def test_disable_is_plaintext() -> None:
    assert asyncpg_tls(ServerTLS.DISABLE, None) is False


def test_prefer_falls_back_to_plaintext() -> None:
    # An SSLContext would make asyncpg refuse a server without TLS; pools fall back.
    assert asyncpg_tls(ServerTLS.PREFER, None) == "prefer"


def test_require_encrypts_without_verifying() -> None:
    ctx = asyncpg_tls(ServerTLS.REQUIRE, None)
    assert isinstance(ctx, ssl.SSLContext)
    assert ctx.verify_mode == ssl.CERT_NONE and not ctx.check_hostname


def test_verify_full_checks_the_certificate_and_name(tmp_path) -> None:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    ctx = asyncpg_tls(ServerTLS.VERIFY_FULL, path)
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
