"""Run `znn forward JOB.cfg` on a SLURM or PBS cluster through dask-jobqueue.

    pip install dask-jobqueue                     # once; not a dependency of znn
    cp dask-config/jobqueue.yaml ~/.config/dask/  # then edit cores, memory, queue, account, the venv line
    python jobqueue_forward.py slurm JOB.cfg --jobs 4 [-- more znn forward options, e.g. --memory 3GB]

Run it where batch jobs can be submitted and reached from (a login node, or inside a small batch job of its own).
It starts a dask scheduler in this process, submits ``--jobs`` batch jobs (each starts the workers that
jobqueue.yaml describes), waits for ``--min-workers`` of them, then runs ``znn forward JOB.cfg --scheduler
<address>``. Workers that join later take blocks too; a worker lost with its node has its blocks recomputed on the
others, and an interrupted run resumes (rerun the same command: finished blocks are skipped). Input volumes and
the output_prefix must be on a file system every node sees, at the same path.
"""

from __future__ import annotations

import argparse
import subprocess
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("system", choices=["slurm", "pbs"])
    parser.add_argument("job", help="the .cfg job file")
    parser.add_argument("--jobs", type=int, default=2, help="batch jobs to submit (default 2)")
    parser.add_argument("--min-workers", type=int, default=1, help="start once this many workers joined")
    parser.add_argument("--wait", type=float, default=3600, help="seconds to wait for them (default 3600)")
    parser.add_argument("forward_args", nargs="*", help="after --: options for znn forward")
    args = parser.parse_args(argv)

    from dask_jobqueue import PBSCluster, SLURMCluster  # pip install dask-jobqueue
    from distributed import Client

    cluster_class = SLURMCluster if args.system == "slurm" else PBSCluster
    with cluster_class() as cluster, Client(cluster) as client:  # settings from ~/.config/dask/jobqueue.yaml
        print(cluster.job_script(), file=sys.stderr)
        cluster.scale(jobs=args.jobs)
        print(f"scheduler {cluster.scheduler_address}, dashboard {client.dashboard_link}; waiting for "
              f"{args.min_workers} worker(s)", file=sys.stderr, flush=True)
        client.wait_for_workers(args.min_workers, timeout=args.wait)
        command = ["znn", "forward", args.job, "--scheduler", cluster.scheduler_address, *args.forward_args]
        print(" ".join(command), file=sys.stderr, flush=True)
        return subprocess.call(command)


if __name__ == "__main__":
    raise SystemExit(main())
