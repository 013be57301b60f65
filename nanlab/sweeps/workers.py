"""A sweep's chunks on every core, or on a cluster.

A chunk (a few grid points, or a round's candidates) is trained start to end by
one worker. Every copy's numbers are its own (nanlab.sweeps.engine), so which
worker trains a chunk changes how fast the sweep runs, never what it finds.

- ``in_workers``: forked processes on this machine, one torch thread each. A worker
  is handed its next chunk when it returns the last, so a worker that dies loses
  only the chunk it was training; the others go on with the rest.
- ``executor``: a submitit executor (``sweep.launcher=submitit_local`` or ``slurm``),
  the engine of Hydra's own submitit launcher; the caller submits one job per
  worker, each dealt its chunks round-robin.
"""
from __future__ import annotations

import os
from typing import Callable, Iterator, Optional, Sequence

from nanlab.errors import ConfigError, install_hint


# Copies a chunk trains together. A step's elementwise kernels
# slow down once its tensors leave the L2 cache (tanh_backward measured 0.3 ns an
# element at 16 copies of tanh_explosion, 0.8 at 128), while each step also pays a
# fixed cost in Python, about a millisecond whatever the copies: batches of 8 took
# 1.3x the CPU time of batches of 16 on the 64-point grid (36 s against 27 s). So a
# chunk is as many copies as fit the cache, but no fewer than MIN_CHUNK, and no more
# than MAX_CHUNK, so that a grid still splits into chunks for the workers.
MIN_CHUNK, MAX_CHUNK = 16, 64
DEFAULT_L2_BYTES = 2 * 2 ** 20


def l2_bytes() -> int:
    """The L2 cache of the first CPU (Linux's sysfs), or DEFAULT_L2_BYTES where unknown."""
    try:
        text = open("/sys/devices/system/cpu/cpu0/cache/index2/size").read().strip()
        return int(text[:-1]) * {"K": 2 ** 10, "M": 2 ** 20}[text[-1]] if text[-1] in "KM" else int(text)
    except (OSError, ValueError, IndexError):
        return DEFAULT_L2_BYTES


