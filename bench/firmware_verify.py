"""Benchmark of firmware verification: throughput of ``verify_file`` against plain ``hashlib.sha256``, and the
peak memory verification adds.

Run with ``python bench/firmware_verify.py``.  It writes a random 64 MiB image (``--size-mb``) and its signed manifest
into a temporary directory, then, in the same run and alternating (``--repeat`` times each, after one
discarded warm-up of each), times (a) plain ``hashlib.sha256`` over the file read the same way — unbuffered
``readinto`` of ``--chunk-kb`` (1024) KiB into one reused buffer, in the calling thread — and (b)
``firmware.verify.verify_file`` awaited from an asyncio event loop (the same reads and hash in a worker
thread, plus the size checks).  The throughput ratio is median (a) time / median (b) time; target >= 0.9.
Both read the file from the page cache (it was just written), so this measures CPU cost, not the disk.
Memory: ``tracemalloc``'s peak of Python allocations during one ``verify_manifest`` + ``verify_file`` in this
process, and the resident-set growth of the same verification in a fresh child process (Linux: the peak RSS
is reset through ``/proc/self/clear_refs`` just before, and read from ``VmHWM`` after; elsewhere the growth
of ``ru_maxrss``); target < 16 MB for both.  Prints a table and a verdict; exit status 0 on PASS, 1 on FAIL.
Figures depend on the machine; nothing here is a test.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

# Run as ``python bench/firmware_verify.py``, this file's directory comes first on sys.path and its name would hide
# the ``firmware`` package: put the repository root there instead.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402

from firmware.manifest import (  # noqa: E402
    Manifest,
    encode_signature,
    key_id,
    public_key_b64,
    public_key_from_b64,
    sign_manifest,
)
from firmware.verify import VendorKey, verify_file, verify_manifest  # noqa: E402

TARGET_RATIO = 0.9
TARGET_MEMORY_MB = 16.0
MB = 1024 * 1024
VENDOR = "Bench Power"
MODEL = "BENCH-1"


def make_release(workdir: Path, size_mb: int) -> tuple[Path, Path, Path, str]:
    """Write a random image, its manifest and signature; returns (image, manifest, sig, public key b64)."""
    key = Ed25519PrivateKey.generate()
    image = workdir / "fw.bin"
    digest = hashlib.sha256()
    with image.open("wb") as out:
        for _ in range(size_mb):
            block = os.urandom(MB)
            digest.update(block)
            out.write(block)
    manifest = Manifest.create(
        vendor=VENDOR,
        models=[MODEL],
        version="2.0.0",
        size=size_mb * MB,
        sha256=digest.hexdigest(),
        key_id=key_id(key.public_key()),
    )
    manifest_path = workdir / "fw.manifest.json"
    sig_path = workdir / "fw.manifest.json.sig"
    manifest_path.write_bytes(manifest.canonical_bytes())
    sig_path.write_text(encode_signature(sign_manifest(manifest, key)) + "\n")
    return image, manifest_path, sig_path, public_key_b64(key.public_key())


def plain_sha256(path: Path, chunk_size: int) -> str:
    """The baseline: unbuffered ``readinto`` of ``chunk_size`` into one reused buffer, hashed in place."""
    digest = hashlib.sha256()
    buffer = bytearray(chunk_size)
    view = memoryview(buffer)
    with path.open("rb", buffering=0) as file:
        while count := file.readinto(buffer):
            digest.update(view[:count])
    return digest.hexdigest()


def verify_release(manifest_path: Path, sig_path: Path, pubkey: str) -> Manifest:
    public_key = public_key_from_b64(pubkey)
    trusted = {key_id(public_key): VendorKey(VENDOR, public_key)}
    return verify_manifest(
        manifest_path.read_bytes(),
        sig_path.read_text(),
        trusted,
        model=MODEL,
        running_version="1.0.0",
        hub_version="0.1.0",
    )


async def throughput(
    image: Path, manifest: Manifest, chunk_size: int, repeat: int
) -> tuple[list[float], list[float]]:
    """Alternating timed runs (seconds) of the baseline and of ``verify_file``, after one warm-up each."""
    plain: list[float] = []
    verify: list[float] = []
    for run in range(repeat + 1):
        t0 = time.perf_counter()
        if plain_sha256(image, chunk_size) != manifest.sha256:
            raise RuntimeError("baseline hash differs from the manifest")
        t1 = time.perf_counter()
        await verify_file(image, manifest, chunk_size)
        t2 = time.perf_counter()
        if run:  # run 0 is the warm-up
            plain.append(t1 - t0)
            verify.append(t2 - t1)
    return plain, verify


async def traced_peak(image: Path, manifest_path: Path, sig_path: Path, pubkey: str, chunk_size: int) -> int:
    """Peak bytes of Python allocations (all threads) during one full verification, above the start."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        start, _ = tracemalloc.get_traced_memory()
        manifest = verify_release(manifest_path, sig_path, pubkey)
        await verify_file(image, manifest, chunk_size)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak - start


