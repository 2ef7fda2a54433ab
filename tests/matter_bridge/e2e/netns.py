"""Two Linux network namespaces joined by a veth pair, for the Matter end-to-end test and bench/matter.py.

The hub's Matter bridge runs in namespace A and the Matter controller (python-matter-server) in namespace B;
the link between them is IPv6 only (ULA fd5e:1::/64 plus link-local), multicast on, duplicate address
detection off (so addresses are usable at once), and nothing leaves the two namespaces.  Everything here needs
root (CAP_NET_ADMIN and CAP_SYS_ADMIN).  This module uses the standard library only: it also runs, as a script
inside namespace B, the Unix-socket forwarder that lets the test in the root namespace reach the controller's
websocket (``python netns.py forward SOCKET HOST PORT``): Unix sockets live in the file system, not in a
network namespace.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass

ADDR_A = "fd5e:1::1"
ADDR_B = "fd5e:1::2"
IF_A = "veth-a"
IF_B = "veth-b"
_CMD_TIMEOUT_S = 20.0


class NetnsError(RuntimeError):
    """A namespace command failed (the reason, with the command's stderr, is the message)."""


def _run(argv: Sequence[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=_CMD_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise NetnsError(f"{' '.join(argv)}: {err}") from err
    if check and done.returncode != 0:
        raise NetnsError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
    return done


def netns_unavailable() -> str | None:
    """Why namespaces cannot be used here (not root, no ``ip``, ``ip netns add`` refused), or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is missing"
    if shutil.which("unshare") is None:
        return "the `unshare` command (util-linux) is missing"
    probe = f"ores-probe-{os.getpid()}"
    try:
        _run(["ip", "netns", "add", probe])
    except NetnsError as err:
        return f"`ip netns add` does not work here: {err}"
    _run(["ip", "netns", "del", probe], check=False)
    return None


@dataclass(frozen=True, slots=True)
class NetnsPair:
    """Namespaces ``a`` (the bridge side, ``if_a``/``addr_a``) and ``b`` (the controller side)."""

    a: str
    b: str
    if_a: str = IF_A
    if_b: str = IF_B
    addr_a: str = ADDR_A
    addr_b: str = ADDR_B

    @classmethod
    def unique(cls, tag: str = "ores") -> NetnsPair:
        """Names that no other run on this machine uses (the process id is in them)."""
        return cls(f"{tag}-a-{os.getpid()}", f"{tag}-b-{os.getpid()}")

    def exec_prefix(self, ns: str) -> tuple[str, ...]:
        """The argv prefix that runs a command inside namespace ``ns``."""
        return ("ip", "netns", "exec", ns)

    def up(self) -> None:
        """Create both namespaces and the link (removing leftovers of the same names first).  On failure
        nothing is left behind and NetnsError says why."""
        self.down()
        try:
            _run(["ip", "netns", "add", self.a])
            _run(["ip", "netns", "add", self.b])
            veth = ("type", "veth", "peer", "name", self.if_b, "netns", self.b)
            _run(["ip", "link", "add", self.if_a, "netns", self.a, *veth])
            self._setup_side(self.a, self.if_a, self.addr_a)
            self._setup_side(self.b, self.if_b, self.addr_b)
        except NetnsError:
            self.down()
            raise

    def _setup_side(self, ns: str, ifname: str, addr: str) -> None:
        # DAD off before the link comes up: the automatic fe80:: address is then usable at once, not
        # "tentative" (``nodad`` only covers addresses added by hand).
        # Written through /proc (which shows the writer's own namespace) rather than with sysctl(8), which
        # minimal systems lack.
        sysctls = {
            "all/accept_dad": 0,
            "default/accept_dad": 0,
            f"{ifname}/accept_dad": 0,
            "all/disable_ipv6": 0,
            f"{ifname}/disable_ipv6": 0,
        }
        script = "; ".join(f"echo {v} > /proc/sys/net/ipv6/conf/{k}" for k, v in sysctls.items())
        _run([*self.exec_prefix(ns), "sh", "-ec", script])
        _run(["ip", "-n", ns, "link", "set", "lo", "up"])
        _run(["ip", "-n", ns, "link", "set", ifname, "multicast", "on"])
        _run(["ip", "-n", ns, "addr", "add", f"{addr}/64", "dev", ifname, "nodad"])
        _run(["ip", "-n", ns, "link", "set", ifname, "up"])
        # A fresh namespace has no default route: sockets not bound to an interface need one.
        _run(["ip", "-n", ns, "-6", "route", "add", "default", "dev", ifname, "metric", "1024"], check=False)

    def down(self) -> None:
        """Kill every process still inside either namespace, then remove both (the veth pair goes with
        them): deleting a namespace's name alone would leave its processes running.  Idempotent."""
        for ns in (self.a, self.b):
            for pid in _run(["ip", "netns", "pids", ns], check=False).stdout.split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            _run(["ip", "netns", "del", ns], check=False)

    def exists(self) -> bool:
        listed = _run(["ip", "netns", "list"], check=False).stdout.split()
        return self.a in listed or self.b in listed


# ------------------------------------------------------------------------------------------ the forwarder


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        with contextlib.suppress(OSError):
            writer.close()


async def forward(path: str, host: str, port: int) -> None:
    """Accept connections on the Unix socket ``path`` and connect each to ``host:port`` (until killed)."""

    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            server_r, server_w = await asyncio.open_connection(host, port)
        except OSError:
            client_w.close()
            return
        await asyncio.gather(_pipe(client_r, server_w), _pipe(server_r, client_w))

    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    server = await asyncio.start_unix_server(handle, path)
    async with server:
        await server.serve_forever()


def forwarder_argv(path: str, host: str, port: int) -> list[str]:
    """The command that runs this file's forwarder (prefix it with ``ip netns exec NS``)."""
    return [sys.executable, os.path.abspath(__file__), "forward", path, host, str(port)]


if __name__ == "__main__":
    if len(sys.argv) != 5 or sys.argv[1] != "forward":
        sys.exit("usage: netns.py forward SOCKET HOST PORT")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(forward(sys.argv[2], sys.argv[3], int(sys.argv[4])))
