"""Every field of a [databases] entry is of one kind a reload knows how to apply
(Router._reload_databases): a field added to DatabaseConfig must be given one."""

from router.app import LIVE_DATABASE_FIELDS, MOVING_DATABASE_FIELDS, NEW_LOGIN_DATABASE_FIELDS
from router.config import DatabaseConfig


def test_each_database_field_has_exactly_one_reload_kind() -> None:
    kinds = [*LIVE_DATABASE_FIELDS, *MOVING_DATABASE_FIELDS, *NEW_LOGIN_DATABASE_FIELDS]
    assert sorted(kinds) == sorted(set(kinds)), "a field in two kinds"
    assert set(kinds) == set(DatabaseConfig.model_fields)
