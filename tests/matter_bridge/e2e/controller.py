"""A real Matter controller for the end-to-end test and bench/matter.py: python-matter-server 7.0.1 (CHIP SDK).

``MatterServer`` runs ``matter-server`` from its own virtualenv (``<repo>/.venv-matter``, made by
tools/setup-matter-controller.sh; ``ORES_MATTER_SERVER`` points elsewhere) inside a network namespace and a
private mount namespace: the CHIP SDK hard-codes ``/data/chip_*.ini`` and ``/tmp/chip_kvs``, so a per-run
directory is bind-mounted over ``/data`` and its ``tmp`` over ``/tmp`` (the host only needs an empty ``/data``
as mount point), which also lets two controllers run side by side.  The PAA directory holds the public test
PAA certificates that matter.js signs with (exported by ``matter_bridge/js/export-paa.mjs``) and a fresh
``.version``, without which the server deletes them and tries to download others.  A forwarder in the same
network namespace makes the websocket reachable through a Unix socket.

``ControllerClient`` speaks the server's websocket JSON (``{"message_id", "command", "args"}`` →
``result``/``error_code``, and ``event`` messages after ``start_listening``) with the project's own aiohttp,
so no CHIP package is imported here.  Every event is kept with its arrival time; tests wait on conditions
with deadlines.  Attribute paths are ``"endpoint/cluster/attribute"`` with numeric ids.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from tests.matter_bridge.e2e.netns import NetnsPair, forwarder_argv, netns_unavailable

REPO = Path(__file__).resolve().parents[3]
JS_DIR = REPO / "matter_bridge" / "js"
WS_URL = "http://matter-server/ws"
START_TIMEOUT_S = 90.0
COMMAND_TIMEOUT_S = 60.0

# Cluster and attribute ids used by the tests (Matter 1.3).
DESCRIPTOR = 0x001D  # DeviceTypeList 0, PartsList 3
BASIC_INFORMATION = 0x0028
BRIDGED_BASIC_INFORMATION = 0x0039  # NodeLabel 5, SerialNumber 15, Reachable 17, UniqueID 18
POWER_SOURCE = 0x002F  # BatPercentRemaining 12, BatChargeState 26
OPERATIONAL_CREDENTIALS = 0x003E  # Fabrics 1
ON_OFF = 0x0006  # OnOff 0
ELECTRICAL_POWER_MEASUREMENT = 0x0090  # ActivePower 8
ELECTRICAL_ENERGY_MEASUREMENT = 0x0091


class ControllerError(Exception):
    """The controller could not be started, reached or used (the reason is the message)."""


class CommandFailed(ControllerError):
    """python-matter-server answered a command with an error."""

    def __init__(self, command: str, error_code: int, details: str | None) -> None:
        super().__init__(f"{command} failed: error {error_code}: {details}")
        self.command = command
        self.error_code = error_code
        self.details = details


def matter_server_path() -> Path:
    """Where the controller is: ``$ORES_MATTER_SERVER`` or ``<repo>/.venv-matter/bin/matter-server``."""
    override = os.environ.get("ORES_MATTER_SERVER")
    return Path(override) if override else REPO / ".venv-matter" / "bin" / "matter-server"


def e2e_unavailable() -> str | None:
    """Why the end-to-end set-up cannot run here, or None when everything it needs is present."""
    if shutil.which("node") is None:
        return "node (Node.js >= 20.19) is not on PATH"
    if not (JS_DIR / "node_modules" / "@matter" / "main").is_dir():
        return "matter_bridge/js/node_modules is missing (run `npm ci --prefix matter_bridge/js`)"
    server = matter_server_path()
    if not os.access(server, os.X_OK):
        return f"{server} is missing (run `bash tools/setup-matter-controller.sh`)"
    reason = netns_unavailable()
    if reason:
        return reason
    if not Path("/data").is_dir():
        return "/data (the CHIP SDK's mount point) is missing (run `bash tools/setup-matter-controller.sh`)"
    return None


def export_paa(dest: Path) -> None:
    """Write the matter.js test PAA certificates (DER) and a fresh ``.version`` into ``dest``."""
    done = subprocess.run(
        ["node", str(JS_DIR / "export-paa.mjs"), str(dest)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=JS_DIR,
    )
    if done.returncode != 0:
        raise ControllerError(f"export-paa.mjs failed: {done.stderr.strip()}")
    (dest / ".version").touch()


def _stop_group(proc: subprocess.Popen[bytes], timeout_s: float = 10.0) -> None:
    """SIGTERM the process group of ``proc`` (started with ``start_new_session``), SIGKILL it if needed."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout_s)
    # Whatever is left in the group (the child of `sh`, of `unshare`…) goes too.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout_s)


