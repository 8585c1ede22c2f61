"""How many CPU threads torch uses in each process: chosen from the cores this process may use, not inherited.

torch's default is one OpenMP thread per core of the machine, whatever else runs. Two processes of a
multi-process CPU launch then each spin on every core, and so does a run beside other CPU-bound
work: a 30-step LoRA run on a shared 2-core machine took 56 s with torch's default and 12 s with one
thread (21x per step). So sdtune counts the cores this process may actually use (its CPU affinity
and its cgroup's CPU quota, not ``os.cpu_count()``), divides them among the processes of this
machine (``LOCAL_WORLD_SIZE``, set by accelerate and torchrun), and tells torch.

A single process also leaves out the cores other work keeps busy when it starts (measured over a
quarter of a second from /proc/stat, minus this process's own time): on the toy base beside one
busy process, two threads ran 3.2 steps/s and one thread 7.6, against 9.4 and 8.4 on the quiet
machine (benchmarks/README.md, threads_under_load.py). The count is chosen once, at the start, and
logged: a thread count that changed during a run would change its results' bits.

Order of precedence: ``--num_threads``; then ``OMP_NUM_THREADS`` when the user set it (an explicit
choice, e.g. by a job scheduler); then the count above.
"""

from __future__ import annotations

import logging
import math
import os
import time
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


def busy_cores_of_others(interval: float = 0.25, proc_stat: Path = Path("/proc/stat")) -> float | None:
    """How many of this process's CPUs other work kept busy over ``interval`` seconds (None where unknown).

    From the per-CPU counters of /proc/stat, for the CPUs of this process's affinity only, minus
    this process's own CPU time in the same window.
    """
    try:
        cpus = {f"cpu{i}" for i in os.sched_getaffinity(0)}
    except AttributeError:  # not Linux
        return None

    def busy_seconds() -> float | None:
        try:
            lines = proc_stat.read_text().splitlines()
        except OSError:
            return None
        ticks = 0
        for line in lines:
            name, *values = line.split()
            if name in cpus:
                counts = [int(v) for v in values[:8]]  # user nice system idle iowait irq softirq steal
                ticks += sum(counts) - counts[3] - counts[4]
        return ticks / os.sysconf("SC_CLK_TCK")

    start, own_start, wall_start = busy_seconds(), sum(os.times()[:2]), time.perf_counter()
    time.sleep(interval)
    end, own_end, wall_end = busy_seconds(), sum(os.times()[:2]), time.perf_counter()
    if start is None or end is None:
        return None
    return max(0.0, ((end - start) - (own_end - own_start)) / (wall_end - wall_start))


def choose_threads(num_threads: int | None = None, cgroup_root: Path = CGROUP_ROOT) -> tuple[int, str]:
    """The thread count for this process, and where it came from (for the log).

    Other work's load is measured for a single process only: the ranks of a multi-process launch
    keep each other busy at the start.
    """
    if num_threads:
        return num_threads, "--num_threads"
    from_env = os.environ.get("OMP_NUM_THREADS", "")
    if from_env.isdigit() and int(from_env) > 0:
        return int(from_env), "OMP_NUM_THREADS"
    cores, processes = usable_cores(cgroup_root), local_processes()
    threads, why = max(1, cores // processes), f"{cores} usable core(s) / {processes} process(es) on this machine"
    if processes == 1 and cores > 1:
        busy = busy_cores_of_others()
        taken = int(busy + 0.5) if busy is not None else 0  # a core at least half busy is not ours
        if taken:
            threads = max(1, cores - taken)
            why = f"{cores} usable core(s), {busy:.1f} kept busy by other work at the start; --num_threads to choose"
    return threads, why


def set_torch_threads(num_threads: int | None = None) -> int:
    """Choose and apply torch's intra-op thread count; return it."""
    import torch

    threads, why = choose_threads(num_threads)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    logger.info("using %d CPU thread(s) per process (%s)", threads, why)
    return threads
