"""A three-node RabbitMQ cluster on one machine, whose nodes can be killed, restarted and
partitioned from each other, for the tests that prove agentless survives the loss of any node.

The nodes are private ones (tests/rabbit_node.py) sharing one Erlang cookie; the second and third
`join_cluster` the first. They handle partitions with `pause_minority`, as users are told to, and
a short `net_ticktime`, so that a node out of reach is noticed within seconds.

A partition, without a firewall: every node is named after an address of its own on the loopback
network (`…-a@127.X.Y.1`, `…-b@127.X.Y.2`, …, all of 127.0.0.0/8 being loopback), which Erlang
calls a long name. Its distribution listener is on 127.0.0.1, and a test proxy (tests/proxy.py)
listens on the node's own address and relays to it. A relay of the node's address's EPMD port to
the machine's EPMD, where every node registers, answers a peer (or a command line tool) asking
where the node listens with the proxy's port rather than the node's: the proxy cannot take the
node's port number on its address, as RabbitMQ will not start a node whose distribution port is
taken on any address. Every node opens its own distribution connections
from its own address (`inet_dist_connect_options`), so each proxy knows, for every connection it
relays, which node it comes from. Partitioning a node isolates, in the proxies, the connections
between it and the other nodes, whichever opened them: they stay open and nothing crosses, in
either direction, as if its network had gone silent; new ones are accepted but carry nothing.
Command line tools connect from 127.0.0.1 and still get through, so each side can be asked what
it sees. Healing resets the connections held meanwhile (their ends gave up on them when their
ticks stopped) and lets new ones through, on which the nodes find each other again.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import shutil
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Coroutine, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

import orjson

from tests.proxy import Proxy
from tests.rabbit_node import RabbitNode

EPMD_PORT = 4369
# Seconds without a word before a peer is considered down (a node's ticks go out every quarter of
# it); RabbitMQ's default is 60.
NET_TICKTIME = 5
SETTLE_TIMEOUT = 120.0

T = TypeVar("T")


class _Relays:
    """The cluster's proxies, on an event loop of their own in a thread: the nodes must reach each
    other whatever the tests' loop is doing, including between tests and while a fixture blocks
    it."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="rabbit-cluster-relays", daemon=True
        )
        self._thread.start()
        self._stack = contextlib.AsyncExitStack()
        # The distribution proxy at each node's address.
        self.dist: dict[str, Proxy] = {}

    def _call(self, work: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(work, self._loop).result(timeout=30)

    def open(self, address: str, dist_port: int) -> None:
        """A proxy at `address` for the node whose distribution listener is 127.0.0.1:dist_port,
        and EPMD at `address` pointing to it."""

        async def opened() -> None:
            proxy = Proxy("127.0.0.1", dist_port, listen_host=address)
            self.dist[address] = await self._stack.enter_async_context(proxy)
            relay = partial(_relay_epmd, ports={dist_port: proxy.port})
            server = await asyncio.start_server(relay, address, EPMD_PORT)
            self._stack.push_async_callback(_closed, server)

        self._call(opened())

    def isolate(self, address: str) -> None:
        """Black-hole every distribution connection between `address` and the others."""
        others = [other for other in self.dist if other != address]

        async def isolated() -> None:
            self.dist[address].isolate(others)
            for other in others:
                self.dist[other].isolate([address])

        self._call(isolated())

    def rejoin(self, address: str) -> int:
        """End the isolation of `address`; how many connections it held."""
        others = [other for other in self.dist if other != address]

        async def rejoined() -> int:
            held = self.dist[address].rejoin(others)
            return held + sum(self.dist[other].rejoin([address]) for other in others)

        return self._call(rejoined())

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._call(self._stack.aclose())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)
        self._loop.close()


async def _relay_epmd(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, ports: dict[int, int]
) -> None:
    """One request to the machine's EPMD, and its answer, in which a node's port that is one of
    `ports` becomes its proxy's."""
    try:
        epmd_reader, epmd = await asyncio.open_connection("127.0.0.1", EPMD_PORT)
    except OSError:
        writer.close()
        return
    try:
        await asyncio.gather(_pipe(reader, epmd), _pipe(epmd_reader, writer, ports))
    except OSError:
        pass
    finally:
        epmd.close()
        writer.close()


async def _pipe(
    source: asyncio.StreamReader, sink: asyncio.StreamWriter, ports: dict[int, int] | None = None
) -> None:
    if ports is not None:
        # PORT2_RESP: 'w', a result (0 for found), then the node's port, two bytes big-endian.
        head = b""
        while len(head) < 4 and (chunk := await source.read(4 - len(head))):
            head += chunk
        if len(head) == 4 and head[:2] == b"w\0":
            port = int.from_bytes(head[2:4], "big")
            head = head[:2] + ports.get(port, port).to_bytes(2, "big")
        sink.write(head)
    while chunk := await source.read(4096):
        sink.write(chunk)
        await sink.drain()
    if sink.can_write_eof():
        sink.write_eof()


async def _closed(server: asyncio.Server) -> None:
    server.close()
    await server.wait_closed()


