"""deploy/kubernetes/overlays/cluster: the example deployment on a RabbitMQ cluster of the
RabbitMQ Cluster Operator and a replicated PostgreSQL of CloudNativePG, agentless's URLs naming
the Services and pods those operators make (their names as the operators' sources build them:
cluster-operator's ChildResourceName and headless Service, CloudNativePG's `-rw` Service)."""

from __future__ import annotations

from typing import Any

import pytest
from yarl import URL

from tests.deploy.kustomize import Manifest, identity
from tests.deploy.test_kubernetes import CUSTOM_RESOURCES, custom_validator, of_kind, one, rendered
from worker.contract.settings import Settings

TREE = "overlays/cluster"


def stringdata(manifests: list[Manifest], name: str) -> dict[str, str]:
    data = one(manifests, "Secret", name)["stringData"]
    assert isinstance(data, dict)
    return data


def rabbitmq_user(manifests: list[Manifest], cluster: Manifest) -> tuple[str, str]:
    """The default user of the RabbitmqCluster: the user and password of its external Secret,
    which its nodes read from default_user.conf."""
    secret = stringdata(manifests, cluster["spec"]["secretBackend"]["externalSecret"]["name"])
    conf: dict[str, str] = {}
    for line in secret["default_user.conf"].splitlines():
        key, sep, value = line.partition("=")
        if sep:
            conf[key.strip()] = value.strip()
    assert (conf["default_user"], conf["default_pass"]) == (secret["username"], secret["password"])
    return secret["username"], secret["password"]


def credentials() -> dict[str, str]:
    return stringdata(rendered(TREE), "agentless-credentials")


def test_the_cluster_overlay_is_the_example_with_the_operators_clusters() -> None:
    example = {identity(m): m for m in rendered("overlays/example")}
    cluster = {identity(m): m for m in rendered(TREE)}
    added = {key for key in cluster if key not in example}
    assert {(kind, name) for kind, _, name in added} == {
        ("rabbitmq.com/RabbitmqCluster", "agentless-rabbitmq"),
        ("postgresql.cnpg.io/Cluster", "agentless-postgres"),
        ("/Secret", "agentless-rabbitmq-default-user"),
        ("/Secret", "agentless-postgres-owner"),
        ("policy/PodDisruptionBudget", "agentless-rabbitmq"),
    }
    assert set(example) <= set(cluster)
    changed = {key[2] for key in example if example[key] != cluster[key]}
    # Only where agentless finds the broker and the database.
    assert changed == {"agentless-credentials", "agentless-rabbitmq-management"}
    before = stringdata(list(example.values()), "agentless-credentials")
    after = credentials()
    assert {k for k in after if after[k] != before[k]} == {
        "AGENTLESS_AMQP_URL",
        "AGENTLESS_DATABASE_URL",
    }


def test_three_rabbitmq_nodes_each_named_in_the_broker_url() -> None:
    manifests = rendered(TREE)
    (cluster,) = of_kind(manifests, "RabbitmqCluster")
    name, namespace = cluster["metadata"]["name"], cluster["metadata"]["namespace"]
    replicas = cluster["spec"]["replicas"]
    assert replicas == 3
    user = rabbitmq_user(manifests, cluster)
    # One node per machine, and one at a time taken by a drain.
    (spread,) = cluster["spec"]["affinity"]["podAntiAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"
    ]
    pods = {"app.kubernetes.io/name": name}
    assert (spread["topologyKey"], spread["labelSelector"]["matchLabels"]) == (
        "kubernetes.io/hostname",
        pods,
    )
    budget = one(manifests, "PodDisruptionBudget", name)["spec"]
    assert (budget["maxUnavailable"], budget["selector"]["matchLabels"]) == (1, pods)
    urls = [URL(url) for url in credentials()["AGENTLESS_AMQP_URL"].split(",")]
    # Pod <name>-server-<i> of the StatefulSet <name>-server, under the headless Service
    # <name>-nodes: the operator's names for them.
    assert [url.host for url in urls] == [
        f"{name}-server-{i}.{name}-nodes.{namespace}.svc" for i in range(replicas)
    ]
    assert {(url.scheme, url.port, url.path, url.user, url.password) for url in urls} == {
        ("amqp", 5672, "/", *user)
    }


def test_keda_reads_the_queue_through_the_rabbitmq_client_service() -> None:
    manifests = rendered(TREE)
    (cluster,) = of_kind(manifests, "RabbitmqCluster")
    host = URL(stringdata(manifests, "agentless-rabbitmq-management")["host"])
    service = f"{cluster['metadata']['name']}.{cluster['metadata']['namespace']}.svc"
    assert (host.scheme, host.host, host.port, host.path) == ("http", service, 15672, "/")
    assert (host.user, host.password) == rabbitmq_user(manifests, cluster)


def test_the_database_url_is_the_primarys_service_with_the_owner_of_the_database() -> None:
    manifests = rendered(TREE)
    (cluster,) = of_kind(manifests, "Cluster")
    name, namespace = cluster["metadata"]["name"], cluster["metadata"]["namespace"]
    # A primary and a standby to promote; synchronous to fewer standbys than there are.
    assert cluster["spec"]["instances"] >= 2
    synchronous = cluster["spec"]["postgresql"]["synchronous"]
    assert 1 <= synchronous["number"] < cluster["spec"]["instances"]
    initdb = cluster["spec"]["bootstrap"]["initdb"]
    owner = one(manifests, "Secret", initdb["secret"]["name"])
    assert owner["type"] == "kubernetes.io/basic-auth"
    assert owner["stringData"]["username"] == initdb["owner"]
    database = URL(credentials()["AGENTLESS_DATABASE_URL"])
    assert (database.scheme, database.host, database.port) == (
        "postgresql",
        f"{name}-rw.{namespace}.svc",
        5432,
    )
    assert (database.user, database.password, database.path) == (
        initdb["owner"],
        owner["stringData"]["password"],
        f"/{initdb['database']}",
    )


def test_agentless_takes_both_urls() -> None:
    urls = credentials()
    Settings.model_validate(
        {"amqp_url": urls["AGENTLESS_AMQP_URL"], "database_url": urls["AGENTLESS_DATABASE_URL"]}
    )


@pytest.mark.parametrize(
    ("kind", "field", "value"),
    [
        ("RabbitmqCluster", "replica", 3),
        ("RabbitmqCluster", "secretBackend", {"externalSecrets": {"name": "x"}}),
        ("Cluster", "instance", 2),
        ("Cluster", "postgresql", {"synchronous": {"method": "any", "numbers": 1}}),
    ],
)
def test_a_misspelt_field_of_an_operators_resource_is_caught(
    kind: str, field: str, value: Any
) -> None:
    (resource,) = of_kind(rendered(TREE), kind)
    resource["spec"][field] = value
    validator = custom_validator(CUSTOM_RESOURCES[(resource["apiVersion"], kind)])
    assert not validator.is_valid(resource)
