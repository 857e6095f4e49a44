#!/bin/bash
# The replica's entrypoint (run as the postgres user). On first start, with no data
# directory yet, clone the primary with pg_basebackup -R: it also writes standby.signal and
# primary_conninfo (with the slot), so the server then starts as a streaming hot standby.
# The clone brings the primary's pg_hba.conf and roles along.
set -euo pipefail

if [ ! -s "$PGDATA/PG_VERSION" ]; then
    # A clone interrupted earlier leaves a partial directory: start again from nothing.
    rm -rf "$PGDATA"
    echo "replica: cloning ${PRIMARY_HOST}:${PRIMARY_PORT} with pg_basebackup"
    PGPASSWORD="$REPLICATION_PASSWORD" pg_basebackup \
        --host="$PRIMARY_HOST" --port="$PRIMARY_PORT" --username="$REPLICATION_USER" \
        --no-password --pgdata="$PGDATA" --wal-method=stream --slot="$REPLICATION_SLOT" \
        --write-recovery-conf --checkpoint=fast
fi
exec postgres
