"""deploy/docker-compose.yml: a PostgreSQL 15 primary, a streaming replica cloned with
pg_basebackup -R, Redis 7 and the router built from the Dockerfile, each with a health check,
started in order, and the router's environment pointing at the others."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from scramp import ScramMechanism

from router.protocol.auth import ScramVerifier
from tests.deploy.artifacts import (
    COMPOSE_FILE,
    DEPLOY,
    ROOT,
    compose,
    compose_environment,
    http_server,
    run_python_probe,
)

PRIMARY, REPLICA, REDIS, ROUTER = "postgres-primary", "postgres-replica", "redis", "pgrouter"
CLIENT_DSN = "postgresql://app:app-secret@127.0.0.1:6432/app"


def service(name: str) -> dict[str, Any]:
    return compose()["services"][name]


def bind_mounts(name: str) -> dict[str, Path]:
    """A service's bind mounts: container path -> file in the repository."""
    mounts = {}
    for volume in service(name).get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith("."):
            mounts[target] = (DEPLOY / source).resolve()
    return mounts


def shell_command(script: str, program: str) -> list[str]:
    """The words of the first command line of a shell script that runs `program`, with
    continuation lines joined."""
    joined = re.sub(r"\\\n", " ", script)
    for line in joined.splitlines():
        words = shlex.split(line, comments=True)
        if program in words:
            return words[words.index(program) :]
    raise AssertionError(f"{program} is not run")


def router_setting(name: str) -> Any:
    return json.loads(compose_environment(ROUTER)[name])


def test_services() -> None:
    assert set(compose()["services"]) == {PRIMARY, REPLICA, REDIS, ROUTER}
    assert service(PRIMARY)["image"] == "postgres:15"
    assert service(REPLICA)["image"] == "postgres:15"
    assert service(REDIS)["image"] == "redis:7"


def test_router_is_built_from_the_dockerfile() -> None:
    build = service(ROUTER)["build"]
    context = (DEPLOY / build["context"]).resolve()
    assert context == ROOT
    assert (context / build.get("dockerfile", "Dockerfile")).resolve() == ROOT / "Dockerfile"


@pytest.mark.parametrize("name", [PRIMARY, REPLICA, REDIS, ROUTER])
def test_every_service_has_a_healthcheck(name: str) -> None:
    check = service(name)["healthcheck"]
    assert check["test"][0] in ("CMD", "CMD-SHELL") and len(check["test"]) > 1
    assert "interval" in check and "retries" in check


def test_postgres_healthchecks_use_tcp() -> None:
    # The image's init-time server listens on the Unix socket only: a socket check would
    # pass before the init scripts finish.
    for name in (PRIMARY, REPLICA):
        test = " ".join(service(name)["healthcheck"]["test"][1:])
        assert re.search(r"pg_isready .*--host=127\.0\.0\.1", test), name
    assert "pg_is_in_recovery()" in " ".join(service(REPLICA)["healthcheck"]["test"])


def test_start_order_waits_for_health() -> None:
    def waits_for(name: str) -> dict[str, str]:
        return {dep: c["condition"] for dep, c in service(name)["depends_on"].items()}

    healthy = "service_healthy"
    assert waits_for(REPLICA) == {PRIMARY: healthy}
    assert waits_for(ROUTER) == {PRIMARY: healthy, REPLICA: healthy, REDIS: healthy}


def test_bind_mounted_files_exist() -> None:
    for name in compose()["services"]:
        for target, source in bind_mounts(name).items():
            assert source.is_file(), f"{name}: {source} for {target} is missing"


def test_primary_init_creates_the_replication_user_and_slot() -> None:
    mounts = bind_mounts(PRIMARY)
    (init,) = [src for dst, src in mounts.items() if dst.startswith("/docker-entrypoint-initdb.d/")]
    assert init.is_relative_to(DEPLOY / "compose")
    script = init.read_text()
    assert 'CREATE ROLE :"repl_user" WITH REPLICATION LOGIN' in script
    assert "pg_create_physical_replication_slot(:'repl_slot')" in script
    assert re.search(r"host replication \$REPLICATION_USER all scram-sha-256", script)
    psql = shell_command(script, "psql")
    env = compose_environment(PRIMARY)
    for variable in re.findall(r"\$(\w+)", " ".join(psql)):
        assert variable in env, f"the init script reads {variable}, which the primary lacks"


