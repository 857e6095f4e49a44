"""Which functions may run on a replica: pg_proc volatility, known writers, an allowlist.

A ``FunctionCatalog`` maps lowercased function names, bare (``lower``) and schema-qualified
(``pg_catalog.lower``), to a volatility as in ``pg_proc.provolatile``: ``'i'`` immutable,
``'s'`` stable, ``'v'`` volatile. Whoever owns the connection to a database fills one with
``FunctionCatalog.from_rows`` from::

    SELECT n.nspname, p.proname, p.provolatile
    FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace

and ``FunctionCatalog.builtin()`` is the fallback until then (``builtin_rows()`` gives the
same as rows, to extend). A catalog is immutable: a reload
builds a new one, and the classifier cache keys its entries by catalog object, so entries
classified with the old catalog are never returned for the new one.

How a call is judged (``FunctionCatalog.check``), first match wins:

1. Known writers (``WRITER_FUNCTIONS``; bare or ``pg_catalog.``): PRIMARY with their own
   reason. This list overrides the catalog because volatility does not say "writes":
   ``txid_current`` is *stable* in pg_proc yet assigns a transaction id, which a hot standby
   cannot do; ``set_config`` changes session state the tenant-isolation code must see.
2. Unknown to the catalog: PRIMARY (UNKNOWN_FUNCTION). It may be a user function that writes.
3. The replica-safe allowlist (``REPLICA_SAFE_VOLATILE``), when no schema other than
   pg_catalog defines a volatile function of that name: replica-compatible.
4. Volatile: PRIMARY (VOLATILE_FUNCTION). A volatile function is the only kind allowed to
   modify the database (PostgreSQL docs, "Function Volatility Categories").
5. Immutable or stable: replica-compatible.

Overloads and schemas: a bare name stands for every function of that name in any schema, and
its volatility is the most volatile of them, so one volatile overload makes the name volatile.
This is conservative: the classifier does not know the search_path or the argument types.
Names are lowercased on both sides: a quoted ``"MyFunc"`` shares an entry with ``myfunc``, and
the merge (most volatile wins) keeps that safe.

Not seen by name lookup, so not judged: functions behind operators (``a === b``), casts, views,
triggers, column defaults and rules. Built-in operators and casts are immutable or stable; a
user-defined volatile operator or a view that calls a writer is a known limitation, handled
with a ``/* pgrouter: primary */`` hint.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from types import MappingProxyType

from router.routing.verdict import Reason

IMMUTABLE = "i"
STABLE = "s"
VOLATILE = "v"
_RANK = {IMMUTABLE: 0, STABLE: 1, VOLATILE: 2}

CATALOG_SCHEMA = "pg_catalog"

# Functions that write, or need the primary, whatever the catalog says about their volatility.
WRITER_FUNCTIONS: Mapping[str, Reason] = MappingProxyType(
    {
        # sequences: nextval/setval write; currval/lastval read the value this session's
        # nextval produced, which only exists on the node that ran it.
        **dict.fromkeys(("nextval", "setval", "currval", "lastval"), Reason.NEXTVAL),
        # advisory locks work on a standby, but only lock against that standby's sessions:
        # an application that coordinates writers with them must take them on the primary.
        **dict.fromkeys(
            (
                "pg_advisory_lock",
                "pg_advisory_lock_shared",
                "pg_advisory_unlock",
                "pg_advisory_unlock_shared",
                "pg_advisory_unlock_all",
                "pg_advisory_xact_lock",
                "pg_advisory_xact_lock_shared",
                "pg_try_advisory_lock",
                "pg_try_advisory_lock_shared",
                "pg_try_advisory_xact_lock",
                "pg_try_advisory_xact_lock_shared",
            ),
            Reason.ADVISORY_LOCK,
        ),
        "set_config": Reason.SET_CONFIG,
        "pg_notify": Reason.LISTEN_NOTIFY,
        **dict.fromkeys(
            (
                # large objects
                "lo_create",
                "lo_creat",
                "lo_import",
                "lo_export",
                "lo_unlink",
                "lo_put",
                "lo_from_bytea",
                "lowrite",
                "lo_truncate",
                "lo_truncate64",
                # transaction ids: assigning one is impossible during recovery
                "txid_current",
                "pg_current_xact_id",
                # server administration: meant for the primary (on a replica they fail or act
                # on one arbitrary standby, e.g. pausing its replay)
                "pg_switch_wal",
                "pg_terminate_backend",
                "pg_cancel_backend",
                "pg_wal_replay_pause",
                "pg_wal_replay_resume",
                "pg_promote",
                "pg_reload_conf",
                "pg_rotate_logfile",
                "pg_create_restore_point",
                "pg_backup_start",
                "pg_backup_stop",
                "pg_current_wal_lsn",
                "pg_current_wal_insert_lsn",
                "pg_current_wal_flush_lsn",
                "pg_export_snapshot",
                "pg_import_system_collations",
                "pg_create_physical_replication_slot",
                "pg_create_logical_replication_slot",
                "pg_copy_physical_replication_slot",
                "pg_copy_logical_replication_slot",
                "pg_drop_replication_slot",
                "pg_replication_slot_advance",
                "pg_logical_slot_get_changes",
                "pg_logical_slot_get_binary_changes",
                "pg_logical_emit_message",
                "pg_replication_origin_create",
                "pg_replication_origin_drop",
                "pg_replication_origin_advance",
                "pg_replication_origin_session_setup",
                "pg_stat_reset",
                "pg_stat_reset_shared",
                "pg_stat_reset_single_table_counters",
                "pg_stat_reset_single_function_counters",
                "pg_stat_reset_slru",
                "pg_stat_reset_replication_slot",
                "pg_stat_reset_subscription_stats",
            ),
            Reason.WRITER_FUNCTION,
        ),
    }
)

# Volatile built-ins that are safe on a replica. "Volatile" means "may return a different
# result on each call", which is what these do: they read a clock, a random generator, the
# recovery state or file sizes. None assigns a transaction id, writes a table, takes a lock the
# primary's sessions would see, or changes session state (setseed is left out for that reason).
# The recovery functions (pg_is_in_recovery, pg_last_wal_*) are what monitoring runs on replicas.
REPLICA_SAFE_VOLATILE = frozenset(
    {
        "random",
        "random_normal",
        "clock_timestamp",
        "timeofday",
        "pg_sleep",
        "pg_sleep_for",
        "pg_sleep_until",
        "gen_random_uuid",
        "uuidv4",
        "uuidv7",
        "pg_is_in_recovery",
        "pg_last_wal_receive_lsn",
        "pg_last_wal_replay_lsn",
        "pg_last_xact_replay_timestamp",
        "pg_is_wal_replay_paused",
        "pg_get_wal_replay_pause_state",
        "pg_relation_size",
        "pg_total_relation_size",
        "pg_table_size",
        "pg_indexes_size",
        "pg_database_size",
        "pg_tablespace_size",
    }
)

# The fallback catalog: common pg_catalog functions, with provolatile as in PostgreSQL 15-18
# (checked against pg_proc of a 15 server; any_value, system_user, pg_input_is_valid and
# random_normal are 16+, uuidv4/uuidv7 18+). A function missing here is "unknown" -> PRIMARY
# until the real catalog is loaded, which is the safe direction.
_BUILTIN_IMMUTABLE = """
    count sum avg min max array_agg string_agg jsonb_object_agg bool_and bool_or every bit_and
    bit_or bit_xor stddev stddev_pop stddev_samp variance var_pop var_samp percentile_cont
    percentile_disc mode corr covar_pop covar_samp regr_slope regr_intercept regr_count any_value
    range_agg xmlagg row_number rank dense_rank percent_rank cume_dist ntile lag lead first_value
    last_value nth_value lower upper char_length character_length octet_length bit_length substr
    substring position strpos replace split_part btrim ltrim rtrim lpad rpad left right reverse
    repeat initcap md5 sha224 sha256 sha384 sha512 encode decode regexp_replace regexp_match
    regexp_matches regexp_split_to_array regexp_split_to_table regexp_like regexp_count
    regexp_substr regexp_instr starts_with translate ascii chr quote_ident to_hex string_to_array
    string_to_table overlay normalize is_normalized similar_to_escape unistr abs ceil ceiling floor
    round trunc mod power pow sqrt cbrt exp ln log log10 sign div pi degrees radians sin cos tan
    asin acos atan atan2 width_bucket gcd lcm factorial scale make_date make_time make_timestamp
    make_interval justify_days justify_hours justify_interval isfinite date_bin json_object
    jsonb_object jsonb_set jsonb_set_lax jsonb_insert jsonb_pretty jsonb_strip_nulls
    json_strip_nulls jsonb_array_elements json_array_elements jsonb_array_elements_text
    json_array_elements_text jsonb_each json_each jsonb_each_text json_each_text jsonb_object_keys
    json_object_keys jsonb_array_length json_array_length jsonb_typeof json_typeof
    jsonb_extract_path json_extract_path jsonb_extract_path_text json_extract_path_text
    jsonb_path_query jsonb_path_exists jsonb_path_match jsonb_path_query_array
    jsonb_path_query_first ts_rank ts_rank_cd setweight array_length array_position array_positions
    array_remove array_replace array_append array_prepend array_cat array_dims array_ndims
    array_lower array_upper cardinality unnest generate_subscripts array_fill pg_size_pretty
    pg_size_bytes pg_wal_lsn_diff txid_snapshot_xmin txid_snapshot_xmax pg_snapshot_xmin
    pg_snapshot_xmax num_nonnulls num_nulls pg_partition_root host network netmask masklen family
    inet_same_family xmlexists xpath xpath_exists
