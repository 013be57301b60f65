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
"""
from __future__ import annotations

import math
import os
import sys
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Optional

import torch
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

aten = torch.ops.aten

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

_TORCH_DIR = os.path.dirname(torch.__file__)
_NANLAB_DIR = os.path.dirname(os.path.abspath(__file__))
_SCENARIOS_DIR = os.path.join(_NANLAB_DIR, "scenarios") + os.sep  # where a wheel installs them
_STDLIB_DIR = os.path.dirname(os.__file__)


@dataclass
class Event:
    """The first non-finite op. ``module`` and ``source`` may be None when unknown."""

    op: str
    phase: str
    kind: str
    origin: str
    module: Optional[str] = None
    source: Optional[str] = None
    input_absmax: Optional[float] = None
    node: Optional[str] = None
    forward_op: Optional[str] = None

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["input_absmax"] is not None and not math.isfinite(d["input_absmax"]):
            d["input_absmax"] = str(d["input_absmax"])  # keep result.json strict JSON
        return d

    def describe(self) -> str:
        kind = "NaN" if self.kind == "nan" else "Inf"
        what = self.op
        if self.node:
            what = f"{self.node} (backward of {self.forward_op or '?'})"
        where = f" in {self.module}" if self.module else ""
        src = f" ({self.source})" if self.source else ""
        came = " (came in from outside: bad input or parameters)" if self.origin == "input" else ""
        return f"{kind} first in {self.phase}: {what}{where}{src}{came}"


def _user_frame(depth: int = 1) -> Optional[str]:
    """``file:line`` of the innermost frame outside torch and the standard library.
    None when that frame is nanlab's own machinery (the loop calling a torch loss
    directly): there is no user line to show. nanlab's scenarios count as user code."""
    frame = sys._getframe(depth)
    while frame is not None:
        fn = frame.f_code.co_filename
        if not (fn == __file__ or fn.startswith(_TORCH_DIR) or fn.startswith(_STDLIB_DIR) or fn.startswith("<")):
            if fn.startswith(_NANLAB_DIR) and not fn.startswith(_SCENARIOS_DIR):
                return None
            return f"{os.path.basename(fn)}:{frame.f_lineno}"
        frame = frame.f_back
    return None


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


def _path_of(root, leaf) -> str:
    """``layers.3`` for a submodule; the class name for the root itself."""
    if leaf is not root:
        for name, mod in root.named_modules():
            if mod is leaf:
                return name
    return type(leaf).__name__


class _Stop(Exception):
    """Unwinds the replayed step once its first event is known."""


@dataclass
class _OpContext:
    """Where an op ran, captured when it ran (the deferred mode resolves later)."""

    node_name: Optional[str]
    node_seq: Optional[int]
    custom: bool
    modules: Optional[tuple]
    source: Optional[str]
    optimizer: bool


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


