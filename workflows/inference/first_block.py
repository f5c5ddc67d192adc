"""Seconds from the start of `znn forward` to its first finished block, with the FFTW wisdom cache off and on.

    python first_block.py --net n337 --side 16 --rounds 4

makes an example in a temporary folder (the bundled network with random weights, a random uint8 volume of
``--side``^3 voxels, a job with output blocks of ``--outsz``, conv modes fft), runs `znn forward` once to fill a wisdom
cache of its own (never the user's: ``ZNN_CACHE_DIR`` points into the folder), then ``--rounds`` times a run with
``ZNN_FFTW_WISDOM=off`` (FFTW measures every plan again) and one with the cache (FFTW plans from it), each in a fresh
process, and prints each run's time to its first finished block (the mtime of the block's done marker) and the total,
and the medians. FFTW plans with ``ZNN_FFTW_PLANNER`` (default FFTW_MEASURE).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

JOB = """[parameters]
fnet_spec = {net}.znn
fdata_spec = data.spec
forward_net = {net}.h5
forward_range = 1
forward_outsz = {outsz},{outsz},{outsz}
forward_conv_mode = fft
output_prefix = out/run
output_format = zarr
is_bd_mirror = yes
out_type = affinity
num_threads = {threads}
scheduler = threads
"""
DATA = "[image1]\nfnames = volume.zarr\npp_types = standard3D\n\n[sample1]\ninput = 1\n"


def make_example(folder: Path, net: str, side: int, outsz: int, threads: int) -> Path:
    """The network, random weights (seed 1), a random volume and the job in ``folder``; the job file."""
    import numpy as np

    from znn.io.bundled import bundled_file
    from znn.io.checkpoint import save_checkpoint
    from znn.io.netfile import load_network
    from znn.io.volume import write_volume
    from znn.network import Network

    shutil.copy(bundled_file("inference", f"{net}.znn"), folder / f"{net}.znn")
    save_checkpoint(folder / f"{net}.h5", Network.initialise(load_network(folder / f"{net}.znn"), seed=1))
    volume = np.random.default_rng(0).integers(0, 256, (side, side, side), dtype=np.uint8)
    write_volume(folder / "volume.zarr", volume, chunks=(side, side, side))
    (folder / "data.spec").write_text(DATA)
    job = folder / "job.cfg"
    job.write_text(JOB.format(net=net, outsz=outsz, threads=threads))
    return job


def run(job: Path, wisdom: str) -> tuple[float, float]:
    """One `znn forward` in a fresh process: (seconds to the first finished block, seconds in all)."""
    env = {**os.environ, "ZNN_CACHE_DIR": str(job.parent / "cache"), "ZNN_FFTW_WISDOM": wisdom}
    shutil.rmtree(job.parent / "out", ignore_errors=True)
    t0 = time.time()
    done = subprocess.run([sys.executable, "-m", "znn.cli", "forward", str(job), "--fresh", "--quiet"], env=env,
                          cwd=job.parent, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"znn forward failed:\n{done.stderr}")
    total = time.time() - t0
    marks = [p.stat().st_mtime for p in (job.parent / "out").glob("*.zarr/znn-manifest/done/*")]
    return min(marks) - t0, total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--net", default="n337", help="bundled network: n337, n726 or tiny3d (default n337)")
    parser.add_argument("--side", type=int, default=16, help="volume side in voxels (default 16)")
    parser.add_argument("--outsz", type=int, default=16, help="output block side (default 16)")
    parser.add_argument("--threads", type=int, default=0, help="num_threads of the job (default 0: every core)")
    parser.add_argument("--rounds", type=int, default=3, help="runs with the cache off and on (default 3 each)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="znn-first-block-") as tmp:
        job = make_example(Path(tmp), args.net, args.side, args.outsz, args.threads)
        print("first run, cache empty: first block %.1f s, total %.1f s" % run(job, "on"), flush=True)
        times: dict[str, list[tuple[float, float]]] = {"off": [], "on": []}
        for _ in range(args.rounds):
            for mode in ("off", "on"):
                times[mode].append(run(job, mode))
                print(f"cache {mode:>3}: first block {times[mode][-1][0]:.1f} s, total {times[mode][-1][1]:.1f} s",
                      flush=True)
        for mode, found in times.items():
            first, total = (statistics.median(t[i] for t in found) for i in (0, 1))
            print(f"cache {mode:>3}, median of {len(found)}: first block {first:.1f} s, total {total:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
