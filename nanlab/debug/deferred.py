"""The tracer's deferred mode: the same verdicts as checking op by op, with one host sync.

On CUDA, reading a value back after every op would stall the device at each one. So
each op's finiteness statistics stay on the device and the op is recorded with the
storages it read and wrote. When the traced block ends, one sync per device reads
all the statistics, and the tracer's rules (:class:`nanlab.debug.tracer.Provenance`) are
fed the recorded ops in the order they ran. The ops are recorded by the tracer's one
dispatch path, the same records the immediate mode feeds as each op runs, so both
modes reach the same verdicts.
"""
from __future__ import annotations

import math

import torch


def stored_values(t: torch.Tensor) -> torch.Tensor:
    """The values a tensor stores, as real numbers: a sparse tensor's nonzeros, and a
    complex tensor's real and imaginary parts (so that its -inf has a sign, and its
    largest |x| is its largest part). Both modes measure these."""
    v = t._values() if t.is_sparse else t
    return torch.view_as_real(v.resolve_conj()) if v.is_complex() else v


def _stats(t: torch.Tensor) -> torch.Tensor:
    """[holds NaN, max, min], NaN ignored in the last two, computed on t's device
    without a host sync. An infinite max or min tells +inf or -inf; the larger
    magnitude of the two is the largest |x|."""
    v = stored_values(t).detach()
    low, high = torch.aminmax(v.nan_to_num(nan=0.0, posinf=math.inf, neginf=-math.inf))
    return torch.stack([v.isnan().any().double(), high.double(), low.double()])


def _content(values) -> tuple:
    """(holds NaN, holds +inf, holds -inf) from _stats values."""
    nan, high, low = values
    return nan != 0, high == math.inf, low == -math.inf


def _absmax(values) -> float:
    return max(abs(values[1]), abs(values[2]))


class DeferredMode:
    """The tracer's deferred mode (the CUDA default): each op's statistics stay on the
    device and the op is recorded; :meth:`flush`, when the block ends, reads them all
    back with one sync per device and feeds the rules the records in order. A reading
    is the index of an op's queued statistics.

    It cannot tell a finite write from a non-finite one before the sync, so it reports
    every write as maybe non-finite and follows every op."""

    def __init__(self, rules):
        self._rules = rules
        self._stats: list[torch.Tensor] = []
        self._records: list[tuple] = []

    def following(self) -> bool:
        return True  # what the rules will hold is known only after the sync

    def maybe_nonfinite(self, tensors) -> set:
        return {id(t) for t in tensors}

    def measure(self, t: torch.Tensor) -> int:
        """Queue t's statistics; the index finds them once they are read back."""
        self._stats.append(_stats(t))
        return len(self._stats) - 1

    measure_overwritten = measure  # taken before the op runs, like any other

    def where(self, locate):
        ctx = locate()  # the module stack and source line are gone by the time of the sync
        return lambda: ctx

    def record(self, record: tuple) -> None:
        self._records.append(record)

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

    def flush(self) -> None:
        """Read everything back and feed the rules the recorded ops in order."""
        values = self._read_back()
        records, self._records, self._stats = self._records, [], []

        def resolve(reading):
            if isinstance(reading, int):
                return _content(values[reading]), _absmax(values[reading])
            return reading  # one the tracer knew without measuring: already (content, largest |x|)

        for record in records:
            self._rules.feed(record, resolve)

    def nonfinite_contents(self, tensors) -> list[tuple]:
        """[(tensor, content)] of the tensors (parameters, buffers, gradients, optimizer
        state), measured with a second sync; the rules ask only while some storage
        still holds an event's value. Finite ones are left for the rules to skip."""
        if not tensors:
            return []
        stats = torch.stack([_stats(t).to(tensors[0].device) for t in tensors]).tolist()
        return [(t, _content(v)) for t, v in zip(tensors, stats)]
