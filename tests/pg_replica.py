"""A private PostgreSQL primary with a streaming replica, for tests and benchmarks that fail the
primary over (stop it hard, promote the replica) or measure what replication costs.

Two clusters of the machine's version, made with its cluster tools (tests/pg_cluster.py) on ports
of their own; the replica is seeded with `pg_basebackup -R` and streams from the primary. After a
failover, `rebuild` makes the lost primary's cluster a fresh replica of the promoted one, as an
operator would, so that the pair serves again; `drop` removes both.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

from tests.pg_cluster import PgCluster

Replication = Literal["async", "sync"]

# The primary's synchronous setting lives in a file of its configuration directory, which
# pg_basebackup does not copy (ALTER SYSTEM's file, in the data directory, it would): a promoted
# replica starts asynchronous, so that its commits do not wait for a standby it does not have.
SYNC_FILE = "conf.d/agentless-replication.conf"
SYNC_SETTINGS = "synchronous_standby_names = '*'\nsynchronous_commit = on\n"
STREAMING_TIMEOUT = 30.0
# A replica that applied nothing more for this long has applied all it can.
REPLAY_SETTLED = 0.5


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _wait_for(what: str, found: Callable[[], bool], timeout: float = STREAMING_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not found():
        assert time.monotonic() < deadline, f"not {what} after {timeout:.0f} s"
        time.sleep(0.05)


@dataclass
class ReplicatedPg:
    """Two clusters, `primary` and `replica`; `replica` is None from a promotion until
    `rebuild`, and `lost` is the primary a failover left behind."""

    clusters: tuple[PgCluster, PgCluster]
    primary: PgCluster
    replica: PgCluster | None
    lost: PgCluster | None = None

    @classmethod
    def create(cls, name: str, ports: tuple[int, int]) -> ReplicatedPg:
        """A started primary and a replica streaming from it, asynchronously."""
        # Both made at once: the replica's own initdb is thrown away, but its configuration
        # directory is what pg_createcluster is for.
        with ThreadPoolExecutor(2) as pool:
            made = [
                pool.submit(PgCluster.create, f"{name}_a", ports[0]),
                pool.submit(PgCluster.create, f"{name}_b", ports[1], start=False),
            ]
        made_ones = [m.result() for m in made if m.exception() is None]
        if len(made_ones) < len(made):
            for cluster in made_ones:
                cluster.drop()
            raise next(e for m in made if (e := m.exception()) is not None)
        primary, replica = made_ones
        pair = cls((primary, replica), primary, None)
        try:
            pair._follow(replica)
        except BaseException:
            pair.drop()
            raise
        return pair

    @property
    def url(self) -> str:
        """Both clusters in libpq's multi-host form, whichever is the primary: the client finds
        the one that takes writes."""
        hosts = ",".join(f"127.0.0.1:{c.port}" for c in self.clusters)
        return f"postgresql://postgres@{hosts}/postgres?target_session_attrs=read-write"

    def replication(self) -> str:
        """The replica's state as the primary sees it: 'async', 'sync', or '' when none streams."""
        return self.primary.sql(
            "SELECT coalesce(string_agg(sync_state, ','), '') FROM pg_stat_replication"
            " WHERE state = 'streaming'"
        )

    def stream_from(self, port: int) -> None:
        """The replica streams from `port`: the primary's own, or a proxy's in front of it (a
        network between the two). Returns once it streams from there."""
        replica = self.replica
        assert replica is not None, "no replica: rebuild() first"
        replica.sql(
            f"ALTER SYSTEM SET primary_conninfo = 'host=127.0.0.1 port={port} user=postgres'"
        )
        # A changed primary_conninfo restarts the WAL receiver.
        replica.ctl("reload")
        _wait_for(f"streaming from port {port}", lambda: self._source(replica) == str(port))

    @staticmethod
    def _source(replica: PgCluster) -> str:
        return replica.sql(
            "SELECT sender_port FROM pg_stat_wal_receiver WHERE status = 'streaming'"
        )

    def lag_bytes(self) -> int:
        """WAL the primary has written that its replica has not yet flushed, as the replica last
        reported (it reports after each write it receives)."""
        return int(
            self.primary.sql(
                "SELECT coalesce(max(pg_wal_lsn_diff(pg_current_wal_lsn(), flush_lsn)), 0)::bigint"
                " FROM pg_stat_replication"
            )
        )

    def set_replication(self, mode: Replication) -> None:
        """Commits wait for the replica's flush (sync) or not (async); returns once the primary
        treats its replica so."""
        assert self.replica is not None, "no replica: rebuild() first"
        settings = self.primary.config_directory / SYNC_FILE
        if mode == "sync":
            settings.write_text(SYNC_SETTINGS)
        else:
            settings.unlink(missing_ok=True)
        self.primary.ctl("reload")
        _wait_for(f"{mode} replication", lambda: self.replication() == mode)

    def stop_primary_hard(self) -> None:
        """An immediate shutdown: every server process quits at once, and nothing more is
        written or sent to the replica. It is the SIGQUIT to the postmaster that `pg_ctl stop -m
        immediate` sends, sent at once: pg_ctl's own start-up, a few hundred milliseconds on a
        busy machine, would leave the primary committing that much longer after a test cut its
        replica off."""
        pid = int((self.primary.data_directory / "postmaster.pid").read_text().split()[0])
        os.kill(pid, signal.SIGQUIT)
        _wait_for("the primary stopped", lambda: not _alive(pid))

    def wait_replayed(self) -> None:
        """Until the replica has applied all the WAL it can: what it then shows is what it will
        have once promoted. Not until it has applied all it received: a stream cut off midway
        leaves a partial record, which only the promotion discards."""
        replica = self.replica
        assert replica is not None, "no replica"
        deadline = time.monotonic() + STREAMING_TIMEOUT
        replayed = replica.sql("SELECT pg_last_wal_replay_lsn()")
        while True:
            time.sleep(REPLAY_SETTLED)
            now = replica.sql("SELECT pg_last_wal_replay_lsn()")
            if now == replayed:
                return
            assert time.monotonic() < deadline, "the replica's replay did not settle"
            replayed = now

    def promote(self) -> None:
        """The replica takes writes from now on, on a new timeline; the old primary is lost."""
        assert self.replica is not None, "no replica to promote"
        self.replica.ctl("promote")
        self.primary, self.replica, self.lost = self.replica, None, self.primary

    def heal(self) -> None:
        """Back to a primary and a replica streaming straight from it, whatever a failed test
        left: a primary stopped and not yet replaced is failed over, a lost one rebuilt."""
        if self.replica is not None and not self.primary.running():
            self.promote()
        if self.replica is None:
            self.rebuild()
        elif self._source(self.replica) != str(self.primary.port):
            self.stream_from(self.primary.port)

    def rebuild(self) -> None:
        """The lost primary's cluster made anew as a replica of the promoted one."""
        assert self.lost is not None, "no lost primary to rebuild"
        lost, self.lost = self.lost, None
        if lost.running():
            lost.ctl("stop", "-m", "immediate")
        self._follow(lost)

    def _follow(self, cluster: PgCluster) -> None:
        """`cluster`'s data replaced by a base backup of the primary, started as its replica."""
        for entry in cluster.data_directory.iterdir():
            if entry.is_dir():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        (cluster.config_directory / SYNC_FILE).unlink(missing_ok=True)
        # As the clusters' owner, whose the backup's files must be.
        backup = [
            f"/usr/lib/postgresql/{cluster.version}/bin/pg_basebackup",
            *("-h", "127.0.0.1", "-p", str(self.primary.port), "-U", "postgres"),
            *("-D", str(cluster.data_directory), "--write-recovery-conf", "--checkpoint=fast"),
        ]
        done = subprocess.run(
            ["runuser", "-u", "postgres", "--", *backup],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, f"pg_basebackup: {done.stderr}"
        cluster.ctl("start")
        self.replica = cluster
        _wait_for("streaming", lambda: self.replication() != "")

    def drop(self) -> None:
        for cluster in self.clusters:
            # Else pg_dropcluster leaves the configuration directory, which holds a file it did
            # not write.
            (cluster.config_directory / SYNC_FILE).unlink(missing_ok=True)
        first, second = self.clusters
        try:
            first.drop()
        finally:
            second.drop()
