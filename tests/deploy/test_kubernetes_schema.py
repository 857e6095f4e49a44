"""Every object under deploy/kubernetes/ against the Kubernetes JSON schemas.

kubernetes-validate (PyPI) bundles the schemas of each Kubernetes minor version in the
package itself, so validation reads local files only; the strict variants also reject
fields the API does not know (a typo like `readinessProbes` would otherwise pass silently).
"""

from __future__ import annotations

import copy
import socket
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate import utils as kv_utils

from tests.deploy.artifacts import KUBERNETES, KUSTOMIZATION, manifest_files, manifests

# The oldest and the newest Kubernetes versions whose schemas the installed validator ships.
_MINORS = sorted(
    {kv_utils.major_minor(v) for v in kv_utils.all_versions()},
    key=lambda v: tuple(int(n) for n in v.split(".")),
)
VERSIONS = [_MINORS[0], _MINORS[-1]]

EXPECTED_KINDS = {
    "ConfigMap",
    "Secret",
    "Deployment",
    "Service",
    "PodDisruptionBudget",
    "HorizontalPodAutoscaler",
}


def validate(doc: dict[str, Any], version: str) -> None:
    """Raise unless the object is valid. A kind without a schema is an error, not a skip."""
    kubernetes_validate.validate(doc, version, strict=True)


def deployment() -> dict[str, Any]:
    (doc,) = [doc for _, doc in manifests() if doc["kind"] == "Deployment"]
    return copy.deepcopy(doc)


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize(
    ("name", "doc"),
    manifests(),
    ids=[f"{name}:{doc['kind']}/{doc['metadata']['name']}" for name, doc in manifests()],
)
def test_manifest_is_valid(name: str, doc: dict[str, Any], version: str) -> None:
    validate(doc, version)


def test_manifests_hold_the_expected_kinds() -> None:
    kinds = [doc["kind"] for _, doc in manifests()]
    assert set(kinds) == EXPECTED_KINDS
    assert kinds.count("Deployment") == 1


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((KUBERNETES / KUSTOMIZATION).read_text())
    assert kustomization["kind"] == "Kustomization"
    listed = kustomization["resources"]
    assert sorted(listed) == sorted(p.name for p in manifest_files())
    assert all((KUBERNETES / name).is_file() for name in listed)


# -- the validator really runs, and runs offline ----------------------------------------------


@pytest.mark.parametrize(
    ("case", "path", "value"),
    [
        ("replicas is a string", ("spec", "replicas"), "two"),
        ("misspelled field", ("spec", "template", "spec", "containers", 0, "readinessProbes"), {}),
        (
            "containerPort is a string",
            ("spec", "template", "spec", "containers", 0, "ports", 0, "containerPort"),
            "6432",
        ),
        ("restartPolicy is a number", ("spec", "template", "spec", "restartPolicy"), 1),
    ],
)
def test_validator_rejects_a_broken_deployment(case: str, path: tuple, value: Any) -> None:
    doc = deployment()
    validate(doc, VERSIONS[-1])  # the unbroken one passes
    target = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(doc, VERSIONS[-1])


def test_validator_rejects_a_container_without_a_name() -> None:
    doc = deployment()
    del doc["spec"]["template"]["spec"]["containers"][0]["name"]
    with pytest.raises(kubernetes_validate.ValidationError, match="'name' is a required property"):
        validate(doc, VERSIONS[-1])


def test_validator_rejects_a_deployment_without_a_selector() -> None:
    doc = deployment()
    del doc["spec"]["selector"]
    with pytest.raises(kubernetes_validate.ValidationError, match="'selector' is a required"):
        validate(doc, VERSIONS[-1])


def test_an_unknown_kind_is_an_error() -> None:
    doc = {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}}
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):
        validate(doc, VERSIONS[-1])


def test_validation_needs_no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(*args: Any, **kwargs: Any) -> socket.socket:
        raise AssertionError("the validator opened a socket")

    monkeypatch.setattr(socket, "socket", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    for _, doc in manifests():
        validate(doc, VERSIONS[-1])
