"""read_your_writes takes session, tenant or off; tenant scope is refused with several
workers, whose processes could not share the token (README "Read-your-writes")."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from router.config import ReadYourWrites, Settings

CLUSTERS = {"main": {"primary": {"host": "10.0.0.1", "port": 5432}, "replicas": [{"host": "10.0.0.2", "port": 5432}]}}


@pytest.mark.parametrize(
    ("value", "workers", "error"),
    [
        ("session", 1, None),
        ("session", 4, None),
        ("off", 4, None),
        ("tenant", 1, None),
        ("tenant", 2, "read_your_writes = tenant needs workers = 1"),
        ("always", 1, "read_your_writes"),
    ],
)
def test_read_your_writes_values(value: str, workers: int, error: str | None) -> None:
    make = lambda: Settings(clusters=CLUSTERS, read_your_writes=value, workers=workers)  # noqa: E731
    if error is None:
        assert make().read_your_writes is ReadYourWrites(value)
    else:
        with pytest.raises(ValidationError, match=error):
            make()


def test_scope_of_a_registry_tenant_is_the_tenant_whatever_name_it_logged_in_with() -> None:
    from types import SimpleNamespace

    from router.splitting import scope_of

    acme = SimpleNamespace(tenant_id="acme")
    clients = [
        SimpleNamespace(tenant=acme, database="acme"),
        SimpleNamespace(tenant=acme, database="whatever"),  # user.tenant or the startup option
        SimpleNamespace(tenant=SimpleNamespace(tenant_id="globex"), database="acme"),
        SimpleNamespace(tenant=None, database="acme"),  # a [databases] entry of that name
        SimpleNamespace(tenant=None, database="app"),
    ]
    scopes = [scope_of(client) for client in clients]
    assert scopes[0] == scopes[1]
    assert len(set(scopes)) == 4
