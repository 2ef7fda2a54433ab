"""Benchmark of the hub's steady-state cost: CPU share and memory while polling 200 modules at 1 Hz.

Run with ``python bench/poll.py``.  It starts 200 simulated modules in their own process and the hub as its
own process (``ores-hub`` on a loopback port, fresh data directory, ``poll_interval_s`` 1.0), registers every
module through ``POST /device/register``, waits until they are online, lets the hub run for a warm-up, then
measures over a window (30 s by default) with psutil on the hub process: its CPU share in percent of one
core and its resident memory (RSS).  The achieved poll rate (the growth of the ``polls`` counters of
``GET /hub/communicate`` over the window, divided by the window) shows the hub really polled at 1 Hz, and the
offline count shows none was lost.  Targets: < 25 % of one core, < 120 MB RSS.  Figures depend on the
machine; nothing here is a test.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    PROTOCOLS,
    CpuMeter,
    client_session,
    hub_process,
    links,
    pair,
    register_all,
    sim_process,
    table,
    wait_online,
)

TARGET_CPU_PCT = 25.0
TARGET_RSS_MB = 120.0
MB = 1024 * 1024


async def run(args: argparse.Namespace, workdir: Path) -> bool:
    print(
        f"bench/poll.py: {args.modules} simulated modules ({args.protocol}) polled every {args.interval:g} s; "
        f"warm-up {args.warmup:g} s, window {args.window:g} s, on {psutil.cpu_count()} CPUs",
        flush=True,
    )
    settings = {"poll_interval_s": args.interval}
    with (
        sim_process(args.modules, args.protocol, workdir) as (sim, modules),
        hub_process(workdir / "hub", settings) as hub,
    ):
        hub_ps = psutil.Process(hub.child.pid)
        async with client_session() as session:
            token = await pair(session, hub.url, hub.pairing_code)
            started = time.monotonic()
            errors = await register_all(session, hub.url, token, [m["address"] for m in modules])
            if errors:
                raise RuntimeError("registration failed:\n" + "\n".join(errors[:10]))
            online = await wait_online(session, hub.url, token, len(modules), timeout_s=60)
            print(
                f"  {len(modules)} registered and {online} online in {time.monotonic() - started:.1f} s; "
                f"warming up {args.warmup:g} s",
                flush=True,
            )
            await asyncio.sleep(args.warmup)

            meter = CpuMeter({"hub": hub.child.pid, "simulator": sim.pid})
            before = {link["device_id"]: link for link in await links(session, hub.url, token)}
            t0 = time.monotonic()
            meter.start()
            rss: list[int] = []
            while (elapsed := time.monotonic() - t0) < args.window:
                rss.append(hub_ps.memory_info().rss)
                await asyncio.sleep(min(1.0, max(0.0, args.window - elapsed)))
            cpu = meter.stop()
            after = await links(session, hub.url, token)
            window = time.monotonic() - t0
            rss.append(hub_ps.memory_info().rss)
            threads = hub_ps.num_threads()
            fds = hub_ps.num_fds()

    polls = sum(link["polls"] - before.get(link["device_id"], {"polls": 0})["polls"] for link in after)
    failures = sum(
        link["failures"] - before.get(link["device_id"], {"failures": 0})["failures"] for link in after
    )
    offline = sum(1 for link in after if not link["online"])
    latencies = [link["avg_latency_ms"] for link in after if link["avg_latency_ms"] is not None]
    expected_rate = len(modules) / args.interval
    rate = polls / window
    rss_end, rss_max = rss[-1] / MB, max(rss) / MB

    print()
    print(
        table(
            ["measure", "value", "target"],
            [
                ["hub CPU (% of one core)", f"{cpu['hub']:.1f} %", f"< {TARGET_CPU_PCT:g} %"],
                ["hub RSS at end / max", f"{rss_end:.1f} / {rss_max:.1f} MB", f"< {TARGET_RSS_MB:g} MB"],
                ["poll rate achieved", f"{rate:.1f} polls/s", f"{expected_rate:g} polls/s"],
                ["polls / failures in window", f"{polls:,} / {failures:,}", "- / 0"],
                ["modules offline at end", f"{offline} of {len(after)}", "0"],
                ["mean poll latency", f"{statistics.fmean(latencies):.1f} ms" if latencies else "-", "-"],
                ["hub threads / open fds", f"{threads} / {fds}", "-"],
                ["simulator CPU (% of one core)", f"{cpu['simulator']:.1f} %", "-"],
            ],
        )
    )
    ok_cpu = cpu["hub"] < TARGET_CPU_PCT
    ok_rss = rss_max < TARGET_RSS_MB
    ok_rate = rate >= 0.95 * expected_rate and offline == 0
    verdict = "PASS" if ok_cpu and ok_rss and ok_rate else "FAIL"
    print(
        f"VERDICT {verdict}: CPU {cpu['hub']:.1f} % (target < {TARGET_CPU_PCT:g} %) {'ok' if ok_cpu else 'MISSED'}; "
        f"RSS max {rss_max:.1f} MB (target < {TARGET_RSS_MB:g} MB) {'ok' if ok_rss else 'MISSED'}; "
        f"{rate:.1f} of {expected_rate:g} polls/s, {offline} offline {'ok' if ok_rate else 'MISSED'}"
    )
    return verdict == "PASS"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--modules", type=int, default=200)
    p.add_argument("--protocol", choices=PROTOCOLS, default="mixed", help="module mix (default mixed)")
    p.add_argument("--interval", type=float, default=1.0, help="hub poll interval, s (default 1)")
    p.add_argument("--warmup", type=float, default=10.0, help="seconds of polling before measuring")
    p.add_argument("--window", type=float, default=30.0, help="measured seconds (default 30)")
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs, hub data)")
    args = p.parse_args()
    if args.keep:
        workdir = Path(tempfile.mkdtemp(prefix="ores-bench-poll-"))
        print(f"work directory: {workdir}")
        ok = asyncio.run(run(args, workdir))
    else:
        with tempfile.TemporaryDirectory(prefix="ores-bench-poll-") as tmp:
            ok = asyncio.run(run(args, Path(tmp)))
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