def test_replica_clones_the_primary_with_pg_basebackup() -> None:
    replica = service(REPLICA)
    entrypoint = replica["entrypoint"]
    script_path = bind_mounts(REPLICA)[entrypoint[-1]]
    script = script_path.read_text()
    basebackup = shell_command(script, "pg_basebackup")
    assert "--write-recovery-conf" in basebackup or "-R" in basebackup
    options = dict(w.removeprefix("--").split("=", 1) for w in basebackup if "=" in w)
    env = compose_environment(REPLICA)
    primary_env = compose_environment(PRIMARY)
    assert options["host"] == "$PRIMARY_HOST" and env["PRIMARY_HOST"] == PRIMARY
    assert options["port"] == "$PRIMARY_PORT" and env["PRIMARY_PORT"] == "5432"
    assert options["pgdata"] == "$PGDATA"
    assert options["wal-method"] == "stream"
    # The replica logs in as the user, with the password and slot, the primary created.
    assert options["username"] == "$REPLICATION_USER"
    assert options["slot"] == "$REPLICATION_SLOT"
    for variable in ("REPLICATION_USER", "REPLICATION_PASSWORD", "REPLICATION_SLOT"):
        assert env[variable] == primary_env[variable], variable
    # Cloned only into an empty data directory, then the server itself takes over.
    assert '[ ! -s "$PGDATA/PG_VERSION" ]' in script
    assert script.rstrip().endswith("exec postgres")
    assert replica["user"] == "postgres"  # postgres refuses to run as root


def test_router_environment_points_at_the_services() -> None:
    (cluster,) = router_setting("PGROUTER_CLUSTERS").values()
    assert cluster["primary"] == {"host": PRIMARY, "port": 5432}
    assert cluster["replicas"] == [{"host": REPLICA, "port": 5432}]
    redis = urlsplit(compose_environment(ROUTER)["PGROUTER_REDIS_URL"])
    assert (redis.scheme, redis.hostname, redis.port or 6379) == ("redis", REDIS, 6379)


def test_router_database_logs_in_as_the_role_the_primary_creates() -> None:
    primary = compose_environment(PRIMARY)
    (database,) = router_setting("PGROUTER_DATABASES").values()
    assert database["dbname"] == primary["APP_DB"]
    assert database["server_user"] == primary["APP_USER"]
    assert database["server_password"] == primary["APP_PASSWORD"]


def test_client_login_matches_the_documented_dsn() -> None:
    assert CLIENT_DSN in COMPOSE_FILE.read_text()
    user = urlsplit(CLIENT_DSN)
    login = router_setting("PGROUTER_USERS")[user.username]
    assert login["auth"] == "scram-sha-256"
    verifier = ScramVerifier.parse(login["password"])
    _, stored_key, _, _ = ScramMechanism().make_auth_info(
        user.password, iteration_count=verifier.iterations, salt=verifier.salt
    )
    assert stored_key == verifier.stored_key


def strings(value: Any) -> list[str]:
    if isinstance(value, dict):
        return [s for item in value.items() for part in item for s in strings(part)]
    if isinstance(value, list):
        return [s for item in value for s in strings(item)]
    return [value] if isinstance(value, str) else []


def test_no_variable_comes_from_the_host() -> None:
    # Compose substitutes a lone `$NAME` from the host's environment (`$$` is a literal `$`):
    # the file is meant to be self-contained.
    assert [s for s in strings(compose()) if "$" in s.replace("$$", "")] == []


def test_router_ports_and_shutdown() -> None:
    router = service(ROUTER)
    published = {p.rsplit(":", 2)[-1] for p in router["ports"]}
    assert published == {"6432", "8080"}
    assert all(p.startswith("127.0.0.1:") for p in router["ports"]), "local use only"
    grace = int(router["stop_grace_period"].removesuffix("s"))
    assert grace > float(compose_environment(ROUTER)["PGROUTER_SHUTDOWN_TIMEOUT"])


def test_router_runs_confined() -> None:
    router = service(ROUTER)
    assert router["read_only"] is True and "/tmp" in router["tmpfs"]
    assert router["cap_drop"] == ["ALL"]
    assert "no-new-privileges:true" in router["security_opt"]


@pytest.mark.parametrize(("status", "healthy"), [(200, True), (503, False)])
def test_router_healthcheck_asks_readyz(status: int, healthy: bool) -> None:
    argv = service(ROUTER)["healthcheck"]["test"][1:]
    assert "http://127.0.0.1:8080/readyz" in argv[-1]
    with http_server({"/readyz": status, "/healthz": 200}) as port:
        assert (run_python_probe(argv, 8080, port) == 0) is healthy
