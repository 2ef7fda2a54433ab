"""Benchmark of the hub's busiest read, ``GET /app/monitor``, against a bare aiohttp handler.

Run with ``python bench/api.py``.  It starts 50 simulated modules in their own process, the hub as its own
process (``ores-hub`` on a loopback port, fresh data directory, polling the modules at 1 Hz as usual),
registers the modules, and takes one ``/app/monitor`` body.  A bare aiohttp server in a third process answers
every request with exactly those bytes.  The same load generator then measures (a) the maximum throughput of
both in a closed loop (``wrk`` if installed, else the aiohttp client; N connections for a fixed duration) and
their ratio, and (b) the latency at a fixed open-loop rate (200 requests/s).  Targets: hub/bare >= 0.5 and
p99 < 20 ms at 200 requests/s.  Figures depend on the machine; nothing here is a test.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    PROTOCOLS,
    CpuMeter,
    LoadResult,
    auth,
    bare_process,
    client_session,
    closed_loop,
    hub_process,
    open_loop,
    pair,
    register_all,
    sim_process,
    table,
    wait_online,
    wrk_available,
)

TARGET_RATIO = 0.5
TARGET_P99_MS = 20.0


def _loadgen_cpu() -> float:
    """CPU seconds used so far by this process and its finished children (``wrk`` runs)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


async def _measure(
    label: str, url: str, token: str | None, *, args: argparse.Namespace, tool: str, pids: dict[str, int]
) -> tuple[LoadResult, dict[str, float]]:
    await closed_loop(url, token, args.connections, args.warmup, tool)  # warm-up, discarded
    meter = CpuMeter(pids)
    cpu0, t0 = _loadgen_cpu(), time.monotonic()
    meter.start()
    result = await closed_loop(url, token, args.connections, args.duration, tool)
    cpu = meter.stop()
    cpu["load generator"] = (_loadgen_cpu() - cpu0) / (time.monotonic() - t0) * 100
    print(f"  {label}: {result.rps:,.0f} requests/s ({result.errors} errors)", flush=True)
    return result, cpu


