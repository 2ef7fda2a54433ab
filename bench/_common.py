"""Shared parts of the hub benchmarks: child processes (simulator, hub, bare server), pairing, load generators.

Every process under test runs on its own: the simulated modules (``python -m devices.sim``, or this file's
``sim`` sub-command when one protocol is forced), the hub (``ores-hub`` on a loopback port with a throw-away
data directory) and, for comparison, a bare aiohttp server that answers every request with fixed bytes (this
file's ``bare`` sub-command).  The benchmark process only generates load and measures.  Load comes from
``wrk`` when it is installed (closed loop) and otherwise from an aiohttp client; the fixed-rate (open loop)
generator is always the aiohttp one, timing each request from the moment it was due so a stalled server
cannot hide its own queueing.  Nothing here is a test: figures depend on the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypedDict

import aiohttp
import psutil

Protocol = Literal["ores-http", "sunspec", "mixed"]
PROTOCOLS: tuple[Protocol, ...] = ("ores-http", "sunspec", "mixed")
START_TIMEOUT_S = 60.0


class ModuleLine(TypedDict):
    """One line the simulator prints per module."""

    address: str
    kind: str
    device_id: str


# ------------------------------------------------------------------------------------------ child processes


@dataclass(slots=True)
class Child:
    """A child process whose output goes to a log file (so a full pipe can never block it)."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def wait_for_line(self, pattern: str, timeout_s: float = START_TIMEOUT_S) -> re.Match[str]:
        """Wait until the log has a line matching ``pattern``; fail if the process dies or time runs out."""
        regex = re.compile(pattern, re.MULTILINE)
        deadline = time.monotonic() + timeout_s
        while True:
            match = regex.search(self.output())
            if match:
                return match
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.proc.returncode}:\n{self.output()[-3000:]}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not print {pattern!r} in {timeout_s:.0f} s")
            time.sleep(0.05)

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout_s)
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()


def spawn(name: str, argv: Sequence[str], log: Path, *, stdin_pipe: bool = False) -> Child:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            list(argv),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.PIPE if stdin_pipe else subprocess.DEVNULL,
            env=env,
            cwd=Path(__file__).resolve().parent.parent,
        )
    return Child(name, proc, log)


@contextlib.contextmanager
def sim_process(n: int, protocol: Protocol, workdir: Path) -> Any:
    """Run ``n`` simulated modules in their own process; yields ``(child, modules)``."""
    if protocol == "mixed":
        argv = [sys.executable, "-m", "devices.sim", "--modules", str(n)]
    else:
        argv = [
            sys.executable,
            str(Path(__file__).resolve()),
            "sim",
            "--modules",
            str(n),
            "--protocol",
            protocol,
        ]
    child = spawn("simulator", argv, workdir / "sim.log", stdin_pipe=True)
    try:
        child.wait_for_line(r"^READY$", timeout_s=max(START_TIMEOUT_S, n * 0.5))
        modules: list[ModuleLine] = [
            json.loads(line) for line in child.output().splitlines() if line.startswith("{")
        ]
        yield child, modules
    finally:
        child.stop()


def hub_command() -> list[str]:
    script = Path(sys.executable).parent / "ores-hub"
    return [str(script)] if script.exists() else [sys.executable, "-m", "hub.cli"]


@dataclass(slots=True)
class HubProcess:
    child: Child
    url: str
    pairing_code: str


@contextlib.contextmanager
def hub_process(data_dir: Path, hub_settings: dict[str, Any] | None = None) -> Any:
    """Run ``ores-hub`` on a free loopback port with a fresh data directory; yields a ``HubProcess``."""
    data_dir.mkdir(parents=True, exist_ok=True)
    if hub_settings:
        (data_dir / "settings.json").write_text(json.dumps({"hub": hub_settings}))
    argv = [
        *hub_command(),
        "--port", "0",
        "--data-dir", str(data_dir),
        "--device-network", "127.0.0.0/8",
        "--trust-demo-vendors", "--no-discovery",
        "--log-level", "WARNING",
    ]  # fmt: skip
    child = spawn("hub", argv, data_dir.parent / "hub.log")
    try:
        url = child.wait_for_line(r"listening on (http://\S+)").group(1)
        code = child.wait_for_line(r"Pairing code: (\S+)").group(1)
        yield HubProcess(child, url, code)
    finally:
        child.stop()


