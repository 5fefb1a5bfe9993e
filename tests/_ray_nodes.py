"""Ray nodes on this machine for tests: `ray start --block`, each node in a Unix session of its
own, so that a test can kill exactly one node, and tears every node down by its session.

Every node, and every driver given `ray_env()`, listens on 127.0.0.1 only: Ray swaps a loopback
`--node-ip-address` for the machine's routable address unless it runs in its single-machine mode
(`session.SINGLE_MACHINE_ENV` = 0, see `session.loopback_only`), and in that mode `ray start
--address` refuses to add a node. A second node is therefore started by `JOIN_ON_LOOPBACK`, which
lifts that refusal and keeps 127.0.0.1 as the node's address, for the `ray start` process only;
the node's own processes inherit the single-machine mode.

Never `ray stop`: it stops every Ray on the machine, including other people's.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _repo import ROOT

from dadh_dist.run.session import SINGLE_MACHINE_ENV


def ray_bin() -> str:
    """The `ray` command of this interpreter (the one on PATH as a fallback)."""
    path = Path(sys.executable).parent / "ray"
    return str(path) if path.exists() else shutil.which("ray")


# The token of the clusters these tests start, in their environment only: `ray start` in token
# mode refuses to start without one, and a fresh machine has no ~/.ray/auth_token (which an
# in-process `ray.init` would create, and which these tests neither need nor write)
TOKEN = secrets.token_hex(32)


def ray_env(**extra: str) -> dict:
    """Environment for nodes and drivers: token auth (the cluster's default, with this session's
    own token) and the repo importable by workers, whatever node they run on; never an inherited
    RAY_ADDRESS. A node is started with RAY_ADDRESS set to its own cluster, which its worker
    processes inherit: Ray Train's
    placement-group cleaner finds its cluster by address autodetection, which fails while another
    Ray runs on this machine (see `session._pin_ray_address`)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": TOKEN, "PYTHONPATH": path,
            SINGLE_MACHINE_ENV: "0", **extra}


JOIN_ON_LOOPBACK = """
import sys
import ray._private.ray_constants as constants
import ray._private.services as services
from ray.scripts.scripts import main
constants.ENABLE_RAY_CLUSTER = True  # the worker-node check of `ray start`
services.resolve_ip_for_localhost = lambda host: host  # --node-ip-address=127.0.0.1 stays
sys.argv[0] = "ray"
sys.exit(main())
"""


def session_pids(sid: int) -> list[int]:
    """Every live process of Unix session `sid` (Ray workers leave their node's process group,
    not its session)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()  # state ppid pgrp session ...
        if int(fields[3]) == sid and fields[0] != "Z":
            pids.append(int(entry.name))
    return pids


def kill_session(sid: int) -> None:
    for pid in session_pids(sid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


_HANDED_OUT: set[int] = set()
"""Every port free_ports has given in this process: a head's ports and its node's own come from
two calls, and nothing holds a port between a call and `ray start` binding it (two calls once
gave the GCS and the dashboard agent the same one, and Ray refused to start)."""


def free_ports(n: int) -> list[int]:
    """n distinct ports free now, below the OS's ephemeral range (32768+) and above Ray's worker
    ports (10002-19999): the ports Ray picks for itself at start-up come from the ephemeral range,
    so they can never equal one of these (Ray refuses to start when two components share one).
    None is one an earlier call gave."""
    import random
    import socket

    chosen: list[int] = []
    for port in random.sample(range(20000, 32000), 200):
        if port in _HANDED_OUT:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        chosen.append(port)
        if len(chosen) == n:
            _HANDED_OUT.update(chosen)
            return chosen
    raise RuntimeError(f"no {n} free ports in 20000-32000")


class Node:
    """One `ray start --block` process, leader of its own session."""

    dashboard_url = ""
    """A head's dashboard (`ray job submit --address`); set by start_head."""

    def __init__(self, args: list[str], env: dict, num_cpus: int, ray: list[str] | None = None):
        self.temp_dir = tempfile.mkdtemp(prefix="ray_", dir="/tmp")  # short: socket paths
        self.log = Path(self.temp_dir) / "ray_start.log"
        ports = ["--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
                 "--metrics-export-port", "--runtime-env-agent-port", "--node-manager-port",
                 "--object-manager-port"]
        self._out = open(self.log, "w")
        self.proc = subprocess.Popen(
            [*(ray or [ray_bin()]), "start", "--block", "--node-ip-address=127.0.0.1",
             f"--num-cpus={num_cpus}", f"--temp-dir={self.temp_dir}", "--disable-usage-stats",
             *[f"{p}={n}" for p, n in zip(ports, free_ports(len(ports)))], *args],
            env=env, cwd=ROOT, start_new_session=True, stdout=self._out, stderr=subprocess.STDOUT,
        )

    def wait_started(self, timeout_s: float = 120) -> None:
        """Return once `ray start` reports its processes up."""
        deadline = time.time() + timeout_s
        while "Ray runtime started" not in self.log.read_text():
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            assert time.time() < deadline, (
                f"ray start: not up after {timeout_s} s\n{self.log.read_text()[-3000:]}")
            time.sleep(0.3)

    @property
    def sid(self) -> int:
        return self.proc.pid

    def kill(self) -> None:
        """Kill every process of this node's session, then drop its temp dir."""
        for _ in range(3):  # a dying raylet may still be starting a worker
            kill_session(self.sid)
            time.sleep(0.2)
        self.proc.wait(timeout=30)
        self._out.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def start_head(num_cpus: int, env: dict) -> tuple[Node, str]:
    """A head node with its dashboard on 127.0.0.1 (free ports); returns (node, GCS address)."""
    port, dashboard, client = free_ports(3)
    head = Node(["--head", f"--port={port}", "--dashboard-host=127.0.0.1",
                 f"--dashboard-port={dashboard}", f"--ray-client-server-port={client}"],
                {**env, "RAY_ADDRESS": f"127.0.0.1:{port}"}, num_cpus)
    head.dashboard_url = f"http://127.0.0.1:{dashboard}"
    return head, f"127.0.0.1:{port}"