@dataclass
class QuorumMember:
    """One replica of a quorum queue, as `rabbitmq-queues quorum_status` reports it."""

    node: str
    state: str
    commit_index: int


@dataclass
class RabbitCluster:
    """Three RabbitMQ nodes clustered together, relayed through proxies that can partition any
    one of them (see the module's docstring)."""

    nodes: list[RabbitNode]
    _relays: _Relays
    # The nodes partitioned from the others now.
    partitioned: set[str] = field(default_factory=set)
    # Whether the cluster was last seen whole, and nothing was done to it since.
    whole: bool = False
    # Held while a node restarts or the cluster is restored: a test that timed out may leave a
    # restart running in its thread, which the next restore must not race.
    _changing: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def create(cls, short_name: str, ports: Iterable[tuple[int, int]]) -> RabbitCluster:
        """Nodes not started yet, with their AMQP and distribution `ports`, on a loopback
        network of their own (127.X.Y.0/24, X and Y random, so that sessions do not meet)."""
        network = f"127.{secrets.randbelow(254) + 1}.{secrets.randbelow(254) + 1}"
        cookie = secrets.token_hex(20).upper()
        relays = _Relays()
        nodes = []
        try:
            for i, (port, dist_port) in enumerate(ports):
                address = f"{network}.{i + 1}"
                relays.open(address, dist_port)
                nodes.append(
                    RabbitNode.create(
                        f"{short_name}-{'abc'[i]}",
                        port,
                        dist_port,
                        host=address,
                        cookie=cookie,
                        config="cluster_partition_handling = pause_minority\n",
                        erl_args=_erl_args(address),
                    )
                )
        except BaseException:
            for node in nodes:
                shutil.rmtree(node.base, ignore_errors=True)
            relays.close()
            raise
        return cls(nodes, relays)

    @property
    def amqp_url(self) -> str:
        """Every node's URL, comma-separated, as AGENTLESS_AMQP_URL lists a cluster."""
        return ",".join(node.amqp_url for node in self.nodes)

    def amqp_url_from(self, first: RabbitNode) -> str:
        """Every node's URL, `first`'s first: the node a process connects to while it can."""
        i = self.nodes.index(first)
        return ",".join(node.amqp_url for node in self.nodes[i:] + self.nodes[:i])

    def node(self, name: str) -> RabbitNode:
        return next(node for node in self.nodes if node.name == name)

    def others(self, node: RabbitNode) -> list[RabbitNode]:
        return [other for other in self.nodes if other is not node]

    def start(self) -> float:
        """Start the nodes side by side, join the second and third to the first, and wait until
        each sees the three running; the seconds taken."""
        began = time.monotonic()
        first, *rest = self.nodes
        _each(_started, self.nodes)
        # One at a time: two nodes joining at once may each find the other's schema half-made.
        for node in rest:
            node.ctl("stop_app")
            node.ctl("join_cluster", first.name)
            node.ctl("start_app")
        self.wait_whole()
        return time.monotonic() - began

    def wait_whole(self, timeout: float = SETTLE_TIMEOUT) -> float:
        """Wait until every node runs, sees the three running and knows of no partition; the
        seconds it took."""
        began = time.monotonic()
        everyone = {node.name for node in self.nodes}
        while True:
            views = _each(_running_seen_by, self.nodes)
            if all(view == everyone for view in views):
                self.whole = True
                return time.monotonic() - began
            assert time.monotonic() - began < timeout, f"cluster not whole: {views}"
            time.sleep(0.5)

    def wait_partitioned(self, node: RabbitNode, timeout: float = 60) -> float:
        """Wait until the others see `node` down and it has paused itself, being in the
        minority (its VM runs, RabbitMQ in it does not); the seconds it took."""
        began = time.monotonic()
        while True:
            views = _each(_running_seen_by, self.others(node))
            if all(view and node.name not in view for view in views) and _paused(node):
                return time.monotonic() - began
            assert time.monotonic() - began < timeout, f"{node.name} not cut off: {views}"
            time.sleep(0.5)

    def quorum_members(self, queue: str, vhost: str = "/") -> list[QuorumMember]:
        """The replicas of quorum queue `queue` and how far each has applied its log."""
        found = self._serving().tool(
            "rabbitmq-queues", "quorum_status", queue, "--vhost", vhost, "--formatter", "json"
        )
        return [
            QuorumMember(
                str(member["Node Name"]), str(member["Raft State"]), int(member["Commit Index"])
            )
            for member in orjson.loads(found)
        ]

    def leader(self, queue: str) -> RabbitNode:
        """The node whose replica of quorum queue `queue` leads it."""
        leaders = [m for m in self.quorum_members(queue) if m.state == "leader"]
        assert len(leaders) == 1, f"{queue}: {leaders}"
        return self.node(leaders[0].node)

    def wait_in_sync(self, queues: Iterable[str], timeout: float = SETTLE_TIMEOUT) -> None:
        """Wait until every replica of each quorum queue runs and has applied what its leader
        has (the queues being idle, the leader's commit index no longer moves)."""
        deadline = time.monotonic() + timeout
        for queue in queues:
            while True:
                try:
                    members = self.quorum_members(queue)
                except AssertionError:
                    if queue not in self.quorum_queues():
                        break  # gone meanwhile (a delay queue expires)
                    raise
                states = sorted(m.state for m in members)
                applied = {m.commit_index for m in members}
                whole = ["follower"] * (len(self.nodes) - 1) + ["leader"]
                if states == whole and len(applied) == 1:
                    break
                assert time.monotonic() < deadline, f"{queue} not in sync: {members}"
                time.sleep(0.5)

    def connections(self, naming: str) -> dict[str, int]:
        """How many client connections whose properties mention `naming` (agentless names its
        connections after its prefix) each node holds."""
        listed = self._serving().ctl(
            "list_connections", "port", "client_properties", "--formatter", "json"
        )
        by_port = {node.port: node.name for node in self.nodes}
        held = Counter(
            by_port.get(connection["port"], str(connection["port"]))
            for connection in orjson.loads(listed)
            if naming in orjson.dumps(connection["client_properties"]).decode()
        )
        return dict(sorted(held.items()))

    def quorum_queues(self) -> list[str]:
        """Every quorum queue of the default virtual host."""
        listed = self._serving().ctl("list_queues", "name", "type", "--formatter", "json")
        return [queue["name"] for queue in orjson.loads(listed) if queue["type"] == "quorum"]

    def _serving(self) -> RabbitNode:
        """A node that runs and is not partitioned, to ask about the cluster."""
        return next(
            node for node in self.nodes if node.name not in self.partitioned and node.vm_running()
        )

    def kill(self, node: RabbitNode) -> None:
        """kill -9 of `node`'s VM."""
        self.whole = False
        node.kill()

    def restart(self, node: RabbitNode) -> float:
        """Start `node` again on its data and wait until the cluster is whole; the seconds."""
        began = time.monotonic()
        with self._changing:
            self.whole = False
            node.start()
            self.wait_whole()
        return time.monotonic() - began

    def partition(self, node: RabbitNode) -> None:
        """Cut `node` off from the others (see the module's docstring)."""
        self.whole = False
        self.partitioned.add(node.name)
        self._relays.isolate(node.name.split("@", 1)[1])

    def heal(self, node: RabbitNode) -> int:
        """End `node`'s partition; how many connections it had held."""
        self.whole = False
        held = self._relays.rejoin(node.name.split("@", 1)[1])
        self.partitioned.discard(node.name)
        return held

    def restore(self) -> None:
        """Heal every partition, start every node that is down, and wait until the cluster is
        whole and every quorum queue's replicas are in sync: what each test leaves behind,
        whatever it did."""
        with self._changing:
            if self.whole and all(node.vm_running() for node in self.nodes):
                return
            for name in list(self.partitioned):
                self.heal(self.node(name))
            _each(RabbitNode.start, [node for node in self.nodes if not node.vm_running()])
            self.wait_whole()
            self.wait_in_sync(self.quorum_queues())

    def remove(self) -> None:
        """Stop every node, or kill it, remove their directories, and close the proxies."""
        try:
            for name in list(self.partitioned):
                self.heal(self.node(name))
            _each(RabbitNode.remove, self.nodes)
        finally:
            self._relays.close()