@contextlib.contextmanager
def bare_process(body_file: Path, workdir: Path) -> Any:
    """Run the bare aiohttp server answering every GET with the bytes of ``body_file``; yields its URL."""
    argv = [sys.executable, str(Path(__file__).resolve()), "bare", "--body", str(body_file)]
    child = spawn("bare server", argv, workdir / "bare.log")
    try:
        yield child, child.wait_for_line(r"listening on (http://\S+)").group(1)
    finally:
        child.stop()


# ------------------------------------------------------------------------------------------ hub API helpers


async def pair(session: aiohttp.ClientSession, url: str, code: str) -> str:
    async with session.post(f"{url}/auth/pair", json={"code": code, "name": "bench"}) as resp:
        body = await resp.json()
        if resp.status != 201:
            raise RuntimeError(f"pairing failed: {resp.status} {body}")
        return str(body["token"])


async def register_all(
    session: aiohttp.ClientSession, url: str, token: str, addresses: Sequence[str], concurrency: int = 16
) -> list[str]:
    """Register every address through ``POST /device/register``; returns the errors (empty when all worked)."""
    gate = asyncio.Semaphore(concurrency)
    errors: list[str] = []

    async def one(address: str) -> None:
        async with (
            gate,
            session.post(f"{url}/device/register", json={"address": address}, headers=auth(token)) as resp,
        ):
            if resp.status not in (200, 201):
                errors.append(f"{address}: {resp.status} {await resp.text()}")

    await asyncio.gather(*(one(a) for a in addresses))
    return errors


async def links(session: aiohttp.ClientSession, url: str, token: str) -> list[dict[str, Any]]:
    async with session.get(f"{url}/hub/communicate", headers=auth(token)) as resp:
        resp.raise_for_status()
        return list((await resp.json())["links"])


async def wait_online(
    session: aiohttp.ClientSession, url: str, token: str, expected: int, timeout_s: float = 30.0
) -> int:
    """Wait until ``expected`` modules are online (or the time is up); returns how many are."""
    deadline = time.monotonic() + timeout_s
    while True:
        online = sum(1 for link in await links(session, url, token) if link["online"])
        if online >= expected or time.monotonic() > deadline:
            return online
        await asyncio.sleep(0.25)


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# ------------------------------------------------------------------------------------------ measuring


@dataclass(slots=True)
class LoadResult:
    """What one load run measured; latencies in ms."""

    tool: str
    requests: int
    errors: int
    duration_s: float
    p50_ms: float
    p99_ms: float
    max_ms: float = math.nan
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s > 0 else 0.0


def percentile(sorted_values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile of already sorted values (nan when empty)."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(pct / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


class CpuMeter:
    """CPU share (percent of one core) of a set of processes between ``start()`` and ``stop()``."""

    def __init__(self, pids: dict[str, int]) -> None:
        self._procs = {name: psutil.Process(pid) for name, pid in pids.items()}
        self._t0 = 0.0
        self._cpu0: dict[str, float] = {}
        self.percent: dict[str, float] = {}

    @staticmethod
    def _cpu(proc: psutil.Process) -> float:
        t = proc.cpu_times()
        return float(t.user + t.system)

    def start(self) -> None:
        self._t0 = time.monotonic()
        self._cpu0 = {name: self._cpu(p) for name, p in self._procs.items()}

    def stop(self) -> dict[str, float]:
        elapsed = time.monotonic() - self._t0
        self.percent = {
            name: (self._cpu(p) - self._cpu0[name]) / elapsed * 100 for name, p in self._procs.items()
        }
        return self.percent


def wrk_available() -> bool:
    return shutil.which("wrk") is not None


_WRK_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}


def _wrk_ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not match:
        raise ValueError(f"unexpected wrk latency {text!r}")
    return float(match.group(1)) * _WRK_UNITS[match.group(2)]


