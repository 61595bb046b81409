"""deploy/kubernetes: the base and the example overlay render, every manifest is valid against
its schema (Kubernetes' own, or the vendored CRD schemas of KEDA and the Prometheus Operator), and
the deployment does what the README promises: probes, draining, scaling on the task queue,
an API that always runs, and credentials only in Secrets."""

from __future__ import annotations

import copy
import json
import textwrap
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest

from tests.deploy.kustomize import KustomizeError, Manifest, identity, render
from worker.service import DRAIN_GRACE_SECONDS

ROOT = Path(__file__).resolve().parents[2]
KUBERNETES = ROOT / "deploy" / "kubernetes"
SCHEMAS = Path(__file__).resolve().parent / "schemas"
OVERLAYS = ("overlays/example", "overlays/cluster")
TREES = ("base", *OVERLAYS)
# The oldest Kubernetes release the manifests are written for (the preStop `sleep` action is on
# by default from 1.30).
KUBERNETES_VERSION = "1.30"
CUSTOM_RESOURCES = {
    ("keda.sh/v1alpha1", "ScaledObject"): "keda-scaledobject-v1alpha1.json",
    ("keda.sh/v1alpha1", "TriggerAuthentication"): "keda-triggerauthentication-v1alpha1.json",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "monitoring-servicemonitor-v1.json",
    ("monitoring.coreos.com/v1", "PodMonitor"): "monitoring-podmonitor-v1.json",
    ("rabbitmq.com/v1beta1", "RabbitmqCluster"): "rabbitmq-rabbitmqcluster-v1beta1.json",
    ("postgresql.cnpg.io/v1", "Cluster"): "cnpg-cluster-v1.json",
}
SECRET_SETTINGS = frozenset(
    {
        "AGENTLESS_SIGNING_KEY",
        "AGENTLESS_API_TOKENS",
        "AGENTLESS_AMQP_URL",
        "AGENTLESS_DATABASE_URL",
    }
)


# The fields of a Secret that name rather than hold a credential: the RabbitMQ Cluster Operator's
# default-user format (the service binding spec), a basic-auth Secret's username.
BINDING_FIELDS = frozenset({"username", "host", "port", "provider", "type"})


@cache
def _rendered(tree: str) -> tuple[Manifest, ...]:
    return tuple(render(KUBERNETES / tree))


def rendered(tree: str) -> list[Manifest]:
    """A fresh copy of a tree's rendering, for a test to read (or spoil) as it likes."""
    return copy.deepcopy(list(_rendered(tree)))


def every_manifest(kind: str | None = None) -> Iterator[Any]:
    for tree in TREES:
        for manifest in _rendered(tree):
            if kind is None or manifest["kind"] == kind:
                group_kind, _, name = identity(manifest)
                yield pytest.param(tree, manifest, id=f"{tree}:{group_kind.lstrip('/')}/{name}")


def one(manifests: list[Manifest], kind: str, name: str) -> Manifest:
    (found,) = [m for m in manifests if m["kind"] == kind and m["metadata"]["name"] == name]
    return found


def of_kind(manifests: list[Manifest], kind: str) -> list[Manifest]:
    return [m for m in manifests if m["kind"] == kind]


def container(deployment: Manifest) -> dict[str, Any]:
    (only,) = deployment["spec"]["template"]["spec"]["containers"]
    assert isinstance(only, dict)
    return only


def running(manifests: list[Manifest], command: str) -> Manifest:
    """The one Deployment whose container runs `agentless <command>`."""
    (found,) = [
        d for d in of_kind(manifests, "Deployment") if container(d).get("args") == [command]
    ]
    return found


def port_number(spec: dict[str, Any], port: int | str) -> int:
    """A container port given by number or by name."""
    if isinstance(port, int):
        return port
    (number,) = [p["containerPort"] for p in spec["ports"] if p.get("name") == port]
    assert isinstance(number, int)
    return number


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and selector.items() <= labels.items()


def pod_labels(deployment: Manifest) -> dict[str, str]:
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert isinstance(labels, dict)
    return labels


def settings(manifests: list[Manifest]) -> dict[str, str]:
    data = one(manifests, "ConfigMap", "agentless-settings")["data"]
    assert isinstance(data, dict)
    return data


