"""Session settings under transaction pooling (sans-I/O).

A transaction-mode client's startup parameters and plain SETs are what a dedicated connection
would carry for the whole session; here they become statements the router replays on whichever
server connection runs the client's next transaction (``SessionSettings.prelude``). Prepared
statements, the other session state a client expects to keep, are in router/prepared.py.
"""

from __future__ import annotations

from router.routing.session_statements import parse_bool

# Startup parameters that are not settings (PostgreSQL docs, 55.7 StartupMessage).
_NOT_SETTINGS = frozenset({"user", "database", "replication", "options"})
# The session's identity. RESET ALL leaves these alone (GUC_NO_RESET_ALL), so no settings
# prelude could take one off a server connection: a client whose startup packet names one is
# pinned to its server connection for its whole session (transaction mode), under this reason.
IDENTITY_SETTINGS = frozenset({"role", "session_authorization"})
STARTUP_IDENTITY_PIN = "startup role"


def _literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def set_config_sql(name: str, value: str) -> str:
    return f"SELECT pg_catalog.set_config({_literal(name)}, {_literal(value)}, false)"


def _split_options(options: str) -> list[str]:
    """Words of the ``options`` parameter: whitespace separates, a backslash escapes the next
    character (as the server's own pg_split_opts)."""
    words: list[str] = []
    word: list[str] = []
    escaped = False
    for ch in options:
        if escaped:
            word.append(ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch.isspace():
            if word:
                words.append("".join(word))
                word = []
        else:
            word.append(ch)
    if word:
        words.append("".join(word))
    return words


def _options_settings(options: str) -> dict[str, str]:
    """``-c name=value`` and ``--name=value`` pairs of the startup ``options`` parameter."""
    out: dict[str, str] = {}
    words = _split_options(options)
    i = 0
    while i < len(words):
        word = words[i]
        pair = None
        if word == "-c" and i + 1 < len(words):
            pair, i = words[i + 1], i + 1
        elif word.startswith("-c"):
            pair = word[2:]
        elif word.startswith("--"):
            pair = word[2:]
        if pair and "=" in pair:
            name, value = pair.split("=", 1)
            out[name.replace("-", "_").lower()] = value
        i += 1
    return out


class SessionSettings:
    """A client's session settings in transaction mode: its startup parameters plus the plain
    SETs it ran, as statements to replay on whichever server connection runs its next
    transaction. ``key`` is what a server connection must carry to serve this client; a server
    whose key differs first gets ``RESET ALL`` and the replay (see ``prelude``), so another
    client's settings never leak in and this client's follow it."""

    __slots__ = ("_startup", "_sets", "key", "startup_values")

    def __init__(self, startup_params: dict[str, str]) -> None:
        # The startup packet's settings by name (lower case), as the client gave them.
        values: dict[str, str] = {}
        for name, value in startup_params.items():
            if name not in _NOT_SETTINGS and not name.startswith("_pq_."):
                values[name.lower()] = value
        values.update(_options_settings(startup_params.get("options", "")))
        self.startup_values = values
        startup = {name: set_config_sql(name, value) for name, value in values.items()}
        self._startup = startup
        self._sets = dict(startup)
        self.key: frozenset | None = frozenset(startup.items()) if startup else None

    def restore_sql(self) -> str | None:
        """The statement that puts the startup settings back after a RESET, RESET ALL or
        DISCARD ALL sent to the server (which go back to the server connection's own login
        values), where the session has not set them since (source 'session'): run right
        after the client's statement, in its transaction, so what follows sees the client's
        values and the server reports them (ParameterStatus) as a dedicated server would.
        Only settings any role may set (or a superuser's, for a superuser), so it cannot fail
        in a transaction that has not already failed; a custom setting (``app.tenant``) when
        it is empty, a role when there is none. None without startup settings."""
        if not self.startup_values:
            return None
        rows = ", ".join(f"({_literal(name)}, {_literal(value)})" for name, value in self.startup_values.items())
        return (
            "SELECT pg_catalog.count(pg_catalog.set_config(v.name, v.setting, false))"
            f" FROM (VALUES {rows}) AS v(name, setting)"
            " LEFT JOIN pg_catalog.pg_settings AS s ON pg_catalog.lower(s.name) = v.name"
            # A startup role (not in pg_settings) after RESET ROLE or DISCARD ALL.
            " WHERE CASE WHEN v.name = 'role' THEN pg_catalog.current_setting('role') = 'none'"
            " WHEN s.name IS NULL"
            # A custom (placeholder) setting, not in pg_settings: back to '' when reset.
            " THEN pg_catalog.strpos(v.name, '.') > 0"
            " AND coalesce(pg_catalog.current_setting(v.name, true), '') = ''"
            " ELSE s.source <> 'session' AND (s.context = 'user'"
            " OR (s.context = 'superuser' AND pg_catalog.current_setting('is_superuser') = 'on')) END"
        )

    def pin(self, name: str, statement: str) -> None:
        """A setting the session always carries, whatever RESET/RESET ALL it runs."""
        self._startup[name] = statement
        self._sets[name] = statement
        self._changed()

    def _changed(self) -> None:
        self.key = frozenset(self._sets.items()) if self._sets else None

    def set(self, name: str, statement: str) -> None:
        self._sets[name] = statement
        self._changed()

    def reset(self, name: str) -> None:
        # RESET goes back to the session default, which includes the startup packet's value.
        if name in self._startup:
            self._sets[name] = self._startup[name]
        else:
            self._sets.pop(name, None)
        self._changed()

    def reset_all(self) -> None:
        self._sets = dict(self._startup)
        self._changed()

    def snapshot(self) -> tuple[dict[str, str], frozenset | None]:
        """The settings as they are now, for ``restore`` when a transaction that changed
        them rolls back (PostgreSQL undoes its SETs then)."""
        return dict(self._sets), self.key

    def restore(self, snapshot: tuple[dict[str, str], frozenset | None]) -> None:
        self._sets, self.key = dict(snapshot[0]), snapshot[1]

    def prelude(
        self, server_key: frozenset | None, snapshot: tuple[dict[str, str], frozenset | None] | None = None
    ) -> list[str]:
        """The statements that make a server carrying ``server_key`` carry ours, or those of
        ``snapshot`` (each sent as its own Query, so one that fails cannot stop the others)."""
        sets, key = (self._sets, self.key) if snapshot is None else snapshot
        if server_key == key:
            return []
        return ["RESET ALL", *sets.values()]


def startup_read_only(startup_params: dict[str, str]) -> bool:
    """Whether the startup packet makes the session's transactions read-only
    (``default_transaction_read_only``, as a parameter or in ``options``)."""
    value = _options_settings(startup_params.get("options", "")).get("default_transaction_read_only")
    for name, param in startup_params.items():
        if name.lower() == "default_transaction_read_only":
            value = param
    return bool(value is not None and parse_bool(value))
