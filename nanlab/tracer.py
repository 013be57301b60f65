"""The exact tracer: run code under a TorchDispatchMode and name the first op whose
output went NaN or Inf.

What it reports for that op (an :class:`Event`): the aten op, the phase (forward,
backward or optimizer), the module path, the user's source line, the kind (nan or
inf), the largest |x| among the op's inputs, and the origin: ``op`` when this op
made the value non-finite, ``input`` when a NaN or +Inf came in from outside the
traced code (bad data or already-bad parameters).

Intentional masks are not failures: -inf (or +inf) written by masked_fill, full,
fill, where and friends, and the infinities that flow from them through adds,
maxes, copies and views, are tolerated. An op that turns such values into NaN
(softmax over a fully masked row) is reported, and so is any op that makes a new
infinity from finite inputs (log(0), x/0, overflow).

Backward events also carry the autograd node (``SqrtBackward0``, or a custom
Function's ``MyFnBackward``) and the forward op that created it, matched through
autograd's sequence numbers, so that the module and source line point at the
forward code the user wrote.

Where an op ran, and the Event that names it, come from :mod:`nanlab.attribution`;
the mode that checks with one host sync instead of one per op is :mod:`nanlab.deferred`.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from nanlab.attribution import OpLocator
from nanlab.deferred import DeferredLog
from nanlab.result import Event

__all__ = ["Event", "Tracer", "trace", "replay"]

# Ops whose job is to write a chosen constant: an infinity they write is a mask.
_MASK_WRITERS = {
    "masked_fill", "masked_fill_", "full", "full_like", "new_full", "fill", "fill_",
    "where", "scalar_tensor", "index_put", "index_put_", "lift_fresh", "lift_fresh_copy",
    "masked_scatter", "masked_scatter_", "scatter", "scatter_",
}
# Bookkeeping ops that cannot create a non-finite value and need not be checked.
# (Casts stay checked: float32 -> float16 is where fp16 overflow happens. empty* may
# hold stale bits that nothing reads before overwriting.)
_NEVER_CHECK = {"detach", "alias", "clone", "empty", "empty_like", "empty_strided",
                "zeros", "zeros_like", "ones", "ones_like",
                # These map finite inputs to finite outputs and cannot turn an infinity
                # (a mask) into NaN either, so a first non-finite value never starts here.
                "tanh", "sigmoid", "relu", "relu_", "threshold_backward", "hardtanh", "abs", "neg", "sign",
                "clamp", "clamp_min", "clamp_max", "maximum", "minimum", "gather", "index_select", "cat",
                "stack", "sort", "topk", "amax", "amin", "max", "min", "leaky_relu", "zero_"}


def _float_tensors(tree):
    if isinstance(tree, torch.Tensor):
        return [tree] if tree.is_floating_point() and tree.numel() else []
    return [t for t in tree_leaves(tree) if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel()]


def _nonfinite_kind(t: torch.Tensor) -> Optional[str]:
    """'nan', 'inf' or None. One reduction on the common finite path; a sum that
    overflowed on finite values is ruled out by the exact check."""
    # Half types accumulate in float32 so that a sum of finite values rarely overflows.
    total = t.sum(dtype=torch.float32) if t.element_size() < 4 else t.sum()
    if math.isfinite(total.item()):
        return None
    if t.isnan().any().item():
        return "nan"
    if t.isinf().any().item():
        return "inf"
    return None


def _absmax(tensors) -> Optional[float]:
    values = [t.detach().abs().nan_to_num(nan=0.0, posinf=math.inf).max().item() for t in tensors]
    return max(values) if values else None


class _Stop(Exception):
    """Unwinds the replayed step once its first event is known."""


class Tracer(TorchDispatchMode):
    """Checks the output of every non-view op. ``first`` holds the first Event.

    Immediate mode (the CPU default) checks each op as it runs, since on the CPU
    reading a value back costs nothing; with ``stop=True`` it raises at the first
    event so that a replayed step ends there (:func:`replay` catches it). Deferred
    mode (the CUDA default, or ``defer=True``) reads everything back with one sync
    when the block ends: see :mod:`nanlab.deferred`.
    """

    def __init__(self, stop: bool = False, defer: Optional[bool] = None):
        super().__init__()
        self.stop, self.defer = stop, defer
        self.first: Optional[Event] = None
        self._tolerated: set[int] = set()  # storages holding intentional infinities
        self._where = OpLocator()
        self._deferred = DeferredLog()

    def __enter__(self):
        self._where.install()
        return super().__enter__()

    def __exit__(self, *exc):
        self._where.remove()
        result = super().__exit__(*exc)
        if self.defer:
            self.first = self._deferred.first_event(self._decide, self._where.event)
        return result

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if self.first is not None or func.is_view or name in _NEVER_CHECK:
            return func(*args, **(kwargs or {}))
        # An in-place op overwrites its first argument: read that input's state first.
        mutated = _float_tensors(args[0]) if args and func._schema.is_mutable else []
        if self.defer is None:
            self.defer = any(t.is_cuda for t in _float_tensors((args, kwargs)))
        before = {id(t): (self._deferred.stat_index(t) if self.defer else _nonfinite_kind(t)) for t in mutated}
        out = func(*args, **(kwargs or {}))
        node = torch._C._current_autograd_node()
        if node is None:
            self._where.note_forward_op(name)
        # In-place ops (the optimizer's _foreach_add_, say) may return nothing: check
        # the tensors they wrote instead.
        returned_nothing = out is None or (isinstance(out, (list, tuple)) and len(out) == 0)
        written = mutated if returned_nothing else _float_tensors(out)
        if self.defer:
            if written:
                self._deferred.record(name, self._where.context(node), _float_tensors((args, kwargs)), written, before)
            return out
        for t in written:
            kind = _nonfinite_kind(t)
            if kind is not None:
                self._classify(name, kind, t, _float_tensors((args, kwargs)), node, before)
                break
        return out

    def _decide(self, name: str, kind: str, out_key: int, inputs) -> Optional[str]:
        """None when the new infinity is an intentional mask (then remembered as one);
        otherwise the origin: "input" when NaN or +inf came from outside the trace,
        "op" when this op made the value. ``inputs``: (storage, kind, holds +inf)."""
        outside_bad, carries_mask = False, False
        for key, t_kind, posinf in inputs:
            if t_kind is None:
                continue
            if key in self._tolerated:
                carries_mask = True
            elif t_kind == "nan" or posinf:
                outside_bad = True  # NaN or +inf that no traced op produced
            else:
                self._tolerated.add(key)  # -inf from outside the trace: taken as a mask
                carries_mask = True
        if not outside_bad and kind == "inf" and (name in _MASK_WRITERS or carries_mask):
            self._tolerated.add(out_key)
            return None
        return "input" if outside_bad else "op"

    def _classify(self, name, kind, out, inputs, node, before):
        """Immediate mode: decide on the op that just wrote ``out``, and stop a replay there."""
        described = []
        for t in inputs:
            t_kind = before[id(t)] if id(t) in before else _nonfinite_kind(t)
            # +inf matters only for a non-finite input a traced op did not produce;
            # an overwritten input's old values are gone, so it counts as a mask.
            posinf = (t_kind == "inf" and id(t) not in before and bool((t == math.inf).any()))
            described.append((t.untyped_storage().data_ptr(), t_kind, posinf))
        origin = self._decide(name, kind, out.untyped_storage().data_ptr(), described)
        if origin is None:
            return
        self.first = self._where.event(name, kind, origin, _absmax(inputs), self._where.context(node))
        if self.stop:
            raise _Stop()


@contextmanager
def trace(defer: Optional[bool] = None):
    """Run a block under the exact tracer; afterwards ``tr.first`` is None or an Event.

    It never raises because of a NaN: the block runs to its end as it would untraced.
    ``defer`` picks the mode (see Tracer); by default CUDA tensors defer and CPU ones don't.
    """
    tracer = Tracer(stop=False, defer=defer)
    with tracer:
        yield tracer


def replay(fn, *args) -> Optional[Event]:
    """Run ``fn(*args)`` under a stopping tracer; return the first Event or None."""
    tracer = Tracer(stop=True)
    try:
        with tracer:
            fn(*args)
    except _Stop:
        pass
    return tracer.first
