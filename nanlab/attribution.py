"""Where an op ran, and what to call it: its module, the user's source line, its phase
and, for a backward op, the forward op that made its autograd node.

Kept out of the tracer so that its dispatch core holds only the rules for what counts
as a failure; this module answers "where", and turns the answer into an Event.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Optional

import torch
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from nanlab.result import Event

_TORCH_DIR = os.path.dirname(torch.__file__)
_STDLIB_DIR = os.path.dirname(os.__file__)
_NANLAB_DIR = os.path.dirname(os.path.abspath(__file__))
_SCENARIOS_DIR = os.path.join(_NANLAB_DIR, "scenarios") + os.sep  # where a wheel installs them
# The tracer's own frames stand between every traced op and the code that called it.
_TRACER_FILES = frozenset(os.path.join(os.path.dirname(__file__), f"{name}.py")
                          for name in ("tracer", "attribution", "deferred"))


def _user_frame(depth: int = 1) -> Optional[str]:
    """``file:line`` of the innermost frame outside torch and the standard library.
    None when that frame is nanlab's own machinery (the loop calling a torch loss
    directly): there is no user line to show. nanlab's scenarios count as user code."""
    frame = sys._getframe(depth)
    while frame is not None:
        fn = frame.f_code.co_filename
        if not (fn in _TRACER_FILES or fn.startswith(_TORCH_DIR) or fn.startswith(_STDLIB_DIR) or fn.startswith("<")):
            if fn.startswith(_NANLAB_DIR) and not fn.startswith(_SCENARIOS_DIR):
                return None
            return f"{os.path.basename(fn)}:{frame.f_lineno}"
        frame = frame.f_back
    return None


def _path_of(root, leaf) -> str:
    """``layers.3`` for a submodule; the class name for the root itself."""
    if leaf is not root:
        for name, mod in root.named_modules():
            if mod is leaf:
                return name
    return type(leaf).__name__


@dataclass
class OpContext:
    """Where an op ran, captured when it ran (the deferred mode resolves later)."""

    node_name: Optional[str]
    node_seq: Optional[int]
    custom: bool
    modules: Optional[tuple]
    source: Optional[str]
    optimizer: bool


class OpLocator:
    """Follows a traced block as it runs: the module stack and the optimizer phase come
    from torch's global hooks, and each autograd node's forward op is remembered so that
    a backward event can point at the forward code the user wrote."""

    def __init__(self):
        self._modules: list[torch.nn.Module] = []
        self._in_optimizer = False
        self._forward_ops: dict[int, tuple] = {}  # autograd sequence nr -> (op, modules, source)
        self._last_seq = -1
        self._hooks = []

    def install(self) -> None:
        self._hooks = [
            register_module_forward_pre_hook(lambda m, args: self._modules.append(m)),
            register_module_forward_hook(lambda m, args, out: self._pop_module(m)),
            register_optimizer_step_pre_hook(lambda opt, args, kwargs: self._set_optimizer(True)),
            register_optimizer_step_post_hook(lambda opt, args, kwargs: self._set_optimizer(False)),
        ]

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def _pop_module(self, m):
        if self._modules and self._modules[-1] is m:
            self._modules.pop()

    def _set_optimizer(self, on: bool):
        self._in_optimizer = on

    def _running_modules(self) -> Optional[tuple]:
        # (root, innermost): the path between them is worked out only if an event needs it.
        return (self._modules[0], self._modules[-1]) if self._modules else None

    def note_forward_op(self, name: str) -> None:
        """Called after each forward op: remember it as the maker of the autograd node it made."""
        if self._in_optimizer:
            return
        # Inside an op that records grad, autograd has already numbered its node.
        seq = torch._C._autograd._get_sequence_nr() - 1
        if seq != self._last_seq:
            self._last_seq = seq
            if seq not in self._forward_ops:
                self._forward_ops[seq] = (f"aten.{name}", self._running_modules(), _user_frame())

    def context(self, node) -> OpContext:
        """Where the op now running runs; ``node`` is the autograd node it runs for, if any."""
        return OpContext(type(node).__name__ if node is not None else None,
                         node._sequence_nr() if node is not None else None,
                         isinstance(node, torch.autograd.function.BackwardCFunction),
                         self._running_modules(), _user_frame(), self._in_optimizer)

    def event(self, name: str, kind: str, origin: str, absmax: Optional[float], ctx: OpContext) -> Event:
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
