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
    def create(cls, name: str, port: int) -> PgCluster:
        """A new cluster, started and serving."""
        # The machine's one installed version, as .ci/run finds it.
        version = sorted(p.name for p in CONFIGS.iterdir() if p.name.isdigit())[-1]
        cluster = cls(version, name, port)
        _run("pg_createcluster", version, name, "-p", str(port), "--start", "--", "--auth=trust")
        return cluster

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def restart(self) -> None:
        """A fast shutdown (every session ended) and a start."""
        _run("pg_ctlcluster", "--skip-systemctl-redirect", self.version, self.name, "restart")

    def drop(self) -> None:
        _run("pg_dropcluster", self.version, self.name, "--stop")