class Tracer(TorchDispatchMode):
    """Checks the output of every non-view op. ``first`` holds the first Event.

    Immediate mode (the CPU default) checks each op as it runs; on the CPU reading
    a value back costs nothing. With ``stop=True`` it raises an internal exception
    at the first event so that a replayed step ends there; :func:`replay` catches it.

    Deferred mode (the CUDA default, or ``defer=True``) never syncs per op: each op's
    finiteness statistics stay on the device, and one sync when the block ends
    finds the same first op by running the same decisions over the records in order.
    """

    def __init__(self, stop: bool = False, defer: Optional[bool] = None):
        super().__init__()
        self.stop, self.defer = stop, defer
        self.first: Optional[Event] = None
        self._tolerated: set[int] = set()  # storages holding intentional infinities
        self._modules: list[torch.nn.Module] = []
        self._forward_ops: dict[int, tuple] = {}  # autograd sequence nr -> (op, module, source)
        self._last_seq = -1
        self._in_optimizer = False
        self._hooks = []
        self._stats: list[torch.Tensor] = []  # deferred mode: device-side statistics
        self._records: list[tuple] = []  # deferred mode: (op name, context, inputs, outputs)

    # --- context management: module stack and optimizer phase come from global hooks
    def __enter__(self):
        self._hooks = [
            register_module_forward_pre_hook(lambda m, args: self._modules.append(m)),
            register_module_forward_hook(lambda m, args, out: self._pop_module(m)),
            register_optimizer_step_pre_hook(lambda opt, args, kwargs: self._set_optimizer(True)),
            register_optimizer_step_post_hook(lambda opt, args, kwargs: self._set_optimizer(False)),
        ]
        return super().__enter__()

    def __exit__(self, *exc):
        for h in self._hooks:
            h.remove()
        self._hooks = []
        result = super().__exit__(*exc)
        if self._records:
            self._resolve_deferred()
        return result

    def _pop_module(self, m):
        if self._modules and self._modules[-1] is m:
            self._modules.pop()

    def _set_optimizer(self, on: bool):
        self._in_optimizer = on

    def _innermost(self):
        return (self._modules[0], self._modules[-1]) if self._modules else None

    def _context(self, node) -> _OpContext:
        return _OpContext(type(node).__name__ if node is not None else None,
                          node._sequence_nr() if node is not None else None,
                          isinstance(node, torch.autograd.function.BackwardCFunction),
                          self._innermost(), _user_frame(), self._in_optimizer)

    # --- the per-op check
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.first is not None or func.is_view or func.overloadpacket.__name__ in _NEVER_CHECK:
            return func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        # An in-place op overwrites its first argument: read that input's state first.
        mutated = _float_tensors(args[0]) if args and func._schema.is_mutable else []
        if self.defer is None:
            self.defer = any(t.is_cuda for t in _float_tensors((args, kwargs)))
        before = {id(t): (self._stat_index(t) if self.defer else _nonfinite_kind(t)) for t in mutated}
        out = func(*args, **(kwargs or {}))
        node = torch._C._current_autograd_node()
        if node is None and not self._in_optimizer:
            # Inside an op that records grad, autograd has already numbered its node.
            seq = torch._C._autograd._get_sequence_nr() - 1
            if seq != self._last_seq:
                self._last_seq = seq
                if seq not in self._forward_ops:  # module path is resolved only if reported
                    self._forward_ops[seq] = (f"aten.{name}", self._innermost(), _user_frame())
        # In-place ops (the optimizer's _foreach_add_, say) may return nothing: check
        # the tensors they wrote instead.
        returned_nothing = out is None or (isinstance(out, (list, tuple)) and len(out) == 0)
        written = mutated if returned_nothing else _float_tensors(out)
        if self.defer:
            self._record(name, written, args, kwargs, node, before)
            return out
        for t in written:
            kind = _nonfinite_kind(t)
            if kind is not None:
                self._classify(name, kind, t, args, kwargs, node, before)
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

    def _event(self, name, kind, origin, absmax, ctx: _OpContext) -> Event:
        op = f"aten.{name}"
        if ctx.node_name is not None:
            fwd_op, modules, source = self._forward_ops.get(ctx.node_seq) or (None, None, None)
            if ctx.custom:
                source = ctx.source or source  # the custom backward is user code
                fwd_op = ctx.node_name.removesuffix("Backward")  # the Function class, not an op inside it
            module = _path_of(*modules) if modules else None
            return Event(op, "backward", kind, origin, module, source, absmax, ctx.node_name, fwd_op)
        module = _path_of(*ctx.modules) if ctx.modules else None
        return Event(op, "optimizer" if ctx.optimizer else "forward", kind, origin, module, ctx.source, absmax)

    # --- immediate mode
    def _classify(self, name, kind, out, args, kwargs, node, before):
        inputs = _float_tensors((args, kwargs))
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
        self.first = self._event(name, kind, origin, _absmax(inputs), self._context(node))
        if self.stop:
            raise _Stop()

    # --- deferred mode
    def _stat_index(self, t: torch.Tensor) -> int:
        self._stats.append(_stats(t))
        return len(self._stats) - 1

    def _record(self, name, written, args, kwargs, node, before):
        if not written:
            return
        inputs = [(t.untyped_storage().data_ptr(), before[id(t)] if id(t) in before else self._stat_index(t), id(t) in before)
                  for t in _float_tensors((args, kwargs))]
        outputs = [(t.untyped_storage().data_ptr(), self._stat_index(t)) for t in written]
        self._records.append((name, self._context(node), inputs, outputs))

    def _resolve_deferred(self) -> None:
        values = torch.stack(self._stats).tolist()  # the one host sync
        for name, ctx, inputs, outputs in self._records:
            for out_key, index in outputs:
                kind, _, _ = _state(values[index])
                if kind is None:
                    continue
                described = []
                for key, i, overwritten in inputs:
                    t_kind, posinf, _ = _state(values[i])
                    described.append((key, t_kind, posinf and not overwritten))
                origin = self._decide(name, kind, out_key, described)
                if origin is None:
                    break
                absmax = max((values[i][2] for _, i, _ in inputs), default=None)
                self.first = self._event(name, kind, origin, absmax, ctx)
                return
        self._records, self._stats = [], []


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