def rss_child(
    image: Path, manifest_path: Path, sig_path: Path, pubkey: str, chunk_size: int
) -> dict[str, Any]:
    """In a fresh process: how much the resident set grows during one full verification."""
    loop = asyncio.new_event_loop()

    async def verify() -> None:
        manifest = verify_release(manifest_path, sig_path, pubkey)
        await verify_file(image, manifest, chunk_size)

    try:
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (the peak RSS) to the current RSS
            before = _status_kb("VmRSS")
            loop.run_until_complete(verify())
            return {"method": "VmHWM after clear_refs", "delta_kb": _status_kb("VmHWM") - before}
        except OSError:
            before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            loop.run_until_complete(verify())
            after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            return {"method": "ru_maxrss growth (may under-count)", "delta_kb": after - before}
    finally:
        loop.run_until_complete(loop.shutdown_default_executor())
        loop.close()


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {field}")


def measure_rss(
    image: Path, manifest_path: Path, sig_path: Path, pubkey: str, chunk_size: int
) -> dict[str, Any]:
    argv = [sys.executable, str(Path(__file__).resolve()), "--rss-child",
            str(image), str(manifest_path), str(sig_path), pubkey, str(chunk_size)]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"RSS child failed ({proc.returncode}):\n{proc.stderr}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


async def run(args: argparse.Namespace, workdir: Path) -> bool:
    chunk_size = args.chunk_kb * 1024
    print(
        f"bench/firmware_verify.py: {args.size_mb} MiB image, {args.chunk_kb} KiB chunks, {args.repeat} timed runs "
        f"each (alternating, after a warm-up), on {os.cpu_count()} CPUs",
        flush=True,
    )
    image, manifest_path, sig_path, pubkey = make_release(workdir, args.size_mb)

    t0 = time.perf_counter()
    manifest = verify_release(manifest_path, sig_path, pubkey)
    manifest_ms = (time.perf_counter() - t0) * 1000

    plain, verify = await throughput(image, manifest, chunk_size, args.repeat)
    size_mb = args.size_mb * MB / 1e6
    plain_med, verify_med = statistics.median(plain), statistics.median(verify)
    ratio = plain_med / verify_med
    best_ratio = min(plain) / min(verify)

    traced = await traced_peak(image, manifest_path, sig_path, pubkey, chunk_size)
    rss = measure_rss(image, manifest_path, sig_path, pubkey, chunk_size)
    traced_mb = traced / MB
    rss_mb = rss["delta_kb"] / 1024

    print()
    print(
        table(
            [
                ["measure", "value", "target"],
                [
                    "plain hashlib.sha256 (median / best)",
                    f"{size_mb / plain_med:,.0f} / {size_mb / min(plain):,.0f} MB/s",
                    "-",
                ],
                [
                    "verify_file (median / best)",
                    f"{size_mb / verify_med:,.0f} / {size_mb / min(verify):,.0f} MB/s",
                    "-",
                ],
                [
                    "throughput verify_file / plain (median; best)",
                    f"{ratio:.3f}; {best_ratio:.3f}",
                    f">= {TARGET_RATIO:g}",
                ],
                ["verify_manifest (signature and checks)", f"{manifest_ms:.2f} ms", "-"],
                [
                    "peak Python allocations (tracemalloc)",
                    f"{traced_mb:.2f} MB",
                    f"< {TARGET_MEMORY_MB:g} MB",
                ],
                [
                    f"RSS growth in a fresh process ({rss['method']})",
                    f"{rss_mb:.2f} MB",
                    f"< {TARGET_MEMORY_MB:g} MB",
                ],
            ]
        )
    )
    ok_speed = ratio >= TARGET_RATIO
    memory_mb = max(traced_mb, rss_mb)
    ok_memory = memory_mb < TARGET_MEMORY_MB
    verdict = "PASS" if ok_speed and ok_memory else "FAIL"
    print(
        f"VERDICT {verdict}: throughput verify_file/plain = {ratio:.3f} (target >= {TARGET_RATIO:g}) "
        f"{'ok' if ok_speed else 'MISSED'}; memory added {memory_mb:.2f} MB (target < {TARGET_MEMORY_MB:g} MB) "
        f"{'ok' if ok_memory else 'MISSED'}"
    )
    return verdict == "PASS"


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--rss-child":
        image, manifest_path, sig_path, pubkey, chunk = sys.argv[2:7]
        result = rss_child(Path(image), Path(manifest_path), Path(sig_path), pubkey, int(chunk))
        print(json.dumps(result))
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--size-mb", type=int, default=64, help="image size in MiB (default 64)")
    p.add_argument("--chunk-kb", type=int, default=1024, help="read size in KiB (default 1024)")
    p.add_argument("--repeat", type=int, default=7, help="timed runs of each (default 7)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="ores-bench-firmware-") as tmp:
        ok = asyncio.run(run(args, Path(tmp)))
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
