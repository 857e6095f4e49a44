"""Benchmarks: pgbench against PostgreSQL directly, through PgBouncer and through pgrouter."""
