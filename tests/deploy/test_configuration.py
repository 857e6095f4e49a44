"""The configuration the deployments hand the router: real setting names, loading into
router.config.Settings, and secrets kept out of the repository."""

from __future__ import annotations

import base64
import typing
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from router.config import Settings, load_settings
from router.protocol.auth import scram_verifier
from tests.deploy import dockerfile
from tests.deploy.artifacts import (
    OPERATIONS_SETTINGS,
    compose_environment,
    container_env,
    dockerfile_instructions,
    image_config_path,
    image_config_source,
    objects,
)

PLACEHOLDER = "REPLACE_ME"


def is_setting(variable: str) -> bool:
    """Whether PGROUTER_A__B__C names a setting: `a` a Settings field (or one of the
    operations settings still being built), each further part a key of a dict or a field of
    a model below it."""
    parts = variable.removeprefix("PGROUTER_").lower().split("__")
    field = Settings.model_fields.get(parts[0])
    if field is None:
        return len(parts) == 1 and parts[0] in OPERATIONS_SETTINGS
    annotation: Any = field.annotation
    for part in parts[1:]:
        if typing.get_origin(annotation) is dict:
            annotation = typing.get_args(annotation)[1]  # any key: the name of a database, ...
        elif isinstance(annotation, type) and issubclass(annotation, BaseModel):
            if part not in annotation.model_fields:
                return False
            annotation = annotation.model_fields[part].annotation
        else:
            return False
    return True


def dockerfile_env() -> dict[str, str]:
    return dockerfile.env_values(dockerfile.final_stage(list(dockerfile_instructions())))


ENVIRONMENTS = {
    "Dockerfile": dockerfile_env,
    "docker-compose pgrouter": lambda: compose_environment("pgrouter"),
    "kubernetes container": container_env,
}


def kubernetes_config_file(tmp_path: Path) -> Path:
    """The ConfigMap's file, written where load_settings can read it."""
    for configmap in objects("ConfigMap").values():
        name = Path(image_config_path()).name
        if name in configmap["data"]:
            path = tmp_path / name
            path.write_text(configmap["data"][name])
            return path
    raise AssertionError(f"no ConfigMap holds {image_config_path()}")


def filled_in(env: dict[str, str]) -> dict[str, str]:
    """The Kubernetes environment with the placeholders that have a format (a SCRAM verifier,
    a key) replaced by well-formed values; the others are accepted as they are."""
    usable = {
        f"{PLACEHOLDER}-scram-verifier": scram_verifier("pw"),
        f"{PLACEHOLDER}-kid:{PLACEHOLDER}-base64key": "k1:" + base64.b64encode(bytes(32)).decode(),
    }
    filled = {}
    for name, value in env.items():
        for placeholder, replacement in usable.items():
            value = value.replace(placeholder, replacement)
        filled[name] = value
    return filled


def test_is_setting_tells_real_names_from_typos() -> None:
    assert is_setting("PGROUTER_LISTEN_PORT")
    assert is_setting("PGROUTER_DATABASES__APP__SERVER_PASSWORD")
    assert is_setting("PGROUTER_ADMIN_TOKEN")
    assert not is_setting("PGROUTER_LISTEN_PROT")
    assert not is_setting("PGROUTER_DATABASES__APP__SERVER_PASWORD")
    assert not is_setting("PGROUTER_ADMIN_TOKEN__X")


@pytest.mark.parametrize("source", ENVIRONMENTS)
def test_every_variable_names_a_setting(source: str) -> None:
    env = ENVIRONMENTS[source]()
    names = [name for name in env if name.startswith("PGROUTER_")]
    assert names
    assert [name for name in names if not is_setting(name)] == []


def test_kubernetes_configuration_loads(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name, value in filled_in(container_env()).items():
        clean_env.setenv(name, value)
    settings = load_settings(kubernetes_config_file(tmp_path))
    assert settings.listen_host == "0.0.0.0" and settings.listen_port == 6432
    assert settings.databases, "the ConfigMap declares no database"
    secret = container_env()
    for name, database in settings.databases.items():
        # The password comes from the Secret, under the database's own name.
        key = f"PGROUTER_DATABASES__{name.upper()}__SERVER_PASSWORD"
        assert database.server_password == secret[key]
        assert database.cluster in settings.clusters
    assert settings.users


def test_an_unedited_secret_cannot_start_a_router(
    clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for name, value in container_env().items():
        clean_env.setenv(name, value)
    with pytest.raises(ValidationError, match="SCRAM-SHA-256 verifier"):
        load_settings(kubernetes_config_file(tmp_path))


def test_secret_holds_only_placeholders() -> None:
    (secret,) = objects("Secret").values()
    values = {**secret.get("stringData", {}), **secret.get("data", {})}
    assert values
    assert {name for name, value in values.items() if PLACEHOLDER not in value} == set()


def test_compose_configuration_loads(clean_env: pytest.MonkeyPatch) -> None:
    for name, value in compose_environment("pgrouter").items():
        clean_env.setenv(name, value)
    settings = load_settings(image_config_source())
    assert set(settings.databases) == {"app"}
    assert set(settings.users) == {"app"}
