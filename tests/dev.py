"""`make dev`: a local primary with two streaming replicas and a Redis under .dev/, and the
router on 127.0.0.1:6432 in front of them. Ctrl-C stops what this started; the data stays,
so the next `make dev` starts in a second.

The generated configuration is .dev/pgrouter.toml; run `pgrouter run --config` on it to try
settings by hand while the cluster is up (`python -m tests.cluster up .dev/cluster`).
"""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path

import uvloop

from router.app import Router
from router.config import load_settings
from router.protocol.auth import scram_verifier
from tests.cluster import Cluster
from tests.harness import write_toml

DEV_DIR = Path(".dev")
DEV_USER, DEV_PASSWORD = "dev", "dev"
LISTEN_PORT = 6432


def dev_config(cluster: Cluster) -> dict:
    return {
        "listen_host": "127.0.0.1",
        "listen_port": LISTEN_PORT,
        "pool_mode": "transaction",
        "pool_size": 10,
        "clusters": {
            "local": {
                "primary": {"host": cluster.primary.host, "port": cluster.primary.port},
                "replicas": [{"host": r.host, "port": r.port} for r in cluster.replicas],
            }
        },
        # `app` has the pgbench tables; any other database name passes through as itself.
        "databases": {
            "app": {"cluster": "local", "server_user": "postgres"},
            "*": {"cluster": "local", "server_user": "postgres"},
        },
        "users": {DEV_USER: {"auth": "scram-sha-256", "password": scram_verifier(DEV_PASSWORD)}},
    }


async def serve(config_path: Path) -> None:
    router = Router(load_settings(config_path))
    await router.start()
    print(
        "\npgrouter is up. Connect with:\n\n"
        f"    psql 'postgresql://{DEV_USER}:{DEV_PASSWORD}@127.0.0.1:{router.port}/app'\n\n"
        f"configuration: {config_path}   (Ctrl-C stops the router, the cluster and Redis)\n",
        flush=True,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    print("\nstopping ...", flush=True)
    await router.stop()


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    DEV_DIR.mkdir(exist_ok=True)
    cluster = Cluster(DEV_DIR / "cluster", replicas=2, redis=True, ssl=True, reuse=True)
    try:
        cluster.start()
        for node in cluster.nodes:
            print(f"{node.name:9} {node.dsn()}")
        print(f"redis     {cluster.redis_url}")
        config_path = write_toml(DEV_DIR / "pgrouter.toml", dev_config(cluster))
        uvloop.run(serve(config_path))
    finally:
        cluster.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