def chunk_copies(prepared, cache: Optional[int] = None) -> int:
    """Copies per chunk for runs like this one (a nanlab.sweeps.engine.Prepared): its step's tensors (each layer's output
    and its gradient, and the parameters with their gradients, update and optimizer
    state) against the L2 cache, within [MIN_CHUNK, MAX_CHUNK]."""
    if isinstance(prepared.plan, str):
        return MIN_CHUNK  # the loop trains it run by run: chunks only share the work out
    n, width, elements = prepared.data.x.shape[0], prepared.data.x.shape[1], 0
    params = iter(prepared.start)
    for kind, bias in prepared.plan:
        if kind == "linear":
            width = next(params).shape[0]
            if bias:
                next(params)
        elements += 2 * n * width
    elements += 4 * sum(p.numel() for p in prepared.start)
    per_copy = elements * prepared.start[0].element_size()
    return max(MIN_CHUNK, min(MAX_CHUNK, (cache or l2_bytes()) // per_copy))


def available_cores() -> int:
    """The cores this process may run on (its affinity, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity on this platform
        return os.cpu_count() or 1


def worker_count(sweep, device: str) -> int:
    """``sweep.workers``, or the cores available. Runs on a GPU train in this one
    process: CUDA does not survive a fork, and one process already keeps a GPU busy."""
    if sweep.launcher == "local" and device != "cpu":
        from nanlab.lab.build import resolve_device

        if resolve_device(device).type != "cpu":
            return 1
    return int(sweep.workers or available_cores())


def one_thread() -> None:
    """A worker's torch runs on one thread: its cores are the other workers'."""
    import torch

    torch.set_num_threads(1)


def _serve(task: Callable, items: Sequence, conn) -> None:
    one_thread()
    while True:
        index = conn.recv()
        if index is None:
            return
        try:
            reply = (index, True, task(items[index]))
        except BaseException as err:  # the parent raises it, as if the task had run there
            reply = (index, False, err)
        try:
            conn.send(reply)
        except Exception as err:  # an error that does not pickle still says what it was
            conn.send((index, False, RuntimeError(f"{type(reply[2]).__name__}: {reply[2]} ({err})")))


class Lost:
    """An item no result came back for: its worker died, and the reason."""

    def __init__(self, reason: str):
        self.reason = reason


def in_workers(task: Callable, items: Sequence, workers: int) -> Iterator[tuple]:
    """``(index, task(items[index]) or Lost)`` for every item, as each is done.

    With one worker (or one item) the tasks run here, in order. Otherwise
    ``workers`` forked processes take the items in order, each the next one when
    it is free. An exception a task raised is raised here."""
    if workers <= 1 or len(items) <= 1:
        for index, item in enumerate(items):
            yield index, task(item)
        return
    import multiprocessing
    from multiprocessing.connection import wait

    context = multiprocessing.get_context("fork")  # the worker inherits the scenario and configs, unpickled
    pool = []  # [process, connection, index in hand or None]
    for _ in range(min(workers, len(items))):
        here, there = context.Pipe()
        process = context.Process(target=_serve, args=(task, items, there), daemon=True)
        process.start()
        there.close()
        pool.append([process, here, None])
    waiting = list(range(len(items)))[::-1]

    def hand_out(worker) -> None:
        worker[2] = waiting.pop() if waiting else None
        worker[1].send(worker[2])

    try:
        for worker in pool:
            hand_out(worker)
        while any(worker[2] is not None for worker in pool):
            busy = [worker for worker in pool if worker[2] is not None]
            ready = wait([w[1] for w in busy] + [w[0].sentinel for w in busy])
            for worker in busy:
                process, conn, index = worker
                if conn in ready or conn.poll():
                    try:
                        _, ok, value = conn.recv()
                    except EOFError:
                        ok, value = None, None
                    if ok is not None:
                        if not ok:
                            raise value
                        yield index, value
                        hand_out(worker)
                        continue
                if process.sentinel in ready or not process.is_alive():
                    process.join()
                    worker[2] = None
                    yield index, Lost(f"its worker (pid {process.pid}) died, exit code {process.exitcode}")
        for index in waiting[::-1]:  # every worker died before these were handed out
            yield index, Lost("no worker was left to train it")
    finally:
        for process, conn, _ in pool:
            if process.is_alive():
                process.terminate()
            process.join()
            conn.close()


def executor(sweep, folder):
    """The submitit executor ``sweep.launcher`` names, set up from ``sweep.slurm``;
    it submits nothing itself."""
    try:
        import submitit
    except ImportError:
        raise ConfigError("sweep.launcher", sweep.launcher,
                          f"submitit is not installed; install the cluster extra: {install_hint('cluster')}") from None
    if sweep.launcher == "submitit_local":
        made = submitit.LocalExecutor(folder=str(folder))
        made.update_parameters(timeout_min=int(sweep.slurm.timeout_min))
        return made
    slurm = sweep.slurm
    try:
        made = submitit.SlurmExecutor(folder=str(folder))
    except RuntimeError:  # submitit's own check: no srun on the PATH
        raise ConfigError("sweep.launcher", sweep.launcher, "Slurm's srun is not on this machine's PATH; "
                          "start the sweep on the cluster's login node") from None
    settings = dict(time=int(slurm.timeout_min), cpus_per_task=int(slurm.cpus_per_task),
                    mem=f"{int(slurm.mem_gb)}G", ntasks_per_node=1, nodes=1, job_name="nanlab-sweep")
    settings.update({key: str(slurm[key]) for key in ("partition", "account", "qos", "constraint")
                     if slurm[key] is not None})
    made.update_parameters(**settings)
    return made
