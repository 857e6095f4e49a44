#!/bin/bash
# Runs once, when the primary's data directory is first initialised (the postgres image runs
# every file in /docker-entrypoint-initdb.d against a temporary server, as the postgres user).
# Creates the replication user and the replica's slot, and the application's role and
# database that pgrouter's pooled server connections log in as.
# Written to work both executed and sourced (the image sources scripts without the x bit).
set -e

psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
    -v repl_user="$REPLICATION_USER" -v repl_password="$REPLICATION_PASSWORD" \
    -v repl_slot="$REPLICATION_SLOT" \
    -v app_user="$APP_USER" -v app_password="$APP_PASSWORD" -v app_db="$APP_DB" <<'SQL'
CREATE ROLE :"repl_user" WITH REPLICATION LOGIN PASSWORD :'repl_password';
-- The slot keeps the WAL the replica has not received yet, however long it is down.
SELECT pg_create_physical_replication_slot(:'repl_slot');
CREATE ROLE :"app_user" WITH LOGIN PASSWORD :'app_password';
CREATE DATABASE :"app_db" OWNER :"app_user";
SQL

# Replication connections match only `replication` lines, never `all`. The image's own
# `host all all all scram-sha-256` line is appended after this script, so ours is the only
# one that admits a replication connection from another container.
echo "host replication $REPLICATION_USER all scram-sha-256" >> "$PGDATA/pg_hba.conf"