"""
_BUILTIN_STABLE = """
    json_agg jsonb_agg json_object_agg length concat concat_ws format quote_literal quote_nullable
    array_to_string convert_from convert_to now statement_timestamp transaction_timestamp date_trunc
    date_part extract age to_char to_date to_timestamp to_number make_timestamptz timezone overlaps
    to_json to_jsonb json_build_object jsonb_build_object json_build_array jsonb_build_array
    row_to_json array_to_json jsonb_to_record json_to_record jsonb_to_recordset json_to_recordset
    jsonb_populate_record json_populate_record to_tsvector to_tsquery plainto_tsquery
    websearch_to_tsquery phraseto_tsquery ts_headline generate_series version current_setting
    current_database current_schema current_schemas pg_backend_pid inet_server_port inet_server_addr
    inet_client_addr inet_client_port pg_postmaster_start_time pg_conf_load_time pg_typeof
    pg_column_size has_table_privilege has_schema_privilege has_database_privilege
    has_column_privilege has_function_privilege has_sequence_privilege pg_has_role pg_get_viewdef
    pg_get_indexdef pg_get_constraintdef pg_get_functiondef pg_get_triggerdef pg_get_expr
    pg_get_userbyid pg_get_serial_sequence format_type obj_description col_description
    shobj_description to_regclass to_regtype to_regproc txid_current_snapshot pg_current_snapshot
    txid_current_if_assigned pg_trigger_depth pg_encoding_to_char pg_client_encoding
    pg_stat_get_activity pg_table_is_visible pg_collation_for system_user pg_relation_filenode
    pg_relation_filepath pg_tablespace_location pg_listening_channels pg_get_keywords
    pg_options_to_table pg_column_compression pg_get_partkeydef pg_input_is_valid xml_is_well_formed
    txid_current pg_current_xact_id
