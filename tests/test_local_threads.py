"""The local backend's thread count follows the cores other work leaves free now, not the lagging load average."""
from __future__ import annotations

import subprocess
import sys

from datagen.backends import local


def test_a_busy_process_counts_as_a_busy_core():
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        assert local.busy_cores(0.5) >= 0.5  # the spinner holds a core (more if the machine is busier still)
    finally:
        spinner.kill()
        spinner.wait()


def test_threads_are_the_free_cores_at_least_one(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(local.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    for busy, threads in [(0.0, 4), (1.2, 3), (3.6, 1), (9.0, 1)]:
        monkeypatch.setattr(local, "busy_cores", lambda busy=busy: busy)
        assert local.intra_op_threads() == threads
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert local.intra_op_threads() == 3


def test_without_proc_stat_the_load_average_stands_in(monkeypatch):
    import builtins

    real_open = builtins.open

    def no_proc(path, *args, **kwargs):
        if str(path) == "/proc/stat":
            raise OSError("no /proc here")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", no_proc)
    monkeypatch.setattr(local.os, "getloadavg", lambda: (1.5, 1.0, 0.5))
    assert local.busy_cores(0.01) == 1.5
