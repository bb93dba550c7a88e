"""Multi-process test harness: a worker function run on world_size CPU processes joined by a gloo group.

    run_workers(worker, *args, world_size=2, timeout=180.0)

spawns the processes (torch.multiprocessing, start method "spawn": a fresh interpreter each, as
torchrun gives, so nothing of the test process's state leaks in but os.environ), runs
worker(rank, world_size, *args) in each inside an initialized process group, and returns when every
rank returned. A rank that raises fails the call with an AssertionError carrying its traceback (and
those of any other rank that failed within a short grace period); a run past `timeout` kills every
child and fails. Children are always reaped: no process outlives the call.

worker must be a top-level function of an importable module (tests.<module>): a spawned child
imports it by name. Workers assert themselves, with messages that name the scenario and the tensor.
"""

from __future__ import annotations

import os
import pickle
import signal
import socket
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessException

# After one rank fails, how long the others get to finish (or fail with their own traceback) before
# they are terminated: a rank blocked in a collective with the failed one gets gloo's "connection
# closed by peer" within ~1 s; 5 s bounds what a failure adds to the run.
_GRACE_PERIOD_S = 5.0
# The process group's timeout: a collective that waits longer raises in the child (a lost peer).
_GROUP_TIMEOUT = timedelta(seconds=60)


def free_port() -> int:
    """A free localhost TCP port (the OS picks one on bind(0)). Free when returned: another process
    may take it before rank 0's store binds it, a rare race that fails the run with a bind error."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_rank(rank: int, worker, world_size: int, port: int, args: tuple) -> None:
    """A child's body: the process group around worker(rank, world_size, *args)."""
    # the ranks share the machine's cores: intra-op threads for every core in every rank oversubscribe
    # them (2 ranks x 2 threads on 2 cores: tests/test_data_parallel.py took 82 s of CPU, 42 s with 1)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(max(1, cores // world_size))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=_GROUP_TIMEOUT)
    worker(rank, world_size, *args)
    # Not in a finally: a rank that raised must write its traceback before its peers see it leave
    # (tearing the group down first let a peer's "connection reset" traceback come first), and its
    # process, exiting next, takes the group with it.
    dist.destroy_process_group()
    # Done: leave without the interpreter's teardown of every imported module (with transformers
    # loaded it took ~5 s per spawn on 2 cores); nothing is left to flush but the standard streams.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _failure(context, rank: int) -> str:
    """Rank `rank`'s traceback (the child wrote it to its error file), or how it exited."""
    path = context.error_files[rank]
    if os.access(path, os.R_OK):
        with open(path, "rb") as fh:
            return pickle.load(fh)
    code = context.processes[rank].exitcode
    return f"exited with code {code} without a Python traceback" + (" (killed by a signal)" if code < 0 else "")


def _failed_ranks(context, first_seen: int) -> list[int]:
    """The ranks that failed, the cause first as far as it can be told: ranks that died without a
    traceback (a crash, os._exit), then those that raised, in the order they wrote their tracebacks
    (a rank that raises makes its peers' collectives fail a moment later with gloo's "connection
    reset by peer"). Ranks that join terminated (SIGTERM) after the grace period are not listed."""
    crashed, raised = [], []
    for rank, process in enumerate(context.processes):
        path = context.error_files[rank]
        if os.access(path, os.R_OK):
            raised.append((os.stat(path).st_mtime_ns, rank))
        elif process.exitcode not in (0, -signal.SIGTERM):
            crashed.append(rank)
    return crashed + [rank for _, rank in sorted(raised)] or [first_seen]


def _reap(context) -> None:
    """Kill every child still running and wait for each (no zombies); remove the error files."""
    for process in context.processes:
        if process.is_alive():
            process.kill()
    for process in context.processes:
        process.join()
    for path in context.error_files:
        if os.path.exists(path):
            os.unlink(path)


def run_workers(worker, *args, world_size: int = 2, timeout: float = 180.0) -> None:
    """Runs worker(rank, world_size, *args) on `world_size` spawned processes in a gloo process group
    (localhost, a free port); returns when all returned. Raises AssertionError naming the failing
    rank(s) with their tracebacks, or, past `timeout` seconds, naming the ranks still running (all
    children are then killed)."""
    __tracebackhide__ = True     # pytest: the ranks' tracebacks in the message are the story, not this frame
    context = mp.start_processes(_run_rank, args=(worker, world_size, free_port(), args), nprocs=world_size,
                                 join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                running = [rank for rank, p in enumerate(context.processes) if p.is_alive()]
                raise AssertionError(f"{worker.__name__}: timed out after {timeout:.0f} s; rank(s) {running} "
                                     f"still running were killed")
            try:
                # returns False when some ranks finished and others still run; raises when one failed
                if context.join(timeout=remaining, grace_period=_GRACE_PERIOD_S):
                    return
            except ProcessException as error:
                # join terminated the others after the grace period and reaped every child
                failed = _failed_ranks(context, error.error_index)
                report = "\n".join(f"--- rank {rank}:\n{_failure(context, rank)}" for rank in failed)
                raise AssertionError(f"{worker.__name__}: rank(s) {failed} of {world_size} failed "
                                     f"(probable cause first)\n{report}") from None
    finally:
        _reap(context)
