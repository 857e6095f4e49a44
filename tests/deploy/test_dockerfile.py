"""The Dockerfile: a slim Python base, a non-root numeric user, pgrouter as the command, the
ports, a working health check on /healthz and SIGTERM to stop; and the parser it is read with."""

from __future__ import annotations

import re
import tomllib

import pytest

from router.config import Settings, load_settings
from tests.deploy import dockerfile
from tests.deploy.artifacts import (
    ROOT,
    dockerfile_instructions,
    dockerignored,
    http_server,
    image_command,
    image_config_source,
    run_python_probe,
)

SLIM_PYTHON_311 = re.compile(r"^python:3\.11(\.\d+)?-slim(-[a-z]+)?(@sha256:[0-9a-f]{64})?$")


def final_stage() -> list[dockerfile.Instruction]:
    return dockerfile.final_stage(list(dockerfile_instructions()))


def only(keyword: str) -> dockerfile.Instruction:
    found = [i for i in final_stage() if i.keyword == keyword]
    assert found, f"no {keyword} in the final stage"
    return found[-1]


# -- the parser ------------------------------------------------------------------------------


def test_parser_joins_continuations_and_skips_comments() -> None:
    text = (
        "# syntax=docker/dockerfile:1\n"
        "FROM python:3.11-slim AS build\n"
        "RUN apt-get update \\\n"
        "    # a comment inside the continuation\n"
        " && rm -rf /var/lib/apt/lists/*\n"
        "\n"
        "from python:3.11-slim\n"
        'ENTRYPOINT ["pgrouter"]\n'
        "CMD pgrouter run\n"
    )
    parsed = dockerfile.parse(text)
    assert [(i.keyword, i.line, i.stage) for i in parsed] == [
        ("FROM", 2, 0),
        ("RUN", 3, 0),
        ("FROM", 7, 1),
        ("ENTRYPOINT", 8, 1),
        ("CMD", 9, 1),
    ]
    assert parsed[1].arguments == "apt-get update && rm -rf /var/lib/apt/lists/*"
    assert parsed[3].exec_form() == ["pgrouter"]
    assert parsed[4].exec_form() is None  # shell form
    assert dockerfile.from_image(parsed[0]) == "python:3.11-slim"


def test_parser_reads_env_and_healthcheck_forms() -> None:
    parsed = dockerfile.parse(
        'ENV A=1 B="two words"\n'
        "ENV C 3\n"
        "HEALTHCHECK --interval=5s --timeout=2s \\\n"
        '  CMD ["python", "-c", "pass"]\n'
        "HEALTHCHECK NONE\n"
    )
    assert dockerfile.env_values(parsed) == {"A": "1", "B": "two words", "C": "3"}
    check = dockerfile.healthcheck(parsed[2])
    assert check.options == {"interval": "5s", "timeout": "2s"}
    assert check.command == ["python", "-c", "pass"]
    assert dockerfile.healthcheck(parsed[3]).command is None


def test_parser_rejects_a_dangling_continuation() -> None:
    with pytest.raises(ValueError, match="continuation"):
        dockerfile.parse("FROM python:3.11-slim\nRUN true \\\n")


# -- the image -------------------------------------------------------------------------------


def test_final_stage_is_slim_python_311() -> None:
    image = dockerfile.from_image(final_stage()[0])
    assert SLIM_PYTHON_311.match(image), image


def test_every_stage_starts_from_slim_python_311() -> None:
    froms = [i for i in dockerfile_instructions() if i.keyword == "FROM"]
    for instruction in froms:
        assert SLIM_PYTHON_311.match(dockerfile.from_image(instruction)), instruction


def test_runs_as_a_numeric_non_root_user_before_the_command() -> None:
    stage = final_stage()
    users = [i for i in stage if i.keyword == "USER"]
    assert users, "the final stage never leaves root"
    user = users[-1]
    uid, _, gid = user.arguments.partition(":")
    # Numeric, so that Kubernetes' runAsNonRoot can check it without /etc/passwd.
    assert uid.isdigit() and int(uid) != 0, user.arguments
    assert not gid or (gid.isdigit() and int(gid) != 0), user.arguments
    commands = [i for i in stage if i.keyword in ("ENTRYPOINT", "CMD")]
    assert commands and all(user.line < i.line for i in commands)


