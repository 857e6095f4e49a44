"""tenant_sni_suffix: which tenant a TLS SNI host name names, and what the setting accepts."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from router.config import Settings
from router.tenants import sni_tenant_id


@pytest.mark.parametrize(
    ("server_name", "suffix", "tenant"),
    [
        ("acme.db.example.com", "db.example.com", "acme"),
        ("ACME.DB.Example.com", "db.example.com", "acme"),  # DNS names are case-insensitive
        ("acme.db.example.com.", "db.example.com", "acme"),  # fully qualified
        ("t-1_x.db.example.com", "db.example.com", "t-1_x"),
        ("db.example.com", "db.example.com", None),  # the router's own name: no tenant label
        ("a.b.db.example.com", "db.example.com", None),  # two labels
        ("acme.db.example.org", "db.example.com", None),
        ("acme.xdb.example.com", "db.example.com", None),
        (".db.example.com", "db.example.com", None),
        ("acme", "db.example.com", None),
        (None, "db.example.com", None),  # no SNI (an IP address, or sslsni=0)
        ("", "db.example.com", None),
        ("acme.db.example.com", None, None),  # the setting is off
    ],
)
def test_sni_tenant_id(server_name, suffix, tenant):
    assert sni_tenant_id(server_name, suffix) == tenant


@pytest.mark.parametrize(
    ("value", "stored"),
    [("db.example.com", "db.example.com"), (".DB.Example.com.", "db.example.com"), (None, None)],
)
def test_suffix_is_normalised(value, stored):
    assert Settings(tenant_sni_suffix=value).tenant_sni_suffix == stored


@pytest.mark.parametrize("value", ["", ".", "db..example.com", "  "])
def test_suffix_that_is_no_dns_name_is_refused(value):
    with pytest.raises(ValidationError, match="tenant_sni_suffix"):
        Settings(tenant_sni_suffix=value)
