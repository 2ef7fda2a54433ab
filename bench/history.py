"""Micro-benchmark for hub.history: the cost of ``record()`` on the event loop and the writer's throughput.

Run with ``python bench/history.py [--devices N] [--seconds S]``.  It records S seconds of 1 Hz samples for
N devices (timestamps are synthetic, so it runs as fast as the writer allows), reports the mean time of a
``record()`` call, the time until everything is committed and a few query timings.  Nothing here is a test:
numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from devices.model import Telemetry
from hub.history import History


async def run(devices: int, seconds: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        store = History(Path(tmp) / "bench.sqlite3", retention_interval_s=None)
        await store.start()
        base = time.time() - seconds
        ids = [f"bench_{i:03d}" for i in range(devices)]
        total = devices * seconds
        try:
            started = time.perf_counter()
            for second in range(seconds):
                ts = base + second
                for index, device_id in enumerate(ids):
                    store.record(
                        device_id,
                        Telemetry(
                            ts=ts,
                            power_w=100.0 + index,
                            energy_out_wh=second * 0.03,
                            voltage_v=230.0,
                            soc_pct=50.0,
                        ),
                    )
            enqueued = time.perf_counter()
            await store.flush()
            committed = time.perf_counter()
            print(f"{total} samples: record() {(enqueued - started) / total * 1e6:.2f} µs each on the loop")
            elapsed = committed - started
            print(f"committed after {elapsed:.2f} s ({total / elapsed:,.0f} samples/s)")
            for resolution in ("raw", "1m", "15m"):
                t = time.perf_counter()
                rows = await store.query(ids[0], base, base + seconds, resolution)  # type: ignore[arg-type]
                print(f"query {resolution}: {len(rows)} rows in {(time.perf_counter() - t) * 1000:.1f} ms")
            t = time.perf_counter()
            energy = await store.energy(ids[0], base, base + seconds)
            print(f"energy: {energy['energy_out_wh']:.2f} Wh in {(time.perf_counter() - t) * 1000:.1f} ms")
        finally:
            await store.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--devices", type=int, default=50)
    parser.add_argument("--seconds", type=int, default=3600)
    args = parser.parse_args()
    asyncio.run(run(args.devices, args.seconds))


if __name__ == "__main__":
    main()