async def wrk_closed_loop(url: str, token: str | None, connections: int, duration_s: float) -> LoadResult:
    """Closed loop with ``wrk`` (one thread, ``connections`` keep-alive connections)."""
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{duration_s:g}s", "--latency", "--timeout", "10s"]
    if token:
        argv += ["-H", f"Authorization: Bearer {token}"]
    proc = await asyncio.create_subprocess_exec(
        *argv, url, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await asyncio.wait_for(proc.communicate(), duration_s + 30)
    text = out.decode(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"wrk failed ({proc.returncode}):\n{text}")
    total = re.search(r"(\d+) requests in ([\d.]+)(ms|s|m)", text)
    if not total:
        raise RuntimeError(f"cannot parse wrk output:\n{text}")
    requests = int(total.group(1))
    duration = _wrk_ms(total.group(2) + total.group(3)) / 1000
    dist = dict(re.findall(r"^\s+(50|75|90|99)%\s+(\S+)$", text, re.MULTILINE))
    latency_max = re.search(r"^\s+Latency\s+\S+\s+\S+\s+(\S+)", text, re.MULTILINE)
    errors = 0
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    if non2xx:
        errors += int(non2xx.group(1))
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if sock:
        errors += sum(int(x) for x in sock.groups())
    return LoadResult(
        tool="wrk",
        requests=requests,
        errors=errors,
        duration_s=duration,
        p50_ms=_wrk_ms(dist["50"]),
        p99_ms=_wrk_ms(dist["99"]),
        max_ms=_wrk_ms(latency_max.group(1)) if latency_max else math.nan,
    )


async def aiohttp_closed_loop(url: str, token: str | None, connections: int, duration_s: float) -> LoadResult:
    """Closed loop with the aiohttp client in this process: ``connections`` workers, each one request at a time."""
    headers = auth(token) if token else {}
    latencies: list[float] = []
    errors = 0
    connector = aiohttp.TCPConnector(limit=connections, force_close=False)
    async with aiohttp.ClientSession(connector=connector, headers=headers) as session:
        started = time.perf_counter()
        deadline = started + duration_s

        async def worker() -> None:
            nonlocal errors
            while (t := time.perf_counter()) < deadline:
                try:
                    async with session.get(url) as resp:
                        await resp.read()
                        ok = resp.status == 200
                except aiohttp.ClientError:
                    ok = False
                latencies.append((time.perf_counter() - t) * 1000)
                errors += not ok

        await asyncio.gather(*(worker() for _ in range(connections)))
        elapsed = time.perf_counter() - started
    latencies.sort()
    return LoadResult(
        tool="aiohttp",
        requests=len(latencies),
        errors=errors,
        duration_s=elapsed,
        p50_ms=percentile(latencies, 50),
        p99_ms=percentile(latencies, 99),
        max_ms=latencies[-1] if latencies else math.nan,
    )


async def closed_loop(
    url: str, token: str | None, connections: int, duration_s: float, tool: str
) -> LoadResult:
    if tool == "wrk":
        return await wrk_closed_loop(url, token, connections, duration_s)
    return await aiohttp_closed_loop(url, token, connections, duration_s)


async def open_loop(url: str, token: str | None, rate: float, duration_s: float) -> LoadResult:
    """Fixed-rate load: request ``i`` is due at ``start + i / rate``; latency counts from that moment.

    Requests are never skipped or delayed by slow answers (each has its own task), so queueing in the
    server shows up in the latency instead of lowering the rate.
    """
    headers = auth(token) if token else {}
    count = int(rate * duration_s)
    latencies: list[float] = []
    lag: list[float] = []
    errors = 0
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, headers=headers) as session:

        async def one(due: float) -> None:
            nonlocal errors
            lag.append((time.perf_counter() - due) * 1000)
            try:
                async with session.get(url, timeout=aiohttp.ClientTimeout(total=10)) as resp:
                    await resp.read()
                    ok = resp.status == 200
            except (aiohttp.ClientError, TimeoutError):
                ok = False
            latencies.append((time.perf_counter() - due) * 1000)
            errors += not ok

        tasks: set[asyncio.Task[None]] = set()
        start = time.perf_counter() + 0.05
        for i in range(count):
            due = start + i / rate
            wait = due - time.perf_counter()
            if wait > 0:
                await asyncio.sleep(wait)
            task = asyncio.create_task(one(due))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - start
    latencies.sort()
    lag.sort()
    return LoadResult(
        tool="aiohttp open loop",
        requests=len(latencies),
        errors=errors,
        duration_s=elapsed,
        p50_ms=percentile(latencies, 50),
        p99_ms=percentile(latencies, 99),
        max_ms=latencies[-1] if latencies else math.nan,
        extra={"send_lag_p99_ms": percentile(lag, 99)},
    )


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ sub-commands