def start_worker_node(address: str, num_cpus: int, env: dict) -> Node:
    return Node([f"--address={address}"], {**env, "RAY_ADDRESS": address}, num_cpus,
                ray=[sys.executable, "-c", JOIN_ON_LOOPBACK])


WAIT_FOR_NODES = """
import sys, time, ray
ray.init(address=sys.argv[1], log_to_driver=False)
deadline = time.time() + float(sys.argv[3])
while (sum(n["Alive"] for n in ray.nodes()) < int(sys.argv[2])
       or ray.available_resources().get("CPU", 0) < float(sys.argv[4])):
    if time.time() > deadline:
        sys.exit(f"fewer than {sys.argv[2]} live nodes or {sys.argv[4]} free CPUs after "
                 f"{sys.argv[3]} s: {ray.available_resources()}")
    time.sleep(0.5)
"""


def wait_for_nodes(address: str, count: int, env: dict, timeout_s: float = 90,
                   free_cpus: float = 0) -> None:
    """Return once the cluster has `count` live nodes and `free_cpus` CPUs no one holds (the
    workers of an earlier run may still be leaving); a short-lived driver asks the GCS."""
    proc = subprocess.run([sys.executable, "-c", WAIT_FOR_NODES, address, str(count),
                           str(timeout_s), str(free_cpus)], env=env, capture_output=True,
                          text=True, timeout=timeout_s + 60)
    assert proc.returncode == 0, proc.stderr[-2000:]


def _descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [root]
    while todo:
        pid = todo.pop()
        found.add(pid)
        todo.extend(c for c in children.get(pid, []) if c not in found)
    return found


# local addresses in /proc/net/tcp{,6} (hex, as the kernel writes them) that are loopback
_LOOPBACK = ("0100007F", "00000000000000000000000001000000", "0000000000000000FFFF00000100007F")


def listening_beyond_loopback(root: int) -> list[str]:
    """'address:port (command)' of every TCP socket that the processes under `root` (itself,
    its children, theirs...) listen on at an address other than 127.0.0.1 / ::1."""
    owner: dict[str, int] = {}
    for pid in _descendants(root):
        try:
            links = [os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()]
        except OSError:
            continue
        owner.update({link[8:-1]: pid for link in links if link.startswith("socket:[")})
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            address, port = local.split(":")
            if state == "0A" and inode in owner and address not in _LOOPBACK:
                try:
                    command = Path(f"/proc/{owner[inode]}/cmdline").read_bytes().split(b"\0")[0]
                except OSError:
                    command = b"?"
                if len(address) == 8:  # IPv4, in the kernel's byte order
                    address = ".".join(str(int(address[i:i + 2], 16)) for i in (6, 4, 2, 0))
                found.append(f"{address}:{int(port, 16)} ({command.decode()})")
    return found