def strict(schema: Any) -> Any:
    """A CRD schema as the API server applies it: fields it does not declare are pruned, so a
    misspelt field would silently vanish. Here it is an error instead."""
    if isinstance(schema, dict):
        out = {key: strict(value) for key, value in schema.items()}
        if (
            "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    return schema


@cache
def custom_validator(file: str) -> jsonschema.Draft7Validator:
    schema = strict(json.loads((SCHEMAS / file).read_text(encoding="utf-8")))
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


# --- rendering and schemas -------------------------------------------------------------------


@pytest.mark.parametrize("tree", OVERLAYS)
def test_the_overlay_puts_everything_in_its_namespace(tree: str) -> None:
    manifests = rendered(tree)
    namespaces = {m["metadata"].get("namespace") for m in manifests if m["kind"] != "Namespace"}
    assert namespaces == {"agentless"}
    assert [m["metadata"]["name"] for m in of_kind(manifests, "Namespace")] == ["agentless"]


@pytest.mark.parametrize(("tree", "manifest"), every_manifest())
def test_every_manifest_is_valid(tree: str, manifest: Manifest) -> None:
    key = (manifest["apiVersion"], manifest["kind"])
    if key in CUSTOM_RESOURCES:
        errors = [
            f"{'.'.join(map(str, error.absolute_path))}: {error.message}"
            for error in custom_validator(CUSTOM_RESOURCES[key]).iter_errors(manifest)
        ]
        assert errors == []
    else:
        # Strict: a field Kubernetes does not know is an error, not something silently dropped.
        kubernetes_validate.validate(manifest, KUBERNETES_VERSION, strict=True)


def test_a_misspelt_field_of_a_custom_resource_is_caught() -> None:
    scaled = one(rendered("base"), "ScaledObject", "agentless-worker")
    scaled["spec"]["minReplicas"] = 1
    validator = custom_validator(CUSTOM_RESOURCES[("keda.sh/v1alpha1", "ScaledObject")])
    assert not validator.is_valid(scaled)


def test_a_misspelt_field_of_a_core_kind_is_caught() -> None:
    api = running(rendered("base"), "api")
    container(api)["readinessprobe"] = container(api)["readinessProbe"]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(api, KUBERNETES_VERSION, strict=True)


# --- what the deployment promises ------------------------------------------------------------


@pytest.mark.parametrize("tree", TREES)
def test_the_api_is_probed_on_readyz_and_healthz_on_8080(tree: str) -> None:
    api = container(running(rendered(tree), "api"))
    ready, alive = api["readinessProbe"]["httpGet"], api["livenessProbe"]["httpGet"]
    assert (ready["path"], port_number(api, ready["port"])) == ("/readyz", 8080)
    assert (alive["path"], port_number(api, alive["port"])) == ("/healthz", 8080)
    assert settings(rendered(tree))["AGENTLESS_API_HOST"] == "0.0.0.0"
    assert settings(rendered(tree)).get("AGENTLESS_API_PORT", "8080") == "8080"


@pytest.mark.parametrize("tree", TREES)
def test_the_worker_serves_its_probes_and_metrics_on_9464_on_every_interface(tree: str) -> None:
    manifests = rendered(tree)
    worker = container(running(manifests, "worker"))
    ports = {p["name"]: p["containerPort"] for p in worker["ports"]}
    assert ports == {"metrics": 9464}
    ready, alive = worker["readinessProbe"]["httpGet"], worker["livenessProbe"]["httpGet"]
    assert (ready["path"], port_number(worker, ready["port"])) == ("/readyz", 9464)
    assert (alive["path"], port_number(worker, alive["port"])) == ("/healthz", 9464)
    env = {e["name"]: e.get("value") for e in worker["env"]}
    assert env["AGENTLESS_WORKER_HOST"] == "0.0.0.0"
    assert settings(manifests).get("AGENTLESS_WORKER_PORT", "9464") == "9464"


@pytest.mark.parametrize("tree", TREES)
def test_a_worker_has_time_to_drain_before_it_is_killed(tree: str) -> None:
    manifests = rendered(tree)
    grace = running(manifests, "worker")["spec"]["template"]["spec"][
        "terminationGracePeriodSeconds"
    ]
    response_timeout = float(settings(manifests).get("AGENTLESS_RESPONSE_TIMEOUT", "20"))
    assert grace >= response_timeout + DRAIN_GRACE_SECONDS + 10


@pytest.mark.parametrize(("tree", "manifest"), every_manifest("Deployment"))
def test_every_pod_runs_unprivileged_on_a_read_only_root_with_resources(
    tree: str, manifest: Manifest
) -> None:
    pod = manifest["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["automountServiceAccountToken"] is False
    for each in pod["containers"]:
        context = each["securityContext"]
        assert (context["readOnlyRootFilesystem"], context["allowPrivilegeEscalation"]) == (
            True,
            False,
        )
        assert context["capabilities"]["drop"] == ["ALL"]
        assert {"cpu", "memory"} <= set(each["resources"]["requests"])
        assert "memory" in each["resources"]["limits"]


@pytest.mark.parametrize(
    ("tree", "replicas"), [("base", 2), ("overlays/example", 3), ("overlays/cluster", 3)]
)
def test_at_least_one_api_replica_always_runs(tree: str, replicas: int) -> None:
    manifests = rendered(tree)
    api = running(manifests, "api")
    assert api["spec"]["replicas"] == replicas
    assert api["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    budgets = [
        pdb
        for pdb in of_kind(manifests, "PodDisruptionBudget")
        if selects(pdb["spec"]["selector"]["matchLabels"], pod_labels(api))
    ]
    assert [pdb["spec"].get("minAvailable") for pdb in budgets] == [1]


@pytest.mark.parametrize("tree", TREES)
def test_the_service_reaches_the_api_pods_on_8080(tree: str) -> None:
    manifests = rendered(tree)
    api = running(manifests, "api")
    service = one(manifests, "Service", "agentless-api")
    assert selects(service["spec"]["selector"], pod_labels(api))
    (port,) = service["spec"]["ports"]
    assert (port["port"], port_number(container(api), port["targetPort"])) == (8080, 8080)


@pytest.mark.parametrize("tree", TREES)
def test_keda_scales_the_workers_on_ready_and_unacknowledged_task_messages(tree: str) -> None:
    manifests = rendered(tree)
    worker = running(manifests, "worker")
    (scaled,) = of_kind(manifests, "ScaledObject")
    target = scaled["spec"]["scaleTargetRef"]
    assert (target.get("kind", "Deployment"), target["name"]) == (
        "Deployment",
        worker["metadata"]["name"],
    )
    # KEDA's HPA owns the count: a replicas field would fight it on every apply.
    assert "replicas" not in worker["spec"]
    assert scaled["spec"]["minReplicaCount"] >= 1
    assert scaled["spec"]["maxReplicaCount"] > scaled["spec"]["minReplicaCount"]
    (trigger,) = scaled["spec"]["triggers"]
    metadata = trigger["metadata"]
    assert trigger["type"] == "rabbitmq"
    assert metadata["queueName"] == f"{settings(manifests)['AGENTLESS_PREFIX']}.tasks"
    assert (metadata["protocol"], metadata["mode"]) == ("http", "QueueLength")
    assert metadata.get("excludeUnacknowledged", "false") == "false"
    assert "host" not in metadata  # the management URL holds credentials: TriggerAuthentication
    authentication = one(manifests, "TriggerAuthentication", trigger["authenticationRef"]["name"])
    (host,) = authentication["spec"]["secretTargetRef"]
    assert host["parameter"] == "host"


@pytest.mark.parametrize("tree", OVERLAYS)
def test_the_example_secrets_hold_every_reference(tree: str) -> None:
    manifests = rendered(tree)
    secrets = {s["metadata"]["name"]: s for s in of_kind(manifests, "Secret")}
    references: list[tuple[str, str]] = []
    for deployment in of_kind(manifests, "Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        references += [(v["secret"]["secretName"], "") for v in pod["volumes"] if "secret" in v]
        for each in pod["containers"]:
            references += [
                (e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"])
                for e in each.get("env", [])
                if "secretKeyRef" in e.get("valueFrom", {})
            ]
    for authentication in of_kind(manifests, "TriggerAuthentication"):
        references += [(r["name"], r["key"]) for r in authentication["spec"]["secretTargetRef"]]
    for monitor in of_kind(manifests, "ServiceMonitor"):
        for endpoint in monitor["spec"]["endpoints"]:
            credentials = endpoint["authorization"]["credentials"]
            references.append((credentials["name"], credentials["key"]))
    # The operators' clusters read their users from Secrets too.
    for rabbitmq in of_kind(manifests, "RabbitmqCluster"):
        external = rabbitmq["spec"].get("secretBackend", {}).get("externalSecret", {})
        references += [(external["name"], "default_user.conf")] if external else []
    for postgres in of_kind(manifests, "Cluster"):
        owner = postgres["spec"]["bootstrap"]["initdb"]["secret"]["name"]
        references += [(owner, "username"), (owner, "password")]
    assert references
    for name, key in references:
        assert name in secrets, name
        assert key == "" or key in secrets[name]["stringData"], (name, key)
    for secret in secrets.values():
        assert set(secret) & {"data", "stringData"} == {"stringData"}
        # Every credential is a visible placeholder (a Secret's other fields, such as the
        # service binding's host and port of the RabbitMQ user, need not be).
        credentials = {
            key: value
            for key, value in secret["stringData"].items()
            if key not in BINDING_FIELDS or _has_password(value)
        }
        assert credentials
        assert all("example" in value for value in credentials.values())


@pytest.mark.parametrize(("tree", "manifest"), every_manifest())
def test_credentials_are_only_in_secrets(tree: str, manifest: Manifest) -> None:
    if manifest["kind"] == "Secret":
        return
    if manifest["kind"] == "ConfigMap":
        assert SECRET_SETTINGS.isdisjoint(manifest["data"])
        assert [v for v in manifest["data"].values() if _has_password(v)] == []
    for env in _literal_env(manifest):
        assert env["name"] not in SECRET_SETTINGS
        assert not _has_password(env["value"])
    for scaled in [manifest] if manifest["kind"] == "ScaledObject" else []:
        for trigger in scaled["spec"]["triggers"]:
            assert not any(_has_password(v) for v in trigger["metadata"].values())
    # Nor anywhere else: an operator's resource, an annotation...
    assert [v for v in _strings(manifest) if _has_password(v)] == []


def test_the_password_check_sees_a_url_with_a_password() -> None:
    assert _has_password("amqp://agentless:s3cret@rabbitmq:5672/")
    assert _has_password("broker: amqp://guest:guest@a:5672/,amqp://guest:guest@b:5672/")
    assert not _has_password("postgresql://agentless@postgres:5432/agentless")
    assert not _has_password("https://agentless.example.com")


@pytest.mark.parametrize("tree", TREES)
def test_prometheus_scrapes_the_api_and_every_worker(tree: str) -> None:
    manifests = rendered(tree)
    api_service = one(manifests, "Service", "agentless-api")
    (service_monitor,) = of_kind(manifests, "ServiceMonitor")
    assert selects(
        service_monitor["spec"]["selector"]["matchLabels"], api_service["metadata"]["labels"]
    )
    (endpoint,) = service_monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in api_service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"
    assert endpoint["authorization"]["type"] == "Bearer"

    worker = running(manifests, "worker")
    (pod_monitor,) = of_kind(manifests, "PodMonitor")
    assert selects(pod_monitor["spec"]["selector"]["matchLabels"], pod_labels(worker))
    (endpoint,) = pod_monitor["spec"]["podMetricsEndpoints"]
    assert (port_number(container(worker), endpoint["port"]), endpoint["path"]) == (
        9464,
        "/metrics",
    )


def test_the_overlay_sets_its_image_replicas_and_settings() -> None:
    base, overlay = rendered("base"), rendered("overlays/example")
    images = {container(d)["image"] for d in of_kind(base, "Deployment")}
    assert images == {"agentless:0.1.0"}
    images = {container(d)["image"] for d in of_kind(overlay, "Deployment")}
    assert images == {"registry.example.com/platform/agentless:0.1.0"}
    assert settings(overlay)["AGENTLESS_PUBLIC_URL"] == "https://agentless.example.com"
    # The patches merge: the base's settings, mounts and env stay.
    assert settings(overlay)["AGENTLESS_PREFIX"] == settings(base)["AGENTLESS_PREFIX"]
    worker = container(running(overlay, "worker"))
    assert [m["name"] for m in worker["volumeMounts"]] == ["tmp", "connections"]
    assert worker["env"] == container(running(base, "worker"))["env"]
    for deployment in of_kind(overlay, "Deployment"):
        labels = pod_labels(deployment)
        assert labels["app.kubernetes.io/instance"] == "agentless-example"
        assert "app.kubernetes.io/instance" not in deployment["spec"]["selector"]["matchLabels"]


# --- the renderer itself ---------------------------------------------------------------------


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text), encoding="utf-8")
    return tmp_path


DEPLOYMENT = """\
    apiVersion: apps/v1
    kind: Deployment
    metadata: {name: app}
    spec:
      selector: {matchLabels: {app: a}}
      template:
        metadata: {labels: {app: a}}
        spec:
          containers:
            - name: app
              image: example/app:1
              env: [{name: A, value: "1"}, {name: B, value: "2"}]
              args: [one, two]
"""


def test_the_renderer_merges_lists_by_their_keys_and_replaces_the_others(tmp_path: Path) -> None:
    root = _tree(
        tmp_path,
        {
            "base/kustomization.yaml": "resources: [app.yaml]\n",
            "base/app.yaml": DEPLOYMENT,
            "kustomization.yaml": """\
                resources: [base]
                namespace: ns
                commonLabels: {team: t}
                images: [{name: example/app, newName: registry.example.com/app, newTag: "2"}]
                patches:
                  - patch: |
                      apiVersion: apps/v1
                      kind: Deployment
                      metadata: {name: app}
                      spec:
                        template:
                          spec:
                            containers:
                              - name: app
                                env: [{name: B, value: "3"}, {name: C, value: "4"}]
                                args: [three]
            """,
        },
    )
    (app,) = render(root)
    assert app["metadata"] == {"name": "app", "namespace": "ns", "labels": {"team": "t"}}
    assert app["spec"]["selector"]["matchLabels"] == {"app": "a", "team": "t"}
    assert app["spec"]["template"]["spec"]["containers"] == [
        {
            "name": "app",
            "image": "registry.example.com/app:2",
            "env": [
                {"name": "A", "value": "1"},
                {"name": "B", "value": "3"},
                {"name": "C", "value": "4"},
            ],
            "args": ["three"],
        }
    ]


@pytest.mark.parametrize(
    ("kustomization", "error"),
    [
        ("resources: [app.yaml]\nconfigMapGenerator: []\n", "unsupported kustomization fields"),
        (
            "resources: [app.yaml]\npatches: [{path: p.yaml, target: {kind: Deployment}}]\n",
            "a patch must be one",
        ),
        ("resources: [app.yaml]\npatches: [{path: other.yaml}]\n", "matches 0 resources"),
        ("resources: [app.yaml]\nreplicas: [{name: other, count: 2}]\n", "no Deployment"),
        ("resources: [app.yaml, app.yaml]\n", "defined twice"),
    ],
)
def test_the_renderer_refuses_what_it_does_not_do(
    tmp_path: Path, kustomization: str, error: str
) -> None:
    other = "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: other}\nspec: {}\n"
    root = _tree(
        tmp_path,
        {"kustomization.yaml": kustomization, "app.yaml": DEPLOYMENT, "other.yaml": other},
    )
    with pytest.raises(KustomizeError, match=error):
        render(root)


def _literal_env(manifest: Manifest) -> Iterator[dict[str, str]]:
    pod = manifest.get("spec", {}).get("template", {}).get("spec", {})
    for each in pod.get("containers", []) + pod.get("initContainers", []):
        for env in each.get("env", []):
            if "value" in env:
                yield env


def _strings(node: object) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for value in node.values():
            yield from _strings(value)
    elif isinstance(node, list):
        for item in node:
            yield from _strings(item)


def _has_password(value: object) -> bool:
    if not isinstance(value, str):
        return False
    for word in value.replace(",", " ").split():
        try:
            if urlsplit(word).password:
                return True
        except ValueError:
            continue
    return False
