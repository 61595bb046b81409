"""A private PostgreSQL cluster for tests that must hurt the database server itself (restart it)
without touching the one every other test shares, which tests running beside them use.

Made with the machine's own cluster tools (`pg_createcluster`), on a port of its own, with trust
authentication on loopback as the machine's cluster has; dropped, data and all, by `drop()`.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

CONFIGS = Path("/etc/postgresql")
DATA = Path("/var/lib/postgresql")


def _run(*command: str, timeout: float = 120) -> str:
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    assert done.returncode == 0, f"{' '.join(command)}: {done.stderr or done.stdout}"
    return done.stdout


@dataclass(frozen=True)
class PgCluster:
    """One cluster of the machine's PostgreSQL version: `name` and `port`."""

    version: str
    name: str
    port: int

    @classmethod
    def create(cls, name: str, port: int, *, start: bool = True) -> PgCluster:
        """A new cluster, started and serving unless `start` is false."""
        # The machine's one installed version, as .ci/run finds it.
        version = sorted(p.name for p in CONFIGS.iterdir() if p.name.isdigit())[-1]
        cluster = cls(version, name, port)
        started = ["--start"] if start else []
        # initdb's fsync of every file it wrote is most of its time; a test's cluster needs
        # none (a crash of this machine ends the test run anyway).
        initdb = ("--auth=trust", "--no-sync")
        _run("pg_createcluster", version, name, "-p", str(port), *started, "--", *initdb)
        return cluster

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    @property
    def data_directory(self) -> Path:
        # pg_createcluster's default, as `create` gives no other.
        return DATA / self.version / self.name

    @property
    def config_directory(self) -> Path:
        return CONFIGS / self.version / self.name

    def ctl(self, action: str, *options: str) -> None:
        """`pg_ctlcluster` ACTION on this cluster, run here rather than handed to systemd."""
        _run(
            "pg_ctlcluster", "--skip-systemctl-redirect", *options, self.version, self.name, action
        )

    def running(self) -> bool:
        status = ["pg_ctlcluster", self.version, self.name, "status"]
        return subprocess.run(status, capture_output=True, timeout=30, check=False).returncode == 0

    def restart(self) -> None:
        """A fast shutdown (every session ended) and a start."""
        self.ctl("restart")

    def sql(self, statement: str) -> str:
        """One statement's unaligned output, through psql on this cluster's port."""
        address = ("-h127.0.0.1", f"-p{self.port}", "-Upostgres", "-dpostgres")
        return _run("psql", "-XAtq", *address, "-c", statement).strip()

    def drop(self) -> None:
        _run("pg_dropcluster", self.version, self.name, "--stop")
