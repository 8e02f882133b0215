"""Peak memory of a `dynface restore` run (the pipeline process + its Ray workers) against archive size.

For each size, a fresh `dynface restore` process restores that many aligned synthetic faces while
this script samples the memory of its whole process tree (the driver, the Prefect ephemeral
server it starts, Ray's GCS/raylet/workers and the sampling actors) every `--interval` seconds.
Reported per size: wall time, peak summed RSS and PSS of the tree (PSS splits shared pages, e.g.
torch's libraries and Ray's object store, between the processes that map them, so it does not
double count), the driver's own peak RSS and the largest single process. The target is flat: the
pipeline holds a shard or a wave at a time, never the archive.

Fast sampler options by default (method full, respacing ddim2: every stage runs, sampling is short),
so 100 vs 1,000 images finishes in minutes on CPU; change them with --option.

    python benchmarks/pipeline_memory.py                      # 100 and 1000 images
    python benchmarks/pipeline_memory.py --sizes 100 300
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from app.cli import OFFLINE_ENV
from dynface.packs.manifest import read_manifest
from dynface.paths import REPO_ROOT

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pipeline_overhead import resolve_pack, write_faces  # noqa: E402

MIB = 1 << 20
DEFAULT_OPTIONS = ("respacing=ddim2",)


@dataclass(frozen=True)
class Peak:
    seconds: float
    tree_rss: int
    tree_pss: int
    driver_rss: int
    largest_rss: int
    largest_name: str
    n_processes: int


def tree(proc: psutil.Process) -> list[psutil.Process]:
    try:
        return [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def sample_tree(proc: psutil.Process) -> tuple[int, int, int, int, str, int]:
    """(summed RSS, summed PSS, driver RSS, largest RSS, its name, processes) of the tree now."""
    rss = pss = driver = largest = 0
    name = ""
    procs = tree(proc)
    for p in procs:
        try:
            info = p.memory_full_info()
            pname = " ".join(p.cmdline()[:2])[-60:] or p.name()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        rss += info.rss
        pss += getattr(info, "pss", info.rss)
        if p.pid == proc.pid:
            driver = info.rss
        if info.rss > largest:
            largest, name = info.rss, pname
    return rss, pss, driver, largest, name, len(procs)


def measure(cmd: list[str], env: dict[str, str], interval: float, log: Path) -> Peak:
    """Run `cmd`, polling its process tree until it exits; the peaks of each quantity."""
    t0 = time.perf_counter()
    with open(log, "w") as out:
        child = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO_ROOT)
        proc = psutil.Process(child.pid)
        best = [0, 0, 0, 0, "", 0]
        while child.poll() is None:
            rss, pss, driver, largest, name, n = sample_tree(proc)
            best[0], best[1], best[2] = max(best[0], rss), max(best[1], pss), max(best[2], driver)
            if largest > best[3]:
                best[3], best[4] = largest, name
            best[5] = max(best[5], n)
            time.sleep(interval)
    seconds = time.perf_counter() - t0
    if child.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd)} exited with {child.returncode}; see {log}:\n{log.read_text()[-2000:]}"
        )
    return Peak(seconds, best[0], best[1], best[2], best[3], best[4], best[5])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000], help="images per run")
    parser.add_argument("--pack", default=None, help="default: starter if present, else a random 32-px pack")
    parser.add_argument("--option", action="append", default=None, metavar="KEY=VALUE")
    parser.add_argument("--shard-size", type=int, default=64)
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between samples")
    args = parser.parse_args(argv)
    options = list(args.option or DEFAULT_OPTIONS)
    env = {**os.environ, **OFFLINE_ENV, "PREFECT_LOGGING_LEVEL": "WARNING"}
    env.pop("PREFECT_API_URL", None)  # each run starts its own ephemeral Prefect, as a CLI user's does
    env.pop("RAY_ADDRESS", None)
    rows = []
    with tempfile.TemporaryDirectory(prefix="dynface-mem-") as tmp:
        scratch = Path(tmp)
        pack, pack_text = resolve_pack(args.pack, scratch)
        resolution = read_manifest(pack).resolution
        for n in args.sizes:
            src = scratch / f"src{n}"
            write_faces(src, n, resolution, seed=n)
            cmd = [
                sys.executable, "-m", "app.cli", "restore", str(src), str(scratch / f"out{n}"),
                "--pack", pack, "--aligned", "--shard-size", str(args.shard_size), "--device", "cpu",
            ]  # fmt: skip
            for opt in options:
                cmd += ["--option", opt]
            rows.append((n, measure(cmd, env, args.interval, scratch / f"run{n}.log")))

    print(
        f"machine: {platform.node()} ({platform.machine()}), {os.cpu_count()} CPUs, "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB; device cpu"
    )
    print(
        f"settings: pack {pack_text} ({resolution} px), aligned {resolution}-px PNG inputs, "
        f"shard_size {args.shard_size}, wave_shards 4, options {' '.join(options)}; "
        f"`dynface restore` in a fresh process per size, tree sampled every {args.interval} s"
    )
    header = (
        "images   wall s  faces/s  tree RSS MiB  tree PSS MiB  driver RSS MiB  largest RSS MiB  processes"
    )
    print(header)
    for n, p in rows:
        print(
            f"{n:6d} {p.seconds:8.1f} {n / p.seconds:8.2f} {p.tree_rss / MIB:13.0f} {p.tree_pss / MIB:13.0f} "
            f"{p.driver_rss / MIB:15.0f} {p.largest_rss / MIB:16.0f} {p.n_processes:10d}"
        )
    (n0, first), (n1, last) = rows[0], rows[-1]
    print(
        f"{n1} vs {n0} images: tree PSS x{last.tree_pss / first.tree_pss:.2f}, "
        f"driver RSS x{last.driver_rss / first.driver_rss:.2f} (flat = 1.00)"
    )
    print(f"largest process at {n1} images: {last.largest_name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