"""
# Volatile built-ins: the replica-safe allowlist and the known writers (both judged by name
# before volatility, but listed so the fallback catalog knows them).
_BUILTIN_VOLATILE = (
    " ".join(sorted(REPLICA_SAFE_VOLATILE))
    + " "
    + " ".join(
        name for name in WRITER_FUNCTIONS if name not in ("txid_current", "pg_current_xact_id")
    )
)


def call_pattern(names: Iterable[str]) -> re.Pattern[bytes]:
    """What a call of one of ``names`` looks like in a statement's text: the name (bare,
    qualified or quoted: the name itself is a word), an optional closing quote, a
    parenthesis. Case-insensitive."""
    return re.compile(rb'(?i)\b(?:' + b"|".join(re.escape(name.encode()) for name in sorted(names)) + rb')"?\s*\(')


class FunctionCatalog:
    """Function name -> volatility, immutable; compared and hashed by identity."""

    __slots__ = ("_volatility", "_shadowed", "session_functions", "session_calls")

    def __init__(self, volatility: Mapping[str, str], session_functions: Iterable[str] = ()) -> None:
        """``volatility`` maps names (``"f"`` or ``"schema.f"``, any case) to 'i', 's' or 'v'.

        Qualified entries are also folded into the bare name, keeping the most volatile.
        ``session_functions`` are the bare names of functions whose body may change session
        settings (``sets_session`` of ``from_rows``).
        """
        merged: dict[str, str] = {}
        shadowed: set[str] = set()
        for key, value in volatility.items():
            if value not in _RANK:
                raise ValueError(f"volatility of {key!r} must be 'i', 's' or 'v', not {value!r}")
            key = key.lower()
            schema, _, name = key.rpartition(".")
            keys = (key, name) if schema else (key,)
            for k in keys:
                old = merged.get(k)
                if old is None or _RANK[value] > _RANK[old]:
                    merged[k] = value
            if schema and schema != CATALOG_SCHEMA and value == VOLATILE:
                shadowed.add(name)
        self._volatility: Mapping[str, str] = MappingProxyType(merged)
        # bare names a non-pg_catalog schema defines as volatile: the allowlist does not apply
        self._shadowed = frozenset(shadowed)
        self.session_functions = frozenset(name.lower() for name in session_functions)
        # What the client hot path runs over a statement's text when the database has such
        # functions: a call of one by name (bare, qualified or quoted), None when it has none.
        self.session_calls: re.Pattern[bytes] | None = (
            call_pattern(self.session_functions) if self.session_functions else None
        )

    def with_session_functions(self, names: Iterable[str]) -> FunctionCatalog:
        """This catalog with more functions whose body may change session settings (ones
        just created, before pg_proc is read again)."""
        return FunctionCatalog(self._volatility, self.session_functions | {name.lower() for name in names})

    @classmethod
    def from_rows(cls, rows: Iterable[tuple]) -> FunctionCatalog:
        """From ``(nspname, proname, provolatile)`` rows of pg_proc joined to pg_namespace, or
        ``(nspname, proname, provolatile, sets_session)`` ones, where ``sets_session`` says
        the function's body may change session settings (a SET in PL/pgSQL, a set_config)."""
        volatility: dict[str, str] = {}
        session_functions: set[str] = set()
        for schema, name, provolatile, *more in rows:
            if more and more[0]:
                session_functions.add(name.lower())
            if provolatile not in _RANK:
                raise ValueError(f"provolatile of {schema}.{name} is {provolatile!r}")
            key = f"{schema}.{name}".lower()
            old = volatility.get(key)
            if old is None or _RANK[provolatile] > _RANK[old]:
                volatility[key] = provolatile
        return cls(volatility, session_functions)

    @classmethod
    def builtin(cls) -> FunctionCatalog:
        """The fallback catalog of common pg_catalog functions (build it once and share it)."""
        return cls.from_rows(builtin_rows())

    def __len__(self) -> int:
        return len(self._volatility)

    def __repr__(self) -> str:
        return f"<FunctionCatalog {len(self._volatility)} names>"

    def volatility(self, name: str, schema: str | None = None) -> str | None:
        """pg_proc volatility of ``[schema.]name`` (most volatile overload), None if unknown."""
        key = f"{schema}.{name}" if schema else name
        return self._volatility.get(key.lower())

    def check(self, name: str, schema: str | None = None) -> Reason | None:
        """Why a call of ``[schema.]name`` needs the primary; None if a replica may run it."""
        name = name.lower()
        schema = schema.lower() if schema else None
        builtin_name = schema is None or schema == CATALOG_SCHEMA
        if builtin_name:
            writer = WRITER_FUNCTIONS.get(name)
            if writer is not None:
                return writer
        volatility = self._volatility.get(f"{schema}.{name}" if schema else name)
        if volatility is None:
            return Reason.UNKNOWN_FUNCTION
        if volatility != VOLATILE:
            return None
        if builtin_name and name in REPLICA_SAFE_VOLATILE:
            # a bare name may also mean a volatile user function of that name
            if schema is not None or name not in self._shadowed:
                return None
        return Reason.VOLATILE_FUNCTION


def builtin_rows() -> list[tuple[str, str, str]]:
    """The fallback catalog as pg_proc rows ``(nspname, proname, provolatile)``, so a caller can
    extend it (tests add their own functions) and load it with ``FunctionCatalog.from_rows``."""
    return [
        (CATALOG_SCHEMA, name, volatility)
        for names, volatility in (
            (_BUILTIN_IMMUTABLE, IMMUTABLE),
            (_BUILTIN_STABLE, STABLE),
            (_BUILTIN_VOLATILE, VOLATILE),
        )
        for name in names.split()
    ]
