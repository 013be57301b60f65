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
            if fn.startswith(_NANLAB_DIR) and os.sep + "scenarios" + os.sep not in fn:
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


class Tracer(TorchDispatchMode):
    """Checks the output of every non-view op. ``first`` holds the first Event.

    With ``stop=True`` it raises an internal exception at the first event so that a
    replayed step ends there; :func:`replay` catches it. With ``stop=False`` the
    traced code runs to the end and checking stops after the first event.
    """

    def __init__(self, stop: bool = False):
        super().__init__()
        self.stop = stop
        self.first: Optional[Event] = None
        self._tolerated: set[int] = set()  # storages holding intentional infinities
        self._modules: list[torch.nn.Module] = []
        self._forward_ops: dict[int, tuple] = {}  # autograd sequence nr -> (op, module, source)
        self._last_seq = -1
        self._in_optimizer = False
        self._hooks = []

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
        return super().__exit__(*exc)

    def _pop_module(self, m):
        if self._modules and self._modules[-1] is m:
            self._modules.pop()

    def _set_optimizer(self, on: bool):
        self._in_optimizer = on

    def _module_path(self) -> Optional[str]:
        if not self._modules:
            return None
        return _path_of(self._modules[0], self._modules[-1])

    def _innermost(self):
        return (self._modules[0], self._modules[-1]) if self._modules else None

    # --- the per-op check
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.first is not None or func.is_view or func.overloadpacket.__name__ in _NEVER_CHECK:
            return func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        # An in-place op overwrites its first argument: read that input's state first.
        mutated = _float_tensors(args[0]) if args and func._schema.is_mutable else []
        before = {id(t): _nonfinite_kind(t) for t in mutated}
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
        for t in (mutated if returned_nothing else _float_tensors(out)):
            kind = _nonfinite_kind(t)
            if kind is not None:
                self._classify(name, kind, t, args, kwargs, node, before)
                break
        return out

    def _classify(self, name, kind, out, args, kwargs, node, before):
        inputs = _float_tensors((args, kwargs))
        outside_bad, carries_mask = False, False
        for t in inputs:
            t_kind = before[id(t)] if id(t) in before else _nonfinite_kind(t)
            if t_kind is None:
                continue
            key = t.untyped_storage().data_ptr()
            if key in self._tolerated:
                carries_mask = True
            elif t_kind == "nan" or (id(t) not in before and bool((t == math.inf).any())):
                outside_bad = True  # NaN or +inf that no traced op produced
            else:
                self._tolerated.add(key)  # -inf from outside the trace: taken as a mask
                carries_mask = True
        if not outside_bad and kind == "inf" and (name in _MASK_WRITERS or carries_mask):
            self._tolerated.add(out.untyped_storage().data_ptr())
            return
        self._report(name, kind, "input" if outside_bad else "op", inputs, node)

    def _report(self, name, kind, origin, inputs, node):
        op = f"aten.{name}"
        if node is not None:
            fwd = self._forward_ops.get(node._sequence_nr())
            fwd_op, modules, source = fwd if fwd else (None, None, None)
            module = _path_of(*modules) if modules else None
            node_name = type(node).__name__
            if isinstance(node, torch.autograd.function.BackwardCFunction):
                source = _user_frame() or source  # the custom backward is user code
                fwd_op = node_name.removesuffix("Backward")  # the Function class, not an op inside it
            event = Event(op, "backward", kind, origin, module, source, _absmax(inputs), node_name, fwd_op)
        else:
            phase = "optimizer" if self._in_optimizer else "forward"
            event = Event(op, phase, kind, origin, self._module_path(), _user_frame(), _absmax(inputs))
        self.first = event
        if self.stop:
            raise _Stop()


@contextmanager
def trace():
    """Run a block under the exact tracer; afterwards ``tr.first`` is None or an Event.

    It never raises because of a NaN: the block runs to its end as it would untraced.
    """
    tracer = Tracer(stop=False)
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
