"""Threads are chosen from the cores a process may use and the processes beside it, never inherited."""

import dataclasses

import pytest
import torch

from sdtune import train_lora
from sdtune import threads
from sdtune.threads import cgroup_cpu_quota, choose_threads, usable_cores


@pytest.fixture
def machine(monkeypatch, tmp_path):
    """A machine of 8 cores, no cgroup quota, no launcher variables; tests change what they need."""
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(threads, "busy_cores_of_others", lambda: 0.0)  # a quiet machine
    return tmp_path  # an empty cgroup root


def test_affinity_sets_the_count_not_the_machines_core_count(machine, monkeypatch):
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {2, 3})  # e.g. taskset -c 2,3
    monkeypatch.setattr(threads.os, "cpu_count", lambda: 64)
    assert choose_threads(cgroup_root=machine)[0] == 2


@pytest.mark.parametrize("cpu_max, expected", [("max 100000", 8), ("300000 100000", 3), ("150000 100000", 2)])
def test_a_cgroup_v2_quota_caps_the_count(machine, cpu_max, expected):
    (machine / "cpu.max").write_text(cpu_max + "\n")
    assert usable_cores(machine) == expected


def test_a_cgroup_v1_quota_caps_the_count(machine):
    (machine / "cpu").mkdir()
    (machine / "cpu" / "cpu.cfs_quota_us").write_text("200000\n")
    (machine / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_quota(machine) == 2.0 and usable_cores(machine) == 2
    (machine / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")  # unlimited
    assert usable_cores(machine) == 8


@pytest.mark.parametrize("processes, expected", [("1", 8), ("2", 4), ("3", 2), ("16", 1)])
def test_the_cores_are_divided_among_the_processes_of_the_machine(machine, monkeypatch, processes, expected):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", processes)  # set by accelerate launch / torchrun
    threads_per_process = choose_threads(cgroup_root=machine)[0]
    assert threads_per_process == expected and threads_per_process * int(processes) <= max(8, int(processes))


def test_num_threads_wins_then_omp_num_threads(machine, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert choose_threads(cgroup_root=machine) == (3, "OMP_NUM_THREADS")
    assert choose_threads(5, cgroup_root=machine) == (5, "--num_threads")


def test_num_threads_reaches_torch_in_training(lora_config, monkeypatch):
    seen = []
    real = threads.set_torch_threads
    monkeypatch.setattr("sdtune.loop.set_torch_threads", lambda n: seen.append(real(n)) or seen[-1])
    before = torch.get_num_threads()
    wanted = 2 if before == 1 else 1  # not what torch has already
    try:
        train_lora(dataclasses.replace(lora_config, num_threads=wanted, max_train_steps=1))
        assert seen == [wanted] and torch.get_num_threads() == wanted
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("cores, busy, expected", [(2, 1.0, 1), (2, 0.3, 2), (8, 1.6, 6), (2, 3.0, 1), (2, None, 2)])
def test_a_single_process_leaves_the_cores_other_work_keeps_busy(machine, monkeypatch, cores, busy, expected):
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: set(range(cores)))
    monkeypatch.setattr(threads, "busy_cores_of_others", lambda: busy)  # None: not measurable (not Linux)
    count, why = choose_threads(cgroup_root=machine)
    assert count == expected
    assert ("kept busy by other work" in why) == (expected < cores)


def test_a_launch_divides_the_cores_without_measuring_load(machine, monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(threads, "busy_cores_of_others", lambda: pytest.fail("measured"))
    assert choose_threads(cgroup_root=machine)[0] == 4


def test_busy_cores_are_read_from_proc_stat_for_this_process_cpus_minus_its_own_time(monkeypatch, tmp_path):
    """cpu0 and cpu1 are ours; cpu2 is not. Over 1 s, cpu0 is busy 1 s, cpu1 idle, cpu2 busy (not counted)."""
    stat = tmp_path / "stat"
    tick = threads.os.sysconf("SC_CLK_TCK")

    def write(busy_ticks):  # user nice system idle iowait irq softirq steal
        stat.write_text(f"cpu  0 0 0 0 0 0 0 0\ncpu0 {busy_ticks} 0 0 100 5 0 0 0\ncpu1 0 0 0 100 0 0 0 0\n"
                        f"cpu2 {busy_ticks} 0 0 0 0 0 0 0\n")

    clock = iter([0.0, 1.0])
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(threads.time, "perf_counter", lambda: next(clock))
    monkeypatch.setattr(threads.time, "sleep", lambda seconds: write(tick))  # one second of cpu0's ticks
    write(0)
    assert threads.busy_cores_of_others(proc_stat=stat) == pytest.approx(1.0, abs=0.05)
