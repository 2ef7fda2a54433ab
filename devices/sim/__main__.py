"""Run simulated modules in their own process: ``python -m devices.sim --modules 200``.

Prints one JSON line per module (``{"address": ..., "kind": ..., "device_id": ...}``), then ``READY``, and
serves until stdin closes or it is terminated.  The benchmarks use it to keep the simulator's CPU out of the
hub's process.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys

from devices.sim.base import SimulatedModule
from devices.sim.home import serve_modules
from devices.sim.physics import build_demo_home


async def _main(n: int, speedup: float) -> None:
    modules: list[SimulatedModule] = []
    seed = 1
    while len(modules) < n:
        home = build_demo_home(speedup=speedup, seed=seed)
        modules.extend(home.modules[: n - len(modules)])
        seed += 1
    servers = await serve_modules(modules)
    for server in servers:
        info = server.module.info
        print(
            json.dumps({"address": str(server.address), "kind": info.kind.value, "device_id": info.device_id})
        )
    print("READY", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_reader(sys.stdin.fileno(), lambda: stop.set() if not os.read(sys.stdin.fileno(), 4096) else None)
    try:
        await stop.wait()
    finally:
        await asyncio.gather(*(s.stop() for s in servers), return_exceptions=True)


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m devices.sim")
    p.add_argument("--modules", type=int, default=8)
    p.add_argument("--speedup", type=float, default=1.0)
    args = p.parse_args()
    asyncio.run(_main(args.modules, args.speedup))


if __name__ == "__main__":
    main()