def _erl_args(address: str) -> str:
    """The VM flags that route a node's distribution through its proxy (the module's
    docstring) and notice a silent peer within NET_TICKTIME."""
    ip = "{" + address.replace(".", ",") + "}"
    return (
        "-kernel inet_dist_use_interface {127,0,0,1}"
        f" -kernel inet_dist_connect_options [{{ip,{ip}}}]"
        f" -kernel net_ticktime {NET_TICKTIME}"
    )


def _each(work: Any, nodes: list[RabbitNode]) -> list[Any]:
    """`work(node)` for every node side by side (each mostly waits on a command line tool)."""
    if not nodes:
        return []
    with ThreadPoolExecutor(len(nodes)) as pool:
        return list(pool.map(work, nodes))


def _started(node: RabbitNode) -> float:
    """Start `node`, once more should its VM exit at start (a port taken meanwhile by somebody's
    connection is given back within seconds): a node that does not boot is the machine's fault,
    not agentless's."""
    try:
        return node.start()
    except AssertionError as failed:
        print(f"\n{failed}\nstarting {node.name} again")
        node.halt()
        return node.start()


def _running_seen_by(node: RabbitNode) -> set[str]:
    """The nodes `node` sees running, by `rabbitmqctl cluster_status`: none if it does not
    answer, or knows of a partition."""
    try:
        status = orjson.loads(node.ctl("cluster_status", "--formatter", "json"))
    except (AssertionError, subprocess.TimeoutExpired, orjson.JSONDecodeError):
        return set()
    if status.get("partitions"):
        return set()
    return set(status.get("running_nodes", []))


def _paused(node: RabbitNode) -> bool:
    """Whether `node`'s VM answers while RabbitMQ in it is stopped."""
    try:
        return node.ctl("eval", "rabbit:is_running().").strip() == "false"
    except (AssertionError, subprocess.TimeoutExpired):
        return False
