"""`make dev`: a local primary with two streaming replicas and a Redis under .dev/, and the
router on 127.0.0.1:6432 in front of them. Ctrl-C stops what this started; the data stays,
so the next `make dev` starts in a second.

The generated configuration is .dev/pgrouter.toml; run `pgrouter run --config` on it to try
settings by hand while the cluster is up (`python -m tests.cluster up .dev/cluster`).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import signal
from pathlib import Path

import uvloop

from router.app import Router
from router.config import load_settings
from router.protocol.auth import scram_verifier
from router.registry.crypto import Keyring, generate_key
from router.registry.errors import TenantExists
from router.registry.models import TenantCreate
from router.registry.store import RedisStore
from tests.cluster import Cluster
from tests.harness import write_toml

DEV_DIR = Path(".dev")
DEV_USER, DEV_PASSWORD = "dev", "dev"
LISTEN_PORT = 6432
ADMIN_PORT = 8080
DEMO_TENANT = "demo"


def dev_secret(name: str, make) -> str:
    """A secret kept under .dev/, so the registry stays readable across runs."""
    path = DEV_DIR / name
    if not path.exists():
        path.write_text(make())
        path.chmod(0o600)
    return path.read_text().strip()


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
        # `app` has the pgbench tables. Tenants (the demo one, and "*" that passes any other
        # database name through as itself) live in Redis, registered by register_tenants().
        "databases": {"app": {"cluster": "local", "server_user": "postgres"}},
        "users": {DEV_USER: {"auth": "scram-sha-256", "password": scram_verifier(DEV_PASSWORD)}},
        "redis_url": cluster.redis_url,
        "secret_key": dev_secret("secret.key", lambda: f"dev1:{generate_key()}"),
        "admin_port": ADMIN_PORT,
        "admin_token": dev_secret("admin.token", lambda: secrets.token_urlsafe(24)),
        "log_format": "text",
    }


async def register_tenants(cluster: Cluster, config: dict) -> None:
    """The demo tenant (database app, user dev/dev) and the passthrough tenant "*"."""
    store = RedisStore.from_url(config["redis_url"], Keyring.from_specs(config["secret_key"]),
                                prefix="pgrouter:")
    nodes = {"primary": {"host": cluster.primary.host, "port": cluster.primary.port},
             "replicas": [{"host": r.host, "port": r.port} for r in cluster.replicas]}
    try:
        for tenant_id in (DEMO_TENANT, "*"):
            body = TenantCreate(tenant_id=tenant_id, cluster=nodes, database="app",
                                server_user="postgres",
                                users=[{"name": DEV_USER, "password": DEV_PASSWORD}])
            try:
                await store.create(body)
            except TenantExists:
                pass
    finally:
        await store.close()


async def serve(cluster: Cluster, config: dict, config_path: Path) -> None:
    await register_tenants(cluster, config)
    router = Router(load_settings(config_path))
    await router.start()
    admin = f"http://127.0.0.1:{router.admin.port}" if router.admin is not None else "(off)"
    print(
        "\npgrouter is up. Connect with (tenant demo: reads on replicas, writes on the primary):\n\n"
        f"    psql 'postgresql://{DEV_USER}:{DEV_PASSWORD}@127.0.0.1:{router.port}/{DEMO_TENANT}'\n\n"
        f"admin API: {admin}   token: {config['admin_token']}\n"
        f"    curl -H 'Authorization: Bearer {config['admin_token']}' {admin}/tenants\n\n"
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
        config = dev_config(cluster)
        config_path = write_toml(DEV_DIR / "pgrouter.toml", config)
        uvloop.run(serve(cluster, config, config_path))
    finally:
        cluster.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
