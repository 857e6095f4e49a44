"""What the schemas cannot see: the Kubernetes objects name each other correctly, agree with
the image, and keep the Deployment's safety settings."""

from __future__ import annotations

from typing import Any

from tests.deploy import dockerfile
from tests.deploy.artifacts import (
    container_env,
    dockerfile_instructions,
    image_config_path,
    objects,
    the_container,
    the_deployment,
)


def pod_spec() -> dict[str, Any]:
    return the_deployment()["spec"]["template"]["spec"]


def pod_labels() -> dict[str, str]:
    return the_deployment()["spec"]["template"]["metadata"]["labels"]


def selects_the_pods(match_labels: dict[str, str]) -> bool:
    return bool(match_labels) and match_labels.items() <= pod_labels().items()


def container_ports() -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in the_container()["ports"]}


def probe(kind: str) -> dict[str, Any]:
    return the_container()[kind]["httpGet"]


def test_deployment_selector_matches_its_pod_labels() -> None:
    assert selects_the_pods(the_deployment()["spec"]["selector"]["matchLabels"])


def test_service_selector_matches_the_pods() -> None:
    for service in objects("Service").values():
        assert selects_the_pods(service["spec"]["selector"]), service["metadata"]["name"]


def test_service_ports_target_container_ports() -> None:
    ports = container_ports()
    (service,) = objects("Service").values()
    for port in service["spec"]["ports"]:
        target = port.get("targetPort", port["port"])
        assert target in ports or target in ports.values(), port
        number = ports[target] if isinstance(target, str) else target
        assert port["port"] == number, "clients and the router should agree on the port"
    assert {p["port"] for p in service["spec"]["ports"]} == {6432, 8080}


def test_container_ports_are_the_configured_ones() -> None:
    env = container_env()
    assert container_ports() == {
        "postgres": int(env["PGROUTER_LISTEN_PORT"]),
        "admin": int(env["PGROUTER_ADMIN_PORT"]),
    }
    assert container_ports() == {"postgres": 6432, "admin": 8080}


def test_probes_use_the_admin_port() -> None:
    ports = container_ports()
    for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
        port = probe(kind)["port"]
        assert port in ports, f"{kind} names no container port: {port!r}"
        assert ports[port] == ports["admin"], kind


def test_readiness_asks_readyz_and_liveness_asks_healthz() -> None:
    assert probe("readinessProbe")["path"] == "/readyz"
    assert probe("livenessProbe")["path"] == "/healthz"
    assert probe("startupProbe")["path"] == "/healthz"


def test_metrics_annotations_point_at_the_admin_port() -> None:
    annotations = the_deployment()["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == container_ports()["admin"]
    assert annotations["prometheus.io/path"] == "/metrics"


def test_pdb_selects_the_pods() -> None:
    (pdb,) = objects("PodDisruptionBudget").values()
    assert selects_the_pods(pdb["spec"]["selector"]["matchLabels"])


def test_hpa_targets_the_deployment_on_cpu() -> None:
    (hpa,) = objects("HorizontalPodAutoscaler").values()
    deployment = the_deployment()
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": deployment["apiVersion"],
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Resource" and metric["resource"]["name"] == "cpu"
    assert 2 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    # Utilization is relative to the request: without one the HPA cannot scale.
    assert "cpu" in the_container()["resources"]["requests"]
    # The HPA owns the replica count; a fixed one would be reset by every apply.
    assert "replicas" not in deployment["spec"]


def test_topology_spread_selects_the_pods() -> None:
    for constraint in pod_spec().get("topologySpreadConstraints", []):
        assert selects_the_pods(constraint["labelSelector"]["matchLabels"])


def test_env_sources_exist() -> None:
    configmaps, secrets = objects("ConfigMap"), objects("Secret")
    sources = the_container()["envFrom"]
    assert {"configMapRef", "secretRef"} <= {key for source in sources for key in source}
    for source in sources:
        if "configMapRef" in source:
            assert source["configMapRef"]["name"] in configmaps
        if "secretRef" in source:
            assert source["secretRef"]["name"] in secrets
    for item in the_container().get("env", []):
        ref = item.get("valueFrom", {})
        if "secretKeyRef" in ref:
            assert ref["secretKeyRef"]["key"] in secrets[ref["secretKeyRef"]["name"]]["stringData"]
        if "configMapKeyRef" in ref:
            assert (
                ref["configMapKeyRef"]["key"] in configmaps[ref["configMapKeyRef"]["name"]]["data"]
            )


def test_volumes_exist_and_mount_the_config_where_the_image_reads_it() -> None:
    configmaps = objects("ConfigMap")
    volumes = {v["name"]: v for v in pod_spec()["volumes"]}
    mounted_files = set()
    for mount in the_container()["volumeMounts"]:
        volume = volumes[mount["name"]]
        if "configMap" in volume:
            data = configmaps[volume["configMap"]["name"]]["data"]
            for item in volume["configMap"]["items"]:
                assert item["key"] in data
                mounted_files.add(f"{mount['mountPath']}/{item['path']}")
    assert image_config_path() in mounted_files


def test_every_container_has_an_image() -> None:
    for container in pod_spec()["containers"] + pod_spec().get("initContainers", []):
        assert container.get("image"), container["name"]


def test_security_context() -> None:
    pod = pod_spec()["securityContext"]
    container = the_container()["securityContext"]
    assert pod["runAsNonRoot"] is True
    assert container["allowPrivilegeEscalation"] is False
    assert container["readOnlyRootFilesystem"] is True
    assert container.get("privileged", False) is False
    assert container["capabilities"]["drop"] == ["ALL"]
    # The image's USER, so that file ownership in the image and the pod agree.
    stage = dockerfile.final_stage(list(dockerfile_instructions()))
    user = [i for i in stage if i.keyword == "USER"][-1]
    assert str(pod["runAsUser"]) == user.arguments.partition(":")[0]


def test_writable_tmp_on_a_read_only_root() -> None:
    volumes = {v["name"]: v for v in pod_spec()["volumes"]}
    (tmp,) = [m for m in the_container()["volumeMounts"] if m["mountPath"] == "/tmp"]
    assert "emptyDir" in volumes[tmp["name"]]


def test_resources_have_requests_and_memory_limit() -> None:
    resources = the_container()["resources"]
    assert {"cpu", "memory"} <= resources["requests"].keys()
    assert "memory" in resources["limits"]


def test_grace_period_outlasts_the_drain() -> None:
    env = container_env()
    pre_stop = the_container()["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    pause = int(pre_stop[1])
    shutdown = float(env["PGROUTER_SHUTDOWN_TIMEOUT"])
    assert pod_spec()["terminationGracePeriodSeconds"] > pause + shutdown


def test_no_service_links_in_the_settings_namespace() -> None:
    # Service `pgrouter` would inject PGROUTER_PORT, PGROUTER_SERVICE_HOST, ... otherwise.
    assert pod_spec()["enableServiceLinks"] is False


def test_the_image_default_command_is_not_overridden() -> None:
    container = the_container()
    assert "command" not in container and "args" not in container
    stage = dockerfile.final_stage(list(dockerfile_instructions()))
    assert any(i.keyword == "ENTRYPOINT" for i in stage)


def test_rollout_never_drops_below_the_current_count() -> None:
    rolling = the_deployment()["spec"]["strategy"]["rollingUpdate"]
    assert rolling["maxUnavailable"] == 0 and rolling["maxSurge"] >= 1