# The inner command: private mount namespace, per-run /data and /tmp, then exec the server.  The controller's
# virtualenv is bind-mounted at /data/venv first: the checkout (and so .venv-matter) may itself live under /tmp,
# which the per-run /tmp hides.  Its python finds the venv by its own path (pyvenv.cfg beside bin/).
_INNER = """set -e
mount --bind "$0" /data
mount --bind "$1" /data/venv
mount --bind /data/tmp /tmp
shift
exec /data/venv/bin/python -c 'import sys; from matter_server.server.__main__ import main; sys.argv[0] = "matter-server"; sys.exit(main())' \
    --storage-path /data/server --paa-root-cert-dir /data/paa "$@"
"""


@dataclass
class MatterServer:
    """One python-matter-server instance in namespace ``ns`` with its own directory ``run_dir``."""

    netns: NetnsPair
    run_dir: Path
    socket_path: Path
    port: int = 5580
    fabric_id: int = 1
    log_level: str = "info"
    sdk_log_level: str = "error"
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def log_file(self) -> Path:
        return self.run_dir / "matter-server.log"

    def start(self, paa_src: Path) -> None:
        """Start the server and its forwarder (returns at once; ``wait_ready`` waits for the websocket)."""
        for sub in ("server", "paa", "tmp", "venv"):
            (self.run_dir / sub).mkdir(parents=True, exist_ok=True)
        for cert in paa_src.glob("*.der"):
            shutil.copy(cert, self.run_dir / "paa" / cert.name)
        (self.run_dir / "paa" / ".version").touch()  # mtime < 24 h: "Skip fetching certificates"
        args: Sequence[str] = (
            "--port", str(self.port),
            "--fabricid", str(self.fabric_id),
            "--primary-interface", self.netns.if_b,
            "--log-level", self.log_level,
            "--log-level-sdk", self.sdk_log_level,
        )  # fmt: skip
        argv = [
            *self.netns.exec_prefix(self.netns.b),
            "unshare", "--mount", "--propagation", "private", "--",
            "sh", "-c", _INNER, str(self.run_dir), str(matter_server_path().resolve().parent.parent), *args,
        ]  # fmt: skip
        with self.log_file.open("ab") as log:
            self.procs.append(
                subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
        fwd = [
            *self.netns.exec_prefix(self.netns.b),
            *forwarder_argv(str(self.socket_path), "::1", self.port),
        ]
        self.procs.append(
            subprocess.Popen(
                fwd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        )  # fmt: skip

    def probe(self) -> bool:
        """True when the websocket server answers HTTP through the forwarder (it starts listening last)."""
        if not self.socket_path.exists():
            return False
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(2.0)
            try:
                sock.connect(str(self.socket_path))
                sock.sendall(b"GET /info HTTP/1.0\r\nHost: matter-server\r\n\r\n")
                return sock.recv(16).startswith(b"HTTP/")
            except OSError:
                return False

    def wait_ready(self, timeout_s: float = START_TIMEOUT_S) -> float:
        """Block until the server answers (seconds it took); ControllerError if it died or time ran out."""
        t0 = time.monotonic()
        while not self.probe():
            for proc in self.procs:
                if proc.poll() is not None:
                    raise ControllerError(f"matter-server exited ({proc.returncode}):\n{self.log_tail()}")
            if time.monotonic() - t0 > timeout_s:
                raise ControllerError(f"matter-server not ready in {timeout_s:.0f} s:\n{self.log_tail()}")
            time.sleep(0.1)
        return time.monotonic() - t0

    async def wait_ready_async(self, timeout_s: float = START_TIMEOUT_S) -> float:
        return await asyncio.to_thread(self.wait_ready, timeout_s)

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_file.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self) -> None:
        """Stop the server and the forwarder (process groups; idempotent)."""
        for proc in reversed(self.procs):
            _stop_group(proc)
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()

    def client(self) -> ControllerClient:
        return ControllerClient(self.socket_path)


def start_lab(work: Path, sock_dir: Path, controllers: int = 2) -> tuple[NetnsPair, list[MatterServer]]:
    """Create a fresh pair of namespaces and start ``controllers`` servers in B (fabric ids 1, 2, …; ports
    5580, 5581, …; sockets in ``sock_dir``, which must be a short path), waiting until all answer.  The caller
    stops them with ``stop_lab``; on failure nothing is left running."""
    netns = NetnsPair.unique()
    netns.up()
    servers: list[MatterServer] = []
    try:
        export_paa(work / "paa")
        for i in range(1, controllers + 1):
            server = MatterServer(
                netns, work / f"controller-{i}", sock_dir / f"c{i}.sock", port=5579 + i, fabric_id=i
            )
            servers.append(server)
            server.start(work / "paa")
        for server in servers:
            server.wait_ready()
    except BaseException:
        stop_lab(netns, servers)
        raise
    return netns, servers


def stop_lab(netns: NetnsPair, servers: list[MatterServer]) -> None:
    """Stop the servers and remove the namespaces with anything still running in them."""
    for server in servers:
        server.stop()
    netns.down()


# ------------------------------------------------------------------------------------------ the client


@dataclass(frozen=True, slots=True)
class Event:
    """One event from the server, with its arrival time (``time.monotonic()``)."""

    t: float
    name: str
    data: Any


class ControllerClient:
    """The websocket API of python-matter-server over a Unix socket, with an event log and node cache."""

    def __init__(self, socket_path: Path) -> None:
        self.socket_path = socket_path
        self.server_info: dict[str, Any] = {}
        self.nodes: dict[int, dict[str, Any]] = {}
        self.events: list[Event] = []
        self.changed = asyncio.Condition()
        self._session: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._reader: asyncio.Task[None] | None = None
        self._pending: dict[str, tuple[str, asyncio.Future[Any]]] = {}
        self._next_id = 0

    async def connect(self, timeout_s: float = 30.0) -> None:
        """Open the websocket (retrying until the deadline) and read the server's greeting."""
        deadline = time.monotonic() + timeout_s
        while True:
            session = aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(self.socket_path)))
            try:
                ws = await session.ws_connect(WS_URL, heartbeat=None, max_msg_size=0)
                self.server_info = await ws.receive_json(timeout=10)
            except (OSError, aiohttp.ClientError, TimeoutError, ValueError) as err:
                await session.close()
                if time.monotonic() > deadline:
                    raise ControllerError(f"cannot reach matter-server at {self.socket_path}: {err}") from err
                await asyncio.sleep(0.2)
                continue
            self._session, self._ws = session, ws
            self._reader = asyncio.create_task(self._read(), name="matter-controller-reader")
            return

    async def close(self) -> None:
        reader, self._reader = self._reader, None
        if self._ws is not None:
            await self._ws.close()
        if reader is not None:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
        if self._session is not None:
            await self._session.close()
        self._ws = self._session = None
        self._fail_pending(ControllerError("client closed"))

    def _fail_pending(self, err: Exception) -> None:
        for _, fut in self._pending.values():
            if not fut.done():
                fut.set_exception(err)
        self._pending.clear()

    async def _read(self) -> None:
        assert self._ws is not None
        try:
            async for msg in self._ws:
                if msg.type is not aiohttp.WSMsgType.TEXT:
                    continue
                await self._dispatch(json.loads(msg.data))
        finally:
            self._fail_pending(ControllerError("websocket closed"))
            async with self.changed:
                self.changed.notify_all()

    async def _dispatch(self, msg: dict[str, Any]) -> None:
        if "event" in msg:
            name, data = str(msg["event"]), msg.get("data")
            self._apply(name, data)
            async with self.changed:
                self.events.append(Event(time.monotonic(), name, data))
                self.changed.notify_all()
            return
        pending = self._pending.pop(str(msg.get("message_id")), None)
        if pending is None or pending[1].done():
            return
        command, fut = pending
        if "error_code" in msg:
            fut.set_exception(CommandFailed(command, int(msg["error_code"]), msg.get("details")))
        else:
            fut.set_result(msg.get("result"))

    def _apply(self, name: str, data: Any) -> None:
        """Keep ``nodes`` current, as the real client does."""
        if name in ("node_added", "node_updated"):
            self.nodes[int(data["node_id"])] = data
        elif name == "node_removed":
            self.nodes.pop(int(data), None)
        elif name == "attribute_updated":
            node_id, path, value = data
            node = self.nodes.get(int(node_id))
            if node is not None:
                node["attributes"][path] = value

    # ---- commands

    async def command(self, command: str, timeout_s: float = COMMAND_TIMEOUT_S, **args: Any) -> Any:
        """Send one command and wait for its result; CommandFailed on an error answer."""
        if self._ws is None or self._ws.closed:
            raise ControllerError("not connected")
        self._next_id += 1
        message_id = str(self._next_id)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[message_id] = (command, fut)
        await self._ws.send_json({"message_id": message_id, "command": command, "args": args})
        try:
            async with asyncio.timeout(timeout_s):
                return await fut
        except TimeoutError as err:
            self._pending.pop(message_id, None)
            raise ControllerError(f"{command}: no answer in {timeout_s:.0f} s") from err

    async def start_listening(self) -> list[dict[str, Any]]:
        """Subscribe to every event; returns (and caches) all nodes."""
        nodes: list[dict[str, Any]] = await self.command("start_listening")
        self.nodes = {int(n["node_id"]): n for n in nodes}
        return nodes

    async def commission_with_code(self, code: str, network_only: bool = True) -> dict[str, Any]:
        node: dict[str, Any] = await self.command(
            "commission_with_code", code=code, network_only=network_only
        )
        self.nodes[int(node["node_id"])] = node
        return node

    async def commission_on_network(self, setup_pin_code: int, ip_addr: str | None = None) -> dict[str, Any]:
        node: dict[str, Any] = await self.command(
            "commission_on_network", setup_pin_code=setup_pin_code, ip_addr=ip_addr
        )
        return node

    async def get_node(self, node_id: int) -> dict[str, Any]:
        node: dict[str, Any] = await self.command("get_node", node_id=node_id)
        self.nodes[node_id] = node
        return node

    async def read_attribute(
        self, node_id: int, path: str | list[str], fabric_filtered: bool = False
    ) -> dict[str, Any]:
        """Read from the device (not the cache): ``{path: value}``."""
        values: dict[str, Any] = await self.command(
            "read_attribute", node_id=node_id, attribute_path=path, fabric_filtered=fabric_filtered
        )
        return values

    async def device_command(
        self,
        node_id: int,
        endpoint_id: int,
        cluster_id: int,
        command_name: str,
        payload: dict[str, Any] | None = None,
    ) -> Any:
        return await self.command(
            "device_command",
            node_id=node_id,
            endpoint_id=endpoint_id,
            cluster_id=cluster_id,
            command_name=command_name,
            payload=payload or {},
        )

    async def get_matter_fabrics(self, node_id: int) -> list[dict[str, Any]]:
        """The node's fabrics, read unfiltered from the device: ``[{fabric_index, fabric_id, vendor_id,
        node_id, label}]``."""
        path = f"0/{OPERATIONAL_CREDENTIALS}/1"
        raw = (await self.read_attribute(node_id, path, fabric_filtered=False)).get(path) or []
        return [
            {
                "fabric_index": f.get("254"),
                "vendor_id": f.get("2"),
                "fabric_id": f.get("3"),
                "node_id": f.get("4"),
                "label": f.get("5"),
            }
            for f in raw
        ]

    async def remove_node(self, node_id: int) -> None:
        await self.command("remove_node", node_id=node_id)

    # ---- waiting

    def attribute(self, node_id: int, path: str) -> Any:
        """The cached value (from the interview and the subscription reports)."""
        return self.nodes.get(node_id, {}).get("attributes", {}).get(path)

    def available(self, node_id: int) -> bool:
        return bool(self.nodes.get(node_id, {}).get("available"))

    def mark(self) -> int:
        """An index into ``events``: pass it as ``since`` to wait only for later events."""
        return len(self.events)

    async def wait_event(
        self, pred: Callable[[Event], bool], timeout_s: float, since: int = 0, what: str = "event"
    ) -> Event:
        """The first event from index ``since`` on that satisfies ``pred`` (waiting up to ``timeout_s``)."""
        pos = since
        try:
            async with asyncio.timeout(timeout_s), self.changed:
                while True:
                    for ev in self.events[pos:]:
                        if pred(ev):
                            return ev
                    pos = len(self.events)
                    if self._reader is None or self._reader.done():
                        raise ControllerError(f"websocket closed while waiting for {what}")
                    await self.changed.wait()
        except TimeoutError as err:
            raise ControllerError(f"no {what} in {timeout_s:g} s") from err

    async def wait_attribute(
        self, node_id: int, path: str, pred: Callable[[Any], bool], timeout_s: float, since: int = 0
    ) -> Event:
        """The first ``attribute_updated`` of ``path`` from ``since`` on whose value satisfies ``pred``."""
        return await self.wait_event(
            lambda e: (
                e.name == "attribute_updated"
                and int(e.data[0]) == node_id
                and e.data[1] == path
                and pred(e.data[2])
            ),
            timeout_s,
            since,
            f"attribute_updated {path}",
        )

    async def wait_quiet(self, quiet_s: float, timeout_s: float) -> None:
        """Wait until no event (report, node update) arrived for ``quiet_s`` seconds.  The controller asks
        for reports at most once a second (its MinIntervalFloor), so a change made after a quiet second is
        reported at once: this is how a latency sample is made "isolated".  (A change still waiting for its
        report cannot be seen from here: wait for that report first.)"""
        deadline = time.monotonic() + timeout_s
        while True:
            last = self.events[-1].t if self.events else 0.0
            now = time.monotonic()
            if now - last >= quiet_s:
                return
            if now > deadline:
                raise ControllerError(f"reports did not pause for {quiet_s:g} s within {timeout_s:g} s")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(quiet_s - (now - last)), self.changed:
                    await self.changed.wait()

    async def wait_until(self, cond: Callable[[], bool], timeout_s: float, what: str = "condition") -> None:
        """Wait until ``cond()`` holds (re-checked after every event)."""
        try:
            async with asyncio.timeout(timeout_s), self.changed:
                await self.changed.wait_for(cond)
        except TimeoutError as err:
            raise ControllerError(f"timed out after {timeout_s:g} s waiting for {what}") from err
