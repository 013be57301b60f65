"""Where an op ran, and what to call it: its module, the user's source line, its phase
and, for a backward op, the forward op that made its autograd node.

Kept out of the tracer so that its dispatch core holds only the rules for what counts
as a failure; this module answers "where", and turns the answer into an Event.
"""
from __future__ import annotations

import os
import sys
import threading
from dataclasses import dataclass
from typing import Optional

import torch
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch.utils.weak import WeakIdKeyDictionary

from nanlab.lab.result import Event

_TORCH_DIR = os.path.dirname(torch.__file__)
_STDLIB_DIR = os.path.dirname(os.__file__)
_NANLAB_DIR = os.path.dirname(os.path.abspath(__file__))
_SCENARIOS_DIR = os.path.join(_NANLAB_DIR, "scenarios") + os.sep  # where a wheel installs them
# Libraries that call torch ops on a user's behalf: a Keras model on the torch backend
# runs its ops from keras' own files, and the line to show is the user's call into it.
# Looked up only once imported: a process without them has no such frames.
_WRAPPING_LIBRARIES = ("keras",)
# The tracer's own frames stand between every traced op and the code that called it.
_TRACER_FILES = frozenset(os.path.join(os.path.dirname(__file__), f"{name}.py")
                          for name in ("tracer", "attribution", "deferred"))


def _library_dirs() -> tuple:
    wrapping = [sys.modules[name].__file__ for name in _WRAPPING_LIBRARIES if name in sys.modules]
    return (_TORCH_DIR, _STDLIB_DIR, *(os.path.dirname(f) for f in wrapping if f))


def _user_frame(depth: int = 1) -> Optional[str]:
    """``file:line`` of the innermost frame outside torch, Keras and the standard library.
    None when that frame is nanlab's own machinery (the loop calling a torch loss
    directly): there is no user line to show. nanlab's scenarios count as user code."""
    frame = sys._getframe(depth)
    libraries = _library_dirs()
    while frame is not None:
        fn = frame.f_code.co_filename
        if not (fn in _TRACER_FILES or fn.startswith(libraries) or fn.startswith("<")):
            if fn.startswith(_NANLAB_DIR) and not fn.startswith(_SCENARIOS_DIR):
                return None
            return f"{os.path.basename(fn)}:{frame.f_lineno}"
        frame = frame.f_back
    return None


# What a backward event gives as its forward op when the tracer never saw that op run.
# A dispatch mode sees only its own thread's ops, so a node another thread made has
# no record here (nor has one made before the block).
FORWARD_NOT_TRACED = "? (forward ran before the block or on a thread the tracer does not trace)"
# Autograd numbers its nodes per thread: while another thread makes nodes, one of its
# nodes can carry the number of an op this thread ran, and be taken for that op's.
_MAYBE_OTHER_THREAD = " (unsure: another thread ran modules during the block)"


def _module_name(root, leaf) -> str:
    """What a report calls a module: its path in the model and its class,
    ``layers.6 (Linear)``, since a bare path (``6``) says neither what the module is
    nor where. The root has no path, so it is its class alone (``TinyAttention``)."""
    if leaf is not root:
        for path, mod in root.named_modules():
            if mod is leaf:
                return f"{path} ({type(leaf).__name__})"
    return type(leaf).__name__


@dataclass
class OpContext:
    """Where an op ran, captured when it ran (the deferred mode resolves later).
    ``phase`` is forward, optimizer or update for an op outside the backward pass."""

    node_name: Optional[str]
    node_seq: Optional[int]
    custom: bool
    modules: Optional[tuple]
    source: Optional[str]
    phase: str
    other_thread_ran_modules: bool  # so far: both modes judge by what the op saw when it ran


