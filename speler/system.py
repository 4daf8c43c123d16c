"""What the machine offers: memory still free, cores not busy, and whether a process is alive.

Memory is asked before large allocations: work that cannot fit is refused up front with a message
saying how much it needs and how much is free, instead of a MemoryError halfway through (or the
kernel's OOM killer). The figure is the lowest of: the kernel's ``MemAvailable``, the cgroup's
limit minus its usage (containers), and ``RLIMIT_AS`` minus this process's address space. Where
none can be read (not Linux), nothing is refused.
"""

from __future__ import annotations

import contextlib
import os
import resource
import socket
import time
from pathlib import Path

from speler.errors import SpelerError

#: Share of the available memory one piece of work may plan to use.
USABLE_SHARE = 0.9


def _read_int(path: str) -> int | None:
    try:
        text = Path(path).read_text().strip()
    except (OSError, UnicodeError):
        return None
    return int(text) if text.isdigit() else None


def _meminfo(key: str, path: str) -> int | None:
    """A ``kB`` field of a /proc status file, in bytes."""
    try:
        with open(path) as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def available_bytes() -> int | None:
    """Bytes this process can still allocate (see the module docstring); None if unknown."""
    found: list[int] = []
    avail = _meminfo("MemAvailable", "/proc/meminfo")
    if avail is not None:
        found.append(avail)
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        limit, usage = _read_int(limit_file), _read_int(usage_file)
        if limit is not None and usage is not None and limit < 1 << 60:
            found.append(max(0, limit - usage))
            break
    try:
        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    except (OSError, ValueError):
        soft = resource.RLIM_INFINITY
    if soft != resource.RLIM_INFINITY:
        used = _meminfo("VmSize", f"/proc/{os.getpid()}/status")
        if used is not None:
            found.append(max(0, soft - used))
    return min(found) if found else None


def check_fits(nbytes: int, *, what: str, where: object, error: type[SpelerError],
               hint: str = "") -> None:
    """Raise ``error("<where>: <what> would take X GiB, only Y GiB of memory is free<hint>")`` when
    ``nbytes`` is more than ``USABLE_SHARE`` of ``available_bytes()``."""
    free = available_bytes()
    if free is None or nbytes <= USABLE_SHARE * free:
        return
    raise error(f"{where}: {what} would take {nbytes / 2**30:.2f} GiB, but only"
                f" {free / 2**30:.2f} GiB of memory is free{hint}")


def this_host() -> str:
    """This machine's host name (recorded beside a pid: a pid means nothing on another host)."""
    return socket.gethostname()


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine (a pid may have been reused since)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    except OSError:
        return False
    return True


def free_cores(*, samples: int = 5, interval: float = 0.01, loadavg: str = "/proc/loadavg") -> int:
    """Cores this process may use that no other task is running on right now (at least 1).

    The cores in this process's CPU affinity, minus the tasks other than the caller that are
    runnable at this moment (the 4th field of /proc/loadavg, the median of ``samples`` readings
    ``interval`` s apart; the kernel counts the reading thread itself). Where that cannot be read
    (not Linux), all the cores in the affinity. Training uses it for its thread count: on this
    project's 2-core machine 2 threads trained 1.4x faster than 1 when idle and 2.2x slower when
    another process kept one core busy (``fit`` on the bundled sample, 8 epochs: idle 3.8 s with
    2 threads, 5.2 s with 1; one core busy 12.7 s with 2, 5.8 s with 1).
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    readings = []
    for i in range(max(1, samples)):
        try:
            running = int(Path(loadavg).read_text().split()[3].split("/")[0])
        except (OSError, ValueError, IndexError):
            return max(1, cores)
        readings.append(running)
        if i + 1 < samples:
            time.sleep(interval)
    others = max(0, sorted(readings)[len(readings) // 2] - 1)
    return max(1, cores - others)


@contextlib.contextmanager
def torch_threads(n: int):
    """torch's CPU thread count while the block runs: ``n``, or for 0 the cores no other task is
    busy on as it starts (``free_cores``, at most torch's own setting); the old count is put back
    after, a failed block included. Yields the count used. Training and propagation both set
    their threads through it."""
    import torch  # here, not at the top: the rest of this module is needed without torch

    old = torch.get_num_threads()
    if n == 0:
        n = min(old, free_cores())
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(old)
