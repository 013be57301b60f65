"""The tracer's deferred mode: the first non-finite op found with one host sync.

On CUDA, reading a value back after every op would stall the device at each one. So
each op's finiteness statistics stay on the device, and when the traced block ends one
sync reads them all; the tracer's own decisions, run over the records in op order,
then find the same first op that checking op by op would have found.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from nanlab.result import Event


def _stats(t: torch.Tensor) -> torch.Tensor:
    """[sum, max |x| with NaN propagated, max |x| ignoring NaN], computed on t's device
    without a host sync. NaN in the second entry means t holds a NaN; an infinity
    there and the sum's sign tell +inf from -inf."""
    total = t.sum(dtype=torch.float32) if t.element_size() < 4 else t.sum()
    magnitude = t.abs()
    return torch.stack([total.double(), magnitude.amax().double(),
                        magnitude.nan_to_num(nan=0.0, posinf=math.inf).amax().double()])


def _state(values) -> tuple:
    """(kind, holds +inf, largest finite-or-inf |x|) from _stats values."""
    total, amax, absmax = values
    if math.isnan(amax):
        return "nan", False, absmax
    if math.isinf(amax):
        return "inf", total != -math.inf, absmax
    return None, False, absmax


class DeferredLog:
    """The checked ops of a deferred trace, in order, with their statistics on the device."""

    def __init__(self):
        self._stats: list[torch.Tensor] = []
        self._records: list[tuple] = []  # (op name, context, inputs, outputs)

    def stat_index(self, t: torch.Tensor) -> int:
        """Queue t's statistics; the index finds them once they are read back."""
        self._stats.append(_stats(t))
        return len(self._stats) - 1

    def record(self, name: str, ctx, inputs, written, before: dict) -> None:
        """``before`` maps id() of each input the op overwrote to the stat index taken
        before it ran: its old values are gone, so they must be read from there."""
        ins = [(t.untyped_storage().data_ptr(), before[id(t)] if id(t) in before else self.stat_index(t), id(t) in before)
               for t in inputs]
        outs = [(t.untyped_storage().data_ptr(), self.stat_index(t)) for t in written]
        self._records.append((name, ctx, ins, outs))

    def first_event(self, decide: Callable, make_event: Callable[..., Event]) -> Optional[Event]:
        """Sync once and replay the decisions: ``decide`` is Tracer._decide, and
        ``make_event(name, kind, origin, absmax, ctx)`` names the op it reports."""
        if not self._records:
            return None
        values = torch.stack(self._stats).tolist()  # the one host sync
        records, self._records, self._stats = self._records, [], []
        for name, ctx, inputs, outputs in records:
            for out_key, index in outputs:
                kind, _, _ = _state(values[index])
                if kind is None:
                    continue
                described = []
                for key, i, overwritten in inputs:
                    t_kind, posinf, _ = _state(values[i])
                    described.append((key, t_kind, posinf and not overwritten))
                origin = decide(name, kind, out_key, described)
                if origin is None:
                    break
                absmax = max((values[i][2] for _, i, _ in inputs), default=None)
                return make_event(name, kind, origin, absmax, ctx)
        return None
