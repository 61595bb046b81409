"""A private RabbitMQ node for tests that must hurt the broker (raise its alarms, kill it) without
touching the one every other test shares.

Each node has its own name, ports and directories, so several can run on one machine, and a
cluster of them can be built from the same pieces (`ctl` runs any rabbitmqctl command against the
node; tests/rabbit_cluster.py builds one). Its data survive `kill()` and `stop()`, so `start()`
again brings back what it held.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

# The server's own scripts, not the wrappers in /usr/sbin, which switch to the `rabbitmq` user
# and read the machine's configuration.
SCRIPTS = Path("/usr/lib/rabbitmq/bin")
START_TIMEOUT = 120.0


@dataclass
class RabbitNode:
    """One RabbitMQ node: `name` (`short@localhost`, or `short@ADDRESS` with long names), its
    AMQP and distribution ports, and a directory of its own for its data, logs, configuration and
    Erlang cookie; `erl_args` go to its Erlang VM."""

    name: str
    port: int
    dist_port: int
    base: Path
    erl_args: str = ""

    @classmethod
    def create(
        cls,
        short_name: str,
        port: int,
        dist_port: int,
        *,
        host: str = "localhost",
        cookie: str | None = None,
        config: str = "",
        erl_args: str = "",
    ) -> RabbitNode:
        """A node that is not started yet, with a fresh directory (owned by the `rabbitmq` user
        when run as root, which the server's scripts insist on). Nodes of one cluster share a
        `cookie`; `config` is added to its rabbitmq.conf."""
        base = Path(tempfile.mkdtemp(prefix=f"{short_name}-"))
        node = cls(f"{short_name}@{host}", port, dist_port, base, erl_args)
        node._write_files(cookie or secrets.token_hex(20).upper(), config)
        return node

    @property
    def longnames(self) -> bool:
        """Whether the node is named after an address (or a fully qualified host), which Erlang
        calls a long name, and every command line tool must say so to reach it."""
        return "." in self.name.split("@", 1)[1]

    @property
    def amqp_url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    def _write_files(self, cookie_text: str, config: str) -> None:
        (self.base / "mnesia").mkdir()
        (self.base / "log").mkdir()
        # Its own configuration, so the machine's (listeners, plugins, node name) is not read.
        (self.base / "rabbitmq.conf").write_text(
            f"listeners.tcp.1 = 127.0.0.1:{self.port}\nloopback_users = none\nlog.console = false\n"
            + config
        )
        (self.base / "rabbitmq-env.conf").write_text("")
        # No plugins: the management plugin would want the port the machine's node has.
        (self.base / "enabled_plugins").write_text("[].\n")
        cookie = self.base / ".erlang.cookie"
        cookie.write_text(cookie_text)
        cookie.chmod(0o400)
        if os.geteuid() == 0:
            user = pwd.getpwnam("rabbitmq")
            for path in [self.base, *self.base.rglob("*")]:
                os.chown(path, user.pw_uid, user.pw_gid)

    def environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        env.update(
            HOME=str(self.base),
            RABBITMQ_NODENAME=self.name,
            RABBITMQ_NODE_PORT=str(self.port),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            RABBITMQ_MNESIA_BASE=str(self.base / "mnesia"),
            RABBITMQ_LOG_BASE=str(self.base / "log"),
            RABBITMQ_CONFIG_FILE=str(self.base / "rabbitmq.conf"),
            RABBITMQ_CONF_ENV_FILE=str(self.base / "rabbitmq-env.conf"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(self.base / "enabled_plugins"),
            RABBITMQ_PID_FILE=str(self.base / "node.pid"),
            ERL_EPMD_ADDRESS="127.0.0.1",
        )
        if self.longnames:
            env["RABBITMQ_USE_LONGNAME"] = "true"
        if self.erl_args:
            env["RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS"] = self.erl_args
        return env

    def _run(self, *command: str, timeout: float) -> subprocess.CompletedProcess[str]:
        as_rabbitmq: Mapping[str, object] = {}
        if os.geteuid() == 0:
            as_rabbitmq = {"user": "rabbitmq", "group": "rabbitmq", "extra_groups": []}
        done: subprocess.CompletedProcess[str] = subprocess.run(  # noqa: PLW1510 (read by callers)
            command,
            env=self.environment(),
            cwd=self.base,
            capture_output=True,
            text=True,
            timeout=timeout,
            **as_rabbitmq,  # type: ignore[call-overload]
        )
        return done

    def ctl(self, *args: str, timeout: float = 60) -> str:
        """`rabbitmqctl -n NODE ARGS…`; its output, or AssertionError with what it said."""
        return self.tool("rabbitmqctl", *args, timeout=timeout)

    def tool(self, script: str, *args: str, timeout: float = 60) -> str:
        """`SCRIPT -n NODE ARGS…` for any of the server's command line tools (rabbitmqctl,
        rabbitmq-queues, …); its output, or AssertionError with what it said."""
        done = self._run(str(SCRIPTS / script), "-q", "-n", self.name, *args, timeout=timeout)
        assert done.returncode == 0, f"{script} {' '.join(args)}: {done.stderr or done.stdout}"
        return done.stdout

    def start(self) -> float:
        """Start the node (on whatever data it has) and wait until it serves; the seconds taken."""
        began = time.monotonic()
        if not self.vm_running():
            # The last run's pid, which would read as a VM that already exited.
            (self.base / "node.pid").unlink(missing_ok=True)
        done = self._run(str(SCRIPTS / "rabbitmq-server"), "-detached", timeout=60)
        assert done.returncode == 0, f"rabbitmq-server: {done.stderr or done.stdout}"
        # await_startup gives up at once on a node that epmd does not know yet, which a detached
        # VM is for its first seconds.
        while not self.running():
            # A VM that wrote its pid and exited will not come up: say why now, not in two minutes.
            if self.vm_exited() or time.monotonic() - began > START_TIMEOUT:
                tail = self.log_tail()
                raise AssertionError(f"{self.name} did not come up; its log ends:\n{tail}")
            time.sleep(0.2)
        self.ctl("await_startup", "--timeout", str(int(START_TIMEOUT)), timeout=START_TIMEOUT + 10)
        return time.monotonic() - began

    def log_tail(self, lines: int = 40) -> str:
        """The last `lines` of each of the node's log files (what it said as it failed)."""
        tails = []
        for log in sorted((self.base / "log").glob("*.log")):
            text = log.read_text(errors="replace").splitlines()[-lines:]
            tails.append(f"--- {log.name}\n" + "\n".join(text))
        return "\n".join(tails) or "(no log written)"

    def vm_running(self) -> bool:
        """Whether the node's VM runs, from the pid file it writes as it starts (no command line
        tool's start-up); it may not serve yet, or any more."""
        written = self.base / "node.pid"
        pid = written.read_text().strip() if written.exists() else ""
        return pid.isdigit() and _alive(int(pid))

    def vm_exited(self) -> bool:
        """Whether the node's VM wrote its pid and is gone since."""
        written = self.base / "node.pid"
        pid = written.read_text().strip() if written.exists() else ""
        return pid.isdigit() and not _alive(int(pid))

    def os_pid(self) -> int:
        """The node's Erlang VM (beam.smp) process id: from the pid file the node writes as it
        starts, else asked of the node (which takes a command line tool's start-up)."""
        written = self.base / "node.pid"
        if written.exists() and (pid := written.read_text().strip()).isdigit() and _alive(int(pid)):
            return int(pid)
        return int(self.ctl("eval", "list_to_integer(os:getpid()).").strip())

    def kill(self, pid: int | None = None) -> None:
        """kill -9 of the node's VM (`pid`, if already known): no goodbye to its clients, nothing
        flushed it had not already written; returns once it is gone."""
        pid = self.os_pid() if pid is None else pid
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while _alive(pid):
            assert time.monotonic() < deadline, f"beam.smp {pid} outlived kill -9"
            time.sleep(0.05)

    def stop(self) -> None:
        """Stop the whole node gracefully (its VM exits); a node already down is left alone."""
        if self.running():
            self.ctl("stop", timeout=120)

    def running(self) -> bool:
        done = self._run(str(SCRIPTS / "rabbitmqctl"), "-q", "-n", self.name, "ping", timeout=60)
        return done.returncode == 0

    def set_memory_alarm(self, on: bool) -> None:
        """Raise RabbitMQ's memory alarm (a watermark below what any node uses) or clear it (the
        default watermark, 0.4)."""
        self.ctl("set_vm_memory_high_watermark", "0.0000001" if on else "0.4")

    def halt(self) -> None:
        """Kill the node's VM if it runs (a node that hangs at start, say), by its pid file."""
        if self.vm_running():
            self.kill(int((self.base / "node.pid").read_text().strip()))

    def remove(self) -> None:
        """Stop the node, or kill it should it not stop, and remove its directory."""
        try:
            self.stop()
        except (AssertionError, subprocess.TimeoutExpired):
            if self.running():
                self.kill()
        shutil.rmtree(self.base, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes; it is the detached server's, not ours, to reap.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except (FileNotFoundError, IndexError):
        return False
