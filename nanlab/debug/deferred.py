"""The tracer's deferred mode: the same verdicts as checking op by op, with one host sync.

On CUDA, reading a value back after every op would stall the device at each one. So
each op's finiteness statistics stay on the device and the op is recorded with the
storages it read and wrote. When the traced block ends, one sync per device reads
all the statistics, and the tracer's rules (:class:`nanlab.debug.tracer.Provenance`) are
fed the recorded ops in the order they ran, exactly as the immediate mode feeds them.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from nanlab.lab.result import Event


def _stats(t: torch.Tensor) -> torch.Tensor:
    """[holds NaN, max, min], NaN ignored in the last two, computed on t's device
    without a host sync. An infinite max or min tells +inf or -inf; the larger
    magnitude of the two is the largest |x|."""
    v = t._values() if t.is_sparse else t
    v = v.detach()
    low, high = torch.aminmax(v.nan_to_num(nan=0.0, posinf=math.inf, neginf=-math.inf))
    return torch.stack([v.isnan().any().double(), high.double(), low.double()])


def _content(values) -> tuple:
    """(holds NaN, holds +inf, holds -inf) from _stats values."""
    nan, high, low = values
    return nan != 0, high == math.inf, low == -math.inf


def _absmax(values) -> float:
    return max(abs(values[1]), abs(values[2]))


class DeferredLog:
    """The ops of a deferred trace, in order, with their statistics on the device."""

    def __init__(self):
        self._stats: list[torch.Tensor] = []
        self._records: list[tuple] = []

    def stat_index(self, t: torch.Tensor) -> int:
        """Queue t's statistics; the index finds them once they are read back."""
        self._stats.append(_stats(t))
        return len(self._stats) - 1

    def checked(self, name: str, ctx, groups, writer: bool) -> None:
        """``groups``: [(reads, writes)] with reads [(storage key, stat index)] taken
        as the op found its inputs (an overwritten input's before it ran), and writes
        [(storage key, stat index, partial)]."""
        self._records.append(("checked", name, ctx, groups, writer))

    def carried(self, read_keys, write_keys) -> None:
        self._records.append(("carried", read_keys, write_keys))

    def wrote_finite(self, write_keys) -> None:
        self._records.append(("finite", write_keys))

    def read_out(self, key, index: int) -> None:
        self._records.append(("read_out", key, index))

    def _read_back(self) -> list:
        """All statistics as Python numbers: one sync per device."""
        values: list = [None] * len(self._stats)
        by_device: dict = {}
        for i, s in enumerate(self._stats):
            by_device.setdefault(s.device, []).append(i)
        for indices in by_device.values():
            for i, row in zip(indices, torch.stack([self._stats[i] for i in indices]).tolist()):
                values[i] = row
        return values

    def finish(self, rules, storages, persistent) -> tuple[Optional[Event], list]:
        """Read everything back and feed ``rules`` the recorded ops in order; then
        judge what reached ``persistent()`` (parameters, buffers, gradients, optimizer
        state), which is measured with a second sync only if some storage still holds
        an event's value. Returns (first, transient) as Provenance.finish does."""
        values = self._read_back()
        records, self._records, self._stats = self._records, [], []
        for record in records:
            if record[0] == "checked":
                _, name, ctx, groups, writer = record
                fed = [([(k, _content(values[i])) for k, i in reads],
                        [(k, _content(values[i]), partial) for k, i, partial in writes]) for reads, writes in groups]
                absmax = max((_absmax(values[i]) for reads, _ in groups for _, i in reads), default=None)
                rules.checked(lambda name=name, ctx=ctx, absmax=absmax: (name, ctx, absmax), fed, writer)
            elif record[0] == "carried":
                rules.carried(record[1], record[2])
            elif record[0] == "finite":
                rules.wrote_finite(record[1])
            else:
                rules.read_out(record[1], _content(values[record[2]]))
        def measure_persistent():
            tensors = persistent()
            if not tensors:
                return []
            keys = [storages.key(t) for t in tensors]
            stats = torch.stack([_stats(t).to(tensors[0].device) for t in tensors]).tolist()
            return [(k, _content(v)) for k, v in zip(keys, stats)]

        return rules.finish(measure_persistent)
