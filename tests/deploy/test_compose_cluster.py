"""deploy/compose.yaml's `cluster` profile: three RabbitMQ nodes that find each other from one
configuration file and share an Erlang cookie, each on its own volume, and the API and two
workers pointed at all three; the default deployment left as it was."""

from __future__ import annotations

from typing import Any

from yarl import URL

from tests.deploy.test_compose import (
    COMPOSE,
    agentless_services,
    command,
    compose,
    declared_environment,
    in_profile,
    replicas,
    services,
)
from worker.contract.settings import Settings

PROFILE = "cluster"
NODES = ("rabbitmq-1", "rabbitmq-2", "rabbitmq-3")


def nodes() -> dict[str, dict[str, Any]]:
    declared = services()
    return {name: declared[name] for name in NODES}


def read_rabbitmq_conf(text: str) -> dict[str, str]:
    """rabbitmq.conf's sysctl format: `key = value` lines and # comments."""
    conf: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep, f"not key = value: {line!r}"
        assert key.strip() not in conf, f"{key.strip()} set twice"
        conf[key.strip()] = value.strip()
    return conf


def mounted_conf(service: dict[str, Any]) -> dict[str, str]:
    """The rabbitmq.conf fragment the node reads from its conf.d."""
    (mount,) = service["configs"]
    assert mount["target"].startswith("/etc/rabbitmq/conf.d/")
    assert mount["target"].endswith(".conf")
    path = COMPOSE.parent / compose()["configs"][mount["source"]]["file"]
    return read_rabbitmq_conf(path.read_text())


def dependencies(names: list[str]) -> set[str]:
    """What `docker compose up NAMES…` starts: the services and, transitively, what they
    depend on."""
    declared = services()
    found: set[str] = set()
    pending = list(names)
    while pending:
        name = pending.pop()
        if name not in found:
            found.add(name)
            pending.extend(declared[name].get("depends_on", {}))
    return found


def test_the_cluster_is_one_profile_and_the_default_deployment_is_as_it_was() -> None:
    declared = services()
    default = {name for name, s in declared.items() if in_profile(s, None)}
    assert default == {"rabbitmq", "postgres", "api", "worker"}
    cluster = {name for name, s in declared.items() if in_profile(s, PROFILE)}
    assert cluster == {*NODES, "cluster-api", "cluster-worker"}
    assert all(s.get("profiles", []) in ([], [PROFILE]) for s in declared.values())


def test_starting_the_cluster_services_starts_the_nodes_not_the_single_one() -> None:
    # The command the compose file's header gives.
    cluster = list(agentless_services(PROFILE))
    assert sorted(cluster) == ["cluster-api", "cluster-worker"]
    assert dependencies(cluster) == {*cluster, *NODES, "postgres"}
    default = list(agentless_services())
    assert dependencies(default) == {*default, "rabbitmq", "postgres"}
    header = COMPOSE.read_text().split("\nname:")[0]
    assert f"up --build {' '.join(cluster)}" in header


def test_three_nodes_of_the_single_nodes_image_share_a_cookie_and_keep_their_own_data() -> None:
    single = services()["rabbitmq"]
    cookies, volumes = set(), []
    for name, node in nodes().items():
        assert node["image"] == single["image"]
        # The node's name, rabbit@<host name>, is what the others know it by.
        assert node["hostname"] == name
        env = node["environment"]
        assert {k: env[k] for k in ("RABBITMQ_DEFAULT_USER", "RABBITMQ_DEFAULT_PASS")} == {
            k: single["environment"][k] for k in ("RABBITMQ_DEFAULT_USER", "RABBITMQ_DEFAULT_PASS")
        }
        cookies.add(env["RABBITMQ_ERLANG_COOKIE"])
        (mount,) = node["volumes"]
        volume, target = mount.split(":")
        assert target == "/var/lib/rabbitmq"
        volumes.append(volume)
        assert node["healthcheck"]["test"][:3] == ["CMD", "rabbitmq-diagnostics", "-q"]
        # Running (booted, and so joined), not only answering a ping.
        assert node["healthcheck"]["test"][3] == "check_running"
    (cookie,) = cookies
    assert len(cookie) >= 20
    assert len(set(volumes)) == 3
    assert set(volumes) <= set(compose()["volumes"])
    assert "rabbitmq" not in volumes


def test_every_node_finds_the_others_from_the_same_configuration() -> None:
    confs = [mounted_conf(node) for node in nodes().values()]
    assert all(conf == confs[0] for conf in confs)
    conf = confs[0]
    assert conf.pop("cluster_formation.peer_discovery_backend") == "classic_config"
    listed = {v for k, v in conf.items() if k.startswith("cluster_formation.classic_config.nodes.")}
    assert listed == {f"rabbit@{node['hostname']}" for node in nodes().values()}
    assert conf["cluster_partition_handling"] == "pause_minority"


def test_the_api_and_two_workers_list_every_node_and_start_when_all_are_healthy() -> None:
    mine = agentless_services(PROFILE)
    commands = sorted(command(s)[0] for s in mine.values() for _ in range(replicas(s)))
    assert commands == ["api", "worker", "worker"]
    healthy = {"condition": "service_healthy"}
    for name, service in mine.items():
        assert service["image"] == "agentless:local"
        assert service["depends_on"] == dict.fromkeys((*NODES, "postgres"), healthy)
        env = declared_environment(service)
        urls = [URL(url) for url in env["AGENTLESS_AMQP_URL"].split(",")]
        assert [(url.scheme, url.host, url.port, url.path) for url in urls] == [
            ("amqp", node, 5672, "/") for node in NODES
        ], name
        # The API that the workers hand out as PlanUrl is this profile's.
        assert URL(env["AGENTLESS_PUBLIC_URL"]).host == "cluster-api"
        Settings.model_validate(
            {
                k[len("AGENTLESS_") :].lower(): v
                for k, v in env.items()
                if k.startswith("AGENTLESS_")
            }
        )
    (api,) = [s for s in mine.values() if command(s) == ["api"]]
    assert any(str(port).endswith(":8080") for port in api["ports"])


def test_the_cluster_services_are_the_default_ones_on_other_nodes() -> None:
    """Everything else comes from the same definition: the image, its build, the env file, the
    health check, the grace period to drain."""
    default, cluster = agentless_services(), agentless_services(PROFILE)
    for name in ("api", "worker"):
        here, there = dict(cluster[f"cluster-{name}"]), dict(default[name])
        for key in ("profiles", "environment", "depends_on"):
            here.pop(key)
            there.pop(key, None)
        assert here == there, name
