"""The sentinel and the guard: cheap checks every step, the exact tracer only once.

Every step, :class:`Guard` takes a pre-step snapshot (one fused copy of parameters,
buffers and optimizer state, plus the RNG state), runs the step, then checks loss,
gradients and parameters with one host sync, reusing the gradient norm the step
already computed when it passes one back. At the first non-finite step it restores
the snapshot, replays that step once under the tracer to find the first bad op,
restores again and raises :class:`nanlab.NonFiniteError`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from nanlab.errors import NonFiniteError
from nanlab.tracer import replay


def total_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Global L2 norm of a list of tensors, with no host sync."""
    if not tensors:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(tensors)).float())


def _all_finite(tensors) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


class Snapshot:
    """Pre-step copy of everything one step can change: parameters, buffers,
    optimizer state and RNG. Buffers are reused, so a snapshot is one fused copy."""

    def __init__(self, model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer]):
        self.model, self.optimizer = model, optimizer
        self._live: list[torch.Tensor] = []
        self._saved: list[torch.Tensor] = []
        self._opt_layout = None
        self._opt_state = None

    def _state_tensors(self):
        """Optimizer state as (layout, tensors); layout holds the non-tensor values."""
        if self.optimizer is None:
            return (), []
        layout, tensors = [], []
        for param, state in self.optimizer.state.items():
            for key, value in state.items():
                if isinstance(value, torch.Tensor):
                    layout.append((param, key, None))
                    tensors.append(value)
                else:
                    layout.append((param, key, value))
        return tuple(layout), tensors

    def take(self) -> None:
        layout, state = self._state_tensors()
        live = [p.detach() for p in self.model.parameters()] + list(self.model.buffers()) + state
        if len(live) != len(self._saved) or any(a.shape != b.shape or a.dtype != b.dtype for a, b in zip(live, self._saved)):
            self._saved = [t.detach().clone() for t in live]
        elif live:
            torch._foreach_copy_(self._saved, live)
        self._live, self._opt_layout = live, layout
        self._rng = torch.get_rng_state()
        self._cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None

    def restore(self) -> None:
        with torch.no_grad():
            if self._live:
                torch._foreach_copy_(self._live, self._saved)
        if self.optimizer is not None:
            # State created during the failed step (e.g. Adam's moments at step 0) goes away.
            kept = {(id(p), k) for p, k, _ in self._opt_layout}
            for param, state in list(self.optimizer.state.items()):
                for key in [k for k in state if (id(param), k) not in kept]:
                    del state[key]
                if not state:
                    del self.optimizer.state[param]
            for param, key, value in self._opt_layout:
                if value is not None:
                    self.optimizer.state[param][key] = value
        for p in self.model.parameters():
            p.grad = None
        torch.set_rng_state(self._rng)
        if self._cuda_rng is not None:
            torch.cuda.set_rng_state_all(self._cuda_rng)


@dataclass
class StepCheck:
    """What the sentinel read after one step."""

    loss: float
    grad_norm: float
    param_norm: float
    bad: Optional[str]  # None, or the first non-finite quantity: loss, gradients, parameters


class Guard:
    """``guard(step_fn, model, optimizer)``: see :func:`nanlab.guard`."""

    def __init__(self, step_fn: Callable, model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer] = None):
        self.step_fn, self.model, self.optimizer = step_fn, model, optimizer
        self.snapshot = Snapshot(model, optimizer)
        self.step = 0
        self.last: Optional[StepCheck] = None

    def __call__(self, *args):
        self.snapshot.take()
        out = self.step_fn(*args)
        loss, grad_norm = out if isinstance(out, tuple) else (out, None)
        self.last = check = self.sentinel(loss, grad_norm)
        if check.bad is not None:
            self.snapshot.restore()
            event = replay(self.step_fn, *args)
            self.snapshot.restore()
            raise NonFiniteError(self.step, check.bad, event)
        self.step += 1
        return out

    def sentinel(self, loss: torch.Tensor, grad_norm: Optional[torch.Tensor]) -> StepCheck:
        params = [p for p in self.model.parameters()]
        if grad_norm is None:
            grad_norm = total_norm([p.grad for p in params if p.grad is not None])
        param_norm = total_norm([p.detach() for p in params])
        loss_v, grad_v, param_v = torch.stack([loss.detach().float().reshape(()), grad_norm.float(), param_norm]).tolist()
        bad = None
        if not math.isfinite(loss_v):
            bad = "loss"
        # A norm can overflow on finite values; the exact check runs only then.
        elif not math.isfinite(grad_v) and not _all_finite([p.grad for p in params if p.grad is not None]):
            bad = "gradients"
        elif not math.isfinite(param_v) and not _all_finite([p.detach() for p in params]):
            bad = "parameters"
        return StepCheck(loss_v, grad_v, param_v, bad)


def guard(step_fn: Callable, model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer] = None) -> Guard:
    """Wrap one training step (forward, backward, optimizer step; returns the loss).

    The returned callable runs the sentinel after each step. At the first non-finite
    step it restores the model and optimizer to their state before that step,
    replays the step once under the exact tracer, and raises NonFiniteError carrying
    the step number, the quantity the sentinel saw and the tracer's Event.
    ``step_fn`` may return ``(loss, grad_norm)`` to spare the sentinel a norm.
    """
    return Guard(step_fn, model, optimizer)