def test_the_user_exists_in_the_image() -> None:
    uid = only("USER").arguments.partition(":")[0]
    runs = " ".join(i.arguments for i in final_stage() if i.keyword == "RUN")
    assert re.search(rf"useradd\b.*--uid {uid}\b", runs), runs


def test_runs_pgrouter_with_the_config_file() -> None:
    assert only("ENTRYPOINT").exec_form() is not None, "ENTRYPOINT in shell form ignores SIGTERM"
    assert image_command() == ["pgrouter", "run", "--config", "/etc/pgrouter/pgrouter.toml"]


def test_the_config_file_is_in_the_image_and_holds_no_settings(
    clean_env: pytest.MonkeyPatch,
) -> None:
    # Empty, so that the environment alone configures a container (docker-compose.yml).
    with open(image_config_source(), "rb") as fh:
        assert tomllib.load(fh) == {}
    assert load_settings(image_config_source()) == Settings()


def test_copied_sources_exist_and_are_in_the_build_context() -> None:
    for instruction in dockerfile_instructions():
        if instruction.keyword not in ("COPY", "ADD"):
            continue
        words = instruction.arguments.split()
        if any(w.startswith("--from") for w in words):
            continue
        for source in [w for w in words if not w.startswith("--")][:-1]:
            assert (ROOT / source).exists(), f"line {instruction.line}: {source} is missing"
            assert not dockerignored(source), (
                f"line {instruction.line}: .dockerignore drops {source}"
            )


@pytest.mark.parametrize(
    "path",
    [
        ".venv",
        ".dev",
        ".git",
        ".pytest_cache",
        ".hypothesis",
        ".ruff_cache",
        "bench/results",
        "router/__pycache__",
    ],
)
def test_dockerignore_keeps_local_state_out(path: str) -> None:
    assert dockerignored(path)


def test_exposes_client_and_admin_ports() -> None:
    exposed = {
        word.split("/")[0]
        for i in final_stage()
        if i.keyword == "EXPOSE"
        for word in i.arguments.split()
    }
    assert {"6432", "8080"} <= exposed


def test_environment_defaults_listen_on_all_interfaces_on_the_exposed_ports() -> None:
    env = dockerfile.env_values(final_stage())
    assert env["PGROUTER_LISTEN_HOST"] == "0.0.0.0"
    assert env["PGROUTER_ADMIN_HOST"] == "0.0.0.0"
    assert env.get("PGROUTER_LISTEN_PORT", "6432") == "6432"
    assert env.get("PGROUTER_ADMIN_PORT", "8080") == "8080"
    # pgrouter must be found on PATH by the exec-form ENTRYPOINT.
    assert env["PATH"].split(":")[0] == "/opt/pgrouter/bin"


def test_healthcheck_asks_healthz_on_the_admin_port() -> None:
    check = dockerfile.healthcheck(only("HEALTHCHECK"))
    assert isinstance(check.command, list), "exec form: no shell in the way"
    assert check.command[:2] == ["python", "-c"]
    assert "http://127.0.0.1:8080/healthz" in check.command[2]
    assert "timeout" in check.options


@pytest.mark.parametrize(
    ("status", "healthy"), [(200, True), (204, True), (500, False), (503, False)]
)
def test_healthcheck_command_passes_only_on_success(status: int, healthy: bool) -> None:
    check = dockerfile.healthcheck(only("HEALTHCHECK"))
    with http_server({"/healthz": status}) as port:
        returncode = run_python_probe(check.command, 8080, port)
    assert (returncode == 0) is healthy


def test_healthcheck_command_fails_when_nothing_listens() -> None:
    check = dockerfile.healthcheck(only("HEALTHCHECK"))
    with http_server({}) as port:
        pass  # closed again: nothing listens on this port now
    assert run_python_probe(check.command, 8080, port) != 0


def test_stops_with_sigterm() -> None:
    assert only("STOPSIGNAL").arguments in ("SIGTERM", "15")
