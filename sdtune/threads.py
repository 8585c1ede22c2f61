"""How many CPU threads torch uses in each process: chosen from the cores this process may use, not inherited.

torch's default is one OpenMP thread per core of the machine, whatever else runs. Two processes of a
multi-process CPU launch then each spin on every core, and so does a run beside other CPU-bound
work: a 30-step LoRA run on a shared 2-core machine took 56 s with torch's default and 12 s with one
thread (21x per step). So sdtune counts the cores this process may actually use (its CPU affinity
and its cgroup's CPU quota, not ``os.cpu_count()``), divides them among the processes of this
machine (``LOCAL_WORLD_SIZE``, set by accelerate and torchrun), and tells torch.

Order of precedence: ``--num_threads``; then ``OMP_NUM_THREADS`` when the user set it (an explicit
choice, e.g. by a job scheduler); then the count above.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

logger = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")


def usable_cores(cgroup_root: Path = CGROUP_ROOT) -> int:
    """Cores this process may run on: its affinity, capped by its cgroup's CPU quota (rounded up)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    quota = cgroup_cpu_quota(cgroup_root)
    return max(1, min(cores, math.ceil(quota)) if quota else cores)


def cgroup_cpu_quota(root: Path = CGROUP_ROOT) -> float | None:
    """The CPU quota in cores (cgroup v2 ``cpu.max`` or v1 ``cpu.cfs_quota_us``), None when unlimited or unknown."""
    try:
        v2 = root / "cpu.max"
        if v2.is_file():
            quota, period = v2.read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        v1 = root / "cpu" / "cpu.cfs_quota_us"
        if v1.is_file():
            quota = int(v1.read_text())
            return None if quota <= 0 else quota / int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        pass
    return None


def local_processes() -> int:
    """Processes of this run on this machine (1 outside a multi-process launch)."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def choose_threads(num_threads: int | None = None, cgroup_root: Path = CGROUP_ROOT) -> tuple[int, str]:
    """The thread count for this process, and where it came from (for the log)."""
    if num_threads:
        return num_threads, "--num_threads"
    from_env = os.environ.get("OMP_NUM_THREADS", "")
    if from_env.isdigit() and int(from_env) > 0:
        return int(from_env), "OMP_NUM_THREADS"
    cores, processes = usable_cores(cgroup_root), local_processes()
    return max(1, cores // processes), f"{cores} usable core(s) / {processes} process(es) on this machine"


def set_torch_threads(num_threads: int | None = None) -> int:
    """Choose and apply torch's intra-op thread count; return it."""
    import torch

    threads, why = choose_threads(num_threads)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    logger.info("using %d CPU thread(s) per process (%s)", threads, why)
    return threads
