"""A few ranks of a gloo process group, spawned inside a test (127.0.0.1, a free port, one thread
each), with a deadline: a hang fails the test instead of blocking the suite."""

from __future__ import annotations

import os
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp

from speler import distributed as dist

DEADLINE_S = 90.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(i: int, fn, world: int, port: int, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(i),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(i), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    assert dist.launched()
    dist.init(backend="gloo", timeout_s=30)
    try:
        fn(*args)
    finally:
        dist.destroy()


def spawn(fn, *args, world: int = 2, deadline_s: float = DEADLINE_S) -> None:
    """Run fn(*args) on ``world`` ranks; raise what a rank raised; fail after ``deadline_s``."""
    ctx = mp.start_processes(_entry, args=(fn, world, free_port(), args), nprocs=world,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + deadline_s
    while not ctx.join(timeout=max(0.5, deadline - time.monotonic())):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"{fn.__name__} on {world} ranks did not finish in {deadline_s} s")