async def _serve_bare(body: bytes) -> None:
    """A bare aiohttp server: one handler returning fixed JSON bytes, run the way the hub runs its app."""
    from aiohttp import web

    async def handler(_: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/json")

    app = web.Application()
    app.router.add_get("/{tail:.*}", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    server: Any = site._server  # aiohttp keeps the asyncio server here; no public accessor exists
    port = server.sockets[0].getsockname()[1]
    print(f"bare server listening on http://127.0.0.1:{port}/", flush=True)
    await _until_terminated()
    await runner.cleanup()


async def _serve_sim(n: int, protocol: Protocol) -> None:
    """Like ``python -m devices.sim`` but every module speaks one protocol family."""
    from devices.model import DeviceKind
    from devices.sim.base import SimServer, SimulatedModule
    from devices.sim.home import serve_module
    from devices.sim.physics import build_demo_home

    modules: list[SimulatedModule] = []
    seed = 1
    while len(modules) < n:
        home = build_demo_home(speedup=1.0, seed=seed)
        modules.extend(home.modules[: n - len(modules)])
        seed += 1
    servers: list[SimServer] = []
    try:
        for index, module in enumerate(modules):
            if protocol == "ores-http":
                wire = "ores-http"
            else:  # SunSpec has no smart-plug model: plugs stay on ORES-HTTP
                kind = module.info.kind
                wire = (
                    "ores-http"
                    if kind is DeviceKind.SMARTPLUG
                    else ("sunspec-legacy", "sunspec-der")[index % 2]
                )
                if kind is DeviceKind.METER:
                    wire = "sunspec-legacy"
            servers.append(await serve_module(module, wire))
        for server in servers:
            info = server.module.info
            line = {"address": str(server.address), "kind": info.kind.value, "device_id": info.device_id}
            print(json.dumps(line))
        print("READY", flush=True)
        await _until_terminated(watch_stdin=True)
    finally:
        await asyncio.gather(*(s.stop() for s in servers), return_exceptions=True)


async def _until_terminated(*, watch_stdin: bool = False) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    if watch_stdin:
        loop.add_reader(
            sys.stdin.fileno(), lambda: stop.set() if not os.read(sys.stdin.fileno(), 1) else None
        )
    await stop.wait()


@contextlib.asynccontextmanager
async def client_session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        yield session


def main() -> None:
    p = argparse.ArgumentParser(description="helper processes of the hub benchmarks")
    sub = p.add_subparsers(dest="cmd", required=True)
    bare = sub.add_parser("bare", help="serve fixed bytes with a bare aiohttp handler")
    bare.add_argument("--body", type=Path, required=True)
    sim = sub.add_parser("sim", help="simulated modules with one protocol family")
    sim.add_argument("--modules", type=int, default=8)
    sim.add_argument("--protocol", choices=("ores-http", "sunspec"), default="ores-http")
    args = p.parse_args()
    if args.cmd == "bare":
        asyncio.run(_serve_bare(args.body.read_bytes()))
    else:
        asyncio.run(_serve_sim(args.modules, args.protocol))


if __name__ == "__main__":
    main()


def run_in_workdir(
    run: Callable[[argparse.Namespace, Path], Awaitable[bool]], args: argparse.Namespace, prefix: str
) -> None:
    """Run a benchmark in a fresh work directory (kept and printed with ``args.keep``); exit 0 on PASS."""
    if args.keep:
        workdir = Path(tempfile.mkdtemp(prefix=prefix))
        print(f"work directory: {workdir}")
        ok = asyncio.run(run(args, workdir))
    else:
        with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
            ok = asyncio.run(run(args, Path(tmp)))
    raise SystemExit(0 if ok else 1)
