"""The deployment files under test, loaded once: the Dockerfile, docker-compose.yml and the
Kubernetes manifests, plus the small helpers the tests share."""

from __future__ import annotations

import fnmatch
import http.server
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from tests.deploy import dockerfile

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
COMPOSE_FILE = DEPLOY / "docker-compose.yml"
KUSTOMIZATION = "kustomization.yaml"

# Settings the operations issue describes (admin API, Redis registry, shutdown, workers)
# that router/config.py may not define yet: the deployment sets them already.
OPERATIONS_SETTINGS = frozenset(
    {
        "admin_host",
        "admin_port",
        "admin_token",
        "redis_url",
        "secret_key",
        "shutdown_timeout",
        "workers",
    }
)


@cache
def dockerfile_instructions() -> tuple[dockerfile.Instruction, ...]:
    return tuple(dockerfile.parse((ROOT / "Dockerfile").read_text()))


def image_command() -> list[str]:
    """What the image runs: the final stage's ENTRYPOINT followed by its CMD (exec forms)."""
    stage = dockerfile.final_stage(list(dockerfile_instructions()))
    argv: list[str] = []
    for keyword in ("ENTRYPOINT", "CMD"):
        found = [i for i in stage if i.keyword == keyword]
        if found:
            form = found[-1].exec_form()
            assert form is not None, f"{keyword} at line {found[-1].line} is not in exec form"
            argv += form
    return argv


def image_config_path() -> str:
    argv = image_command()
    return argv[argv.index("--config") + 1]


def image_config_source() -> Path:
    """The repository file the image carries at its --config path."""
    stage = dockerfile.final_stage(list(dockerfile_instructions()))
    copies = [i.arguments.split() for i in stage if i.keyword == "COPY"]
    sources = [words[-2] for words in copies if words[-1] == image_config_path()]
    assert sources, f"nothing is copied to {image_config_path()}"
    return ROOT / sources[-1]


@cache
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def compose_environment(service: str) -> dict[str, str]:
    """A service's environment as the container sees it (compose turns `$$` into `$`)."""
    env = compose()["services"][service].get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {name: str(value).replace("$$", "$") for name, value in env.items()}


def manifest_files() -> list[Path]:
    return sorted(p for p in KUBERNETES.glob("*.yaml") if p.name != KUSTOMIZATION)


@cache
def _load_manifests() -> tuple[tuple[str, dict[str, Any]], ...]:
    return tuple(
        (path.name, doc)
        for path in manifest_files()
        for doc in yaml.safe_load_all(path.read_text())
        if doc
    )


def manifests() -> list[tuple[str, dict[str, Any]]]:
    """(file name, object) for every object under deploy/kubernetes/, kustomization aside."""
    return list(_load_manifests())


def objects(kind: str) -> dict[str, dict[str, Any]]:
    """The objects of one kind, by metadata.name."""
    return {doc["metadata"]["name"]: doc for _, doc in manifests() if doc["kind"] == kind}


def the_deployment() -> dict[str, Any]:
    (deployment,) = objects("Deployment").values()
    return deployment


def the_container() -> dict[str, Any]:
    (container,) = the_deployment()["spec"]["template"]["spec"]["containers"]
    return container


def container_env() -> dict[str, str]:
    """The container's environment from its envFrom ConfigMaps and Secrets and its env."""
    container = the_container()
    configmaps, secrets = objects("ConfigMap"), objects("Secret")
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(configmaps[source["configMapRef"]["name"]]["data"])
        else:
            secret = secrets[source["secretRef"]["name"]]
            env.update(secret.get("stringData", {}))
    for item in container.get("env", []):
        env[item["name"]] = item["value"]
    return env


def dockerignored(relative: str) -> bool:
    """Whether .dockerignore keeps a path (relative to the context) out of the build
    context: a pattern excludes a path it matches or any parent of it; `!` re-includes;
    the last matching line wins, as in Docker."""
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    parts = Path(relative).parts
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        alternatives = {pattern, pattern.removeprefix("**/")}
        if any(fnmatch.fnmatchcase(c, p) for c in candidates for p in alternatives):
            excluded = not negate
    return excluded


class _StatusHandler(http.server.BaseHTTPRequestHandler):
    statuses: dict[str, int] = {}

    def do_GET(self) -> None:  # noqa: N802 - the name http.server dispatches to
        self.send_response(self.statuses.get(self.path, 404))
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextmanager
def http_server(statuses: dict[str, int]) -> Iterator[int]:
    """A local HTTP server answering each path with a status; yields its port."""
    handler = type("Handler", (_StatusHandler,), {"statuses": statuses})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def run_python_probe(argv: list[str], admin_port: int, port: int) -> int:
    """Run a `python -c ...` health check with its admin port redirected; its exit status."""
    assert argv[0] == "python" and argv[1] == "-c", argv
    code = argv[2].replace(f"127.0.0.1:{admin_port}/", f"127.0.0.1:{port}/")
    assert code != argv[2], f"no http://127.0.0.1:{admin_port}/ URL in {argv[2]!r}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=30)
    return done.returncode
