"""Free memory and live processes, as the checks before large allocations see them."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from speler.errors import DataFormatError
from speler.system import available_bytes, check_fits, free_cores, pid_alive


def test_available_memory_is_known_and_checked_before_allocating():
    free = available_bytes()
    assert free is not None and free > 0  # Linux: MemAvailable at least
    check_fits(1 << 20, what="a small array", where="here", error=DataFormatError)
    with pytest.raises(DataFormatError, match=r"^big\.npz: a 10\^15-byte tensor would take"
                                              r" 931322\.57 GiB, but only [\d.]+ GiB of memory"
                                              r" is free; try less$"):
        check_fits(10**15, what="a 10^15-byte tensor", where="big.npz", error=DataFormatError,
                   hint="; try less")


def test_pid_alive():
    assert pid_alive(os.getpid())
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                           capture_output=True, text=True, check=True)
    assert not pid_alive(int(child.stdout))
    assert not pid_alive(0) and not pid_alive(-5)


def test_free_cores_counts_the_other_runnable_tasks(tmp_path):
    cores = len(os.sched_getaffinity(0))
    fake = tmp_path / "loadavg"
    fake.write_text("0.50 0.40 0.30 1/321 4242\n")  # only the reader itself is running
    assert free_cores(loadavg=str(fake), samples=1) == cores
    fake.write_text(f"3.00 2.00 1.00 {cores + 5}/321 4242\n")  # more runnable tasks than cores
    assert free_cores(loadavg=str(fake), samples=3, interval=0) == 1
    if cores >= 2:
        fake.write_text("1.00 1.00 1.00 2/321 4242\n")  # one other task: one core left for us
        assert free_cores(loadavg=str(fake), samples=1) == cores - 1
    assert free_cores(loadavg=str(tmp_path / "missing")) == cores  # not Linux: every core