class OpLocator:
    """Follows a traced block as it runs: the module stack and the optimizer phase come
    from torch's global hooks, and each autograd node's forward op is remembered so that
    a backward event can point at the forward code the user wrote.

    torch's module and optimizer hooks fire in every thread, while a dispatch mode sees
    only the ops of the thread that entered it. So the locator keeps to the thread that
    installed it: a module another thread runs meanwhile is neither on its stack nor
    among the modules whose state the trace watches.
    """

    def __init__(self):
        self._modules: list[torch.nn.Module] = []
        self._in_optimizer = False
        self._forward_ops: dict[int, tuple] = {}  # autograd sequence nr -> (op, modules, source)
        self._last_seq = -1
        self._hooks = []
        self._thread: Optional[int] = None
        # Whether another thread ran a module while the block ran: the hooks see it,
        # the dispatch mode does not see its ops.
        self.other_thread_ran_modules = False
        # Every module and optimizer this thread ran inside the block, by id: their
        # parameters, buffers, gradients and optimizer state are what a step keeps.
        self.modules_seen: dict[int, torch.nn.Module] = {}
        self.optimizers_seen: dict[int, torch.optim.Optimizer] = {}
        # The storages of those modules' parameters (a write through p.data is an
        # update too), built when an op first writes in place outside the optimizer.
        self._parameter_storages: Optional[WeakIdKeyDictionary] = None

    def install(self) -> None:
        self._thread = threading.get_ident()
        self._hooks = [
            register_module_forward_pre_hook(self._enter_module),
            register_module_forward_hook(self._leave_module),
            register_optimizer_step_pre_hook(lambda opt, args, kwargs: self._set_optimizer(opt, True)),
            register_optimizer_step_post_hook(lambda opt, args, kwargs: self._set_optimizer(opt, False)),
        ]

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def _enter_module(self, m, args):
        if threading.get_ident() != self._thread:
            self.other_thread_ran_modules = True
            return
        self._modules.append(m)
        if id(m) not in self.modules_seen:
            self.modules_seen[id(m)] = m
            if self._parameter_storages is not None:
                self._note_parameters(m)

    def _leave_module(self, m, args, out):
        if threading.get_ident() == self._thread and self._modules and self._modules[-1] is m:
            self._modules.pop()

    def _set_optimizer(self, opt, on: bool):
        if threading.get_ident() == self._thread:
            self._in_optimizer = on
            self.optimizers_seen[id(opt)] = opt

    def _running_modules(self) -> Optional[tuple]:
        # (root, innermost): the path between them is worked out only if an event needs it.
        return (self._modules[0], self._modules[-1]) if self._modules else None

    def note_forward_op(self, name: str, remember: bool = True) -> None:
        """Called after each forward op: remember it as the maker of the autograd node it
        made. ``remember=False`` (ops the tracer never checks, whose backward it does
        not name) only marks the node as taken, which is cheap: walking the stack for
        the source line is the expensive part, and without the mark the next op would
        be taken for the node's maker."""
        if self._in_optimizer:
            return
        # Inside an op that records grad, autograd has already numbered its node.
        seq = torch._C._autograd._get_sequence_nr() - 1
        if seq != self._last_seq:
            self._last_seq = seq
            if remember and seq not in self._forward_ops:
                self._forward_ops[seq] = (f"aten.{name}", self._running_modules(), _user_frame())

    def _writes_parameter(self, written) -> bool:
        """Whether an op writes a parameter: the leaf itself (``p -= lr * p.grad`` under
        no_grad) or its storage through ``p.data``."""
        if any(t.requires_grad and t.is_leaf for t in written):
            return True
        if self._parameter_storages is None:
            self._parameter_storages = WeakIdKeyDictionary()
            for m in self.modules_seen.values():
                self._note_parameters(m)
        return any(t.layout == torch.strided and self._parameter_storages.get(t.untyped_storage()) is not None
                   for t in written)

    def _note_parameters(self, m) -> None:
        for p in m.parameters(recurse=False):
            if p.layout == torch.strided:
                self._parameter_storages[p.untyped_storage()] = True

    def context(self, node, written=()) -> OpContext:
        """Where the op now running runs; ``node`` is the autograd node it runs for, if
        any, and ``written`` the tensors it overwrote in place.

        Outside the backward pass the phase is ``optimizer`` inside an optimizer's
        step, ``update`` for a write to a parameter anywhere else (a hand-written
        update), and ``forward`` for everything else."""
        if node is not None:
            phase = "backward"
        elif self._in_optimizer:
            phase = "optimizer"
        elif written and self._writes_parameter(written):
            phase = "update"
        else:
            phase = "forward"
        return OpContext(type(node).__name__ if node is not None else None,
                         node._sequence_nr() if node is not None else None,
                         isinstance(node, torch.autograd.function.BackwardCFunction),
                         self._running_modules(), _user_frame(), phase, self.other_thread_ran_modules)

    def event(self, name: str, kind: str, origin: str, absmax: Optional[float], ctx: OpContext) -> Event:
        op = f"aten.{name}"
        if ctx.node_name is not None:
            recorded = self._forward_ops.get(ctx.node_seq)
            fwd_op, modules, source = recorded or (FORWARD_NOT_TRACED, None, None)
            if ctx.custom:
                source = ctx.source or source  # the custom backward is user code
                fwd_op = ctx.node_name.removesuffix("Backward")  # the Function class, not an op inside it
            elif recorded is not None and ctx.other_thread_ran_modules:
                fwd_op += _MAYBE_OTHER_THREAD
            module = _module_name(*modules) if modules else None
            return Event(op, "backward", kind, origin, module, source, absmax, ctx.node_name, fwd_op)
        module = _module_name(*ctx.modules) if ctx.modules else None
        return Event(op, ctx.phase, kind, origin, module, ctx.source, absmax)

    def persistent_tensors(self) -> list[torch.Tensor]:
        """What outlives the block in the modules and optimizers it ran: parameters,
        buffers, gradients and optimizer state (floating point and complex tensors)."""
        found: dict[int, torch.Tensor] = {}
        for m in self.modules_seen.values():
            for t in (*m.parameters(recurse=False), *m.buffers(recurse=False)):
                found[id(t)] = t
                if t.grad is not None:
                    found[id(t.grad)] = t.grad
        for opt in self.optimizers_seen.values():
            for group in opt.param_groups:
                for p in group["params"]:
                    found[id(p)] = p
                    if p.grad is not None:
                        found[id(p.grad)] = p.grad
            for state in opt.state.values():
                for value in state.values():
                    values = value if isinstance(value, (list, tuple)) else (value,)
                    for t in values:
                        if isinstance(t, torch.Tensor):
                            found[id(t)] = t
        return [t for t in found.values() if (t.is_floating_point() or t.is_complex()) and t.numel()]