async def run(args: argparse.Namespace, workdir: Path) -> bool:
    tool = args.loadgen if args.loadgen != "auto" else ("wrk" if wrk_available() else "aiohttp")
    print(
        f"bench/api.py: {args.modules} simulated modules ({args.protocol}), load generator {tool}, "
        f"{args.connections} connections x {args.duration:g} s, open loop {args.rate:g}/s x {args.duration:g} s "
        f"on {psutil.cpu_count()} CPUs",
        flush=True,
    )
    with (
        sim_process(args.modules, args.protocol, workdir) as (sim, modules),
        hub_process(workdir / "hub", {"poll_interval_s": 1.0}) as hub,
    ):
        async with client_session() as session:
            token = await pair(session, hub.url, hub.pairing_code)
            errors = await register_all(session, hub.url, token, [m["address"] for m in modules])
            if errors:
                raise RuntimeError("registration failed:\n" + "\n".join(errors[:10]))
            online = await wait_online(session, hub.url, token, len(modules))
            monitor_url = f"{hub.url}/app/monitor"
            async with session.get(monitor_url, headers=auth(token)) as resp:
                resp.raise_for_status()
                body = await resp.read()
        body_file = workdir / "monitor.json"
        body_file.write_bytes(body)
        print(
            f"  {len(modules)} registered, {online} online; /app/monitor body {len(body):,} bytes", flush=True
        )

        with bare_process(body_file, workdir) as (bare, bare_url):
            async with client_session() as session, session.get(bare_url) as resp:
                if await resp.read() != body:
                    raise RuntimeError("the bare server does not return the monitor body")
            hub_pids = {"hub": hub.child.pid, "simulator": sim.pid}
            hub_res, hub_cpu = await _measure(
                "hub  closed loop", monitor_url, token, args=args, tool=tool, pids=hub_pids
            )
            bare_pids = {"bare": bare.pid, "simulator": sim.pid}
            bare_res, bare_cpu = await _measure(
                "bare closed loop", bare_url, None, args=args, tool=tool, pids=bare_pids
            )
            hub_open = await open_loop(monitor_url, token, args.rate, args.duration)
            print(f"  hub  open loop: p99 {hub_open.p99_ms:.1f} ms", flush=True)
            bare_open = await open_loop(bare_url, None, args.rate, args.duration)
            print(f"  bare open loop: p99 {bare_open.p99_ms:.1f} ms", flush=True)

    ratio = hub_res.rps / bare_res.rps if bare_res.rps else math.nan

    def row(name: str, r: LoadResult, server_cpu: float | None, loadgen_cpu: float | None) -> list[str]:
        return [
            name,
            f"{r.requests:,}",
            str(r.errors),
            f"{r.rps:,.0f}",
            f"{r.p50_ms:.2f}",
            f"{r.p99_ms:.2f}",
            f"{r.max_ms:.1f}",
            "-" if server_cpu is None else f"{server_cpu:.0f} %",
            "-" if loadgen_cpu is None else f"{loadgen_cpu:.0f} %",
        ]

    print()
    print(f"GET /app/monitor, {len(modules)} modules, body {len(body):,} bytes")
    print(
        table(
            ["run", "requests", "errors", "req/s", "p50 ms", "p99 ms", "max ms", "server CPU", "loadgen CPU"],
            [
                row(
                    f"hub, closed loop c={args.connections} ({tool})",
                    hub_res,
                    hub_cpu["hub"],
                    hub_cpu["load generator"],
                ),
                row(
                    f"bare, closed loop c={args.connections} ({tool})",
                    bare_res,
                    bare_cpu["bare"],
                    bare_cpu["load generator"],
                ),
                row(f"hub, open loop {args.rate:g}/s", hub_open, None, None),
                row(f"bare, open loop {args.rate:g}/s", bare_open, None, None),
            ],
        )
    )
    print(
        f"simulator CPU during the hub run {hub_cpu['simulator']:.0f} %; open-loop send lag p99 "
        f"{hub_open.extra['send_lag_p99_ms']:.1f} ms (hub run), {bare_open.extra['send_lag_p99_ms']:.1f} ms (bare run)"
    )
    ok_ratio = ratio >= TARGET_RATIO
    ok_p99 = hub_open.p99_ms < TARGET_P99_MS and hub_open.errors == 0
    ok_errors = hub_res.errors == 0 and bare_res.errors == 0
    verdict = "PASS" if ok_ratio and ok_p99 and ok_errors else "FAIL"
    print(
        f"VERDICT {verdict}: throughput hub/bare = {ratio:.2f} (target >= {TARGET_RATIO}) "
        f"{'ok' if ok_ratio else 'MISSED'}; p99 at {args.rate:g}/s = {hub_open.p99_ms:.1f} ms "
        f"(target < {TARGET_P99_MS:g} ms) {'ok' if ok_p99 else 'MISSED'}"
        + ("" if ok_errors else f"; errors: hub {hub_res.errors}, bare {bare_res.errors}")
    )
    return verdict == "PASS"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--modules", type=int, default=50)
    p.add_argument("--protocol", choices=PROTOCOLS, default="mixed", help="module mix (default mixed)")
    p.add_argument("--connections", type=int, default=16, help="closed-loop connections (default 16)")
    p.add_argument("--duration", type=float, default=10.0, help="seconds per measured run (default 10)")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of discarded load before each run")
    p.add_argument("--rate", type=float, default=200.0, help="open-loop requests per second (default 200)")
    p.add_argument("--loadgen", choices=("auto", "wrk", "aiohttp"), default="auto")
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs, hub data)")
    args = p.parse_args()
    if args.keep:
        workdir = Path(tempfile.mkdtemp(prefix="ores-bench-api-"))
        print(f"work directory: {workdir}")
        ok = asyncio.run(run(args, workdir))
    else:
        with tempfile.TemporaryDirectory(prefix="ores-bench-api-") as tmp:
            ok = asyncio.run(run(args, Path(tmp)))
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
