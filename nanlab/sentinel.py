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
    optimizer state and RNG. Buffers are reused, so a snapshot is one fused copy;
    the list of live tensors is rebuilt only when the optimizer's state changes shape
    (its first step, typically)."""

    def __init__(self, model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer]):
        self.model, self.optimizer = model, optimizer
        self._model_tensors = [p.detach() for p in model.parameters()] + list(model.buffers())
        self._signature = None
        self._live: list[torch.Tensor] = []
        self._saved: list[torch.Tensor] = []
        self._opt_layout: tuple = ()
        self._scalar_keys: list = []

    def _state_signature(self):
        if self.optimizer is None:
            return ()
        return tuple(len(state) for state in self.optimizer.state.values())

    def _relayout(self, signature) -> None:
        layout, tensors = [], []
        if self.optimizer is not None:
            for param, state in self.optimizer.state.items():
                for key, value in state.items():
                    is_tensor = isinstance(value, torch.Tensor)
                    layout.append((param, key, None if is_tensor else value))
                    if is_tensor:
                        tensors.append(value)
        self._opt_layout = tuple(layout)
        # Entries holding plain Python values (a step count, say) are refreshed every
        # step; tensors are covered by the fused copy.
        self._scalar_keys = [(p, k) for p, k, v in layout if v is not None]
        self._live = self._model_tensors + tensors
        self._saved = [t.detach().clone() for t in self._live]
        self._signature = signature

    def take(self) -> None:
        signature = self._state_signature()
        if signature != self._signature:
            self._relayout(signature)
        else:
            if self._scalar_keys:
                scalars = {key: self.optimizer.state[key[0]][key[1]] for key in self._scalar_keys}
                self._opt_layout = tuple((p, k, scalars.get((p, k), v) if v is not None else None)
                                         for p, k, v in self._opt_layout)
            if self._live:
                torch._foreach_copy_(self._saved, self._live)
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
    """What the sentinel read after one step (param_norm is NaN when not measured)."""

    loss: float
    grad_norm: float
    param_norm: float
    bad: Optional[str]  # None, or the first non-finite quantity: loss, gradients, parameters


class Guard:
    """``guard(step_fn, model, optimizer)``: see :func:`nanlab.guard`."""

    def __init__(self, step_fn: Callable, model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer] = None):
        self.step_fn, self.model, self.optimizer = step_fn, model, optimizer
        # Two snapshots, alternating: if parameters turn out bad only at the next step's
        # loss, the step that made them bad can still be restored and replayed.
        self._snapshots = (Snapshot(model, optimizer), Snapshot(model, optimizer))
        self._params = list(model.parameters())
        self._prev_args = None
        self.step = 0
        self.last: Optional[StepCheck] = None

    @property
    def snapshot(self) -> Snapshot:
        return self._snapshots[self.step % 2]

    def __call__(self, *args):
        self.snapshot.take()
        out = self.step_fn(*args)
        loss, grad_norm, param_norm = (tuple(out) + (None, None))[:3] if isinstance(out, tuple) else (out, None, None)
        self.last = check = self.sentinel(loss, grad_norm, param_norm)
        if check.bad is not None:
            self._fail(check.bad, args)
        self._prev_args = args
        self.step += 1
        return out

    def _fail(self, quantity: str, args) -> None:
        self.snapshot.restore()
        if self.step > 0 and not _all_finite([p.detach() for p in self._params]):
            # Finite before the previous step, bad before this one: the previous update did it.
            previous = self._snapshots[(self.step - 1) % 2]
            previous.restore()
            event = replay(self.step_fn, *self._prev_args)
            previous.restore()
            raise NonFiniteError(self.step - 1, "parameters", event)
        event = replay(self.step_fn, *args)
        self.snapshot.restore()
        raise NonFiniteError(self.step, quantity, event)

    def sentinel(self, loss: torch.Tensor, grad_norm: Optional[torch.Tensor] = None,
                 param_norm: Optional[torch.Tensor] = None) -> StepCheck:
        """One host sync for loss, gradient norm and (when the step passes one back)
        parameter norm. Norms the step already computed are reused. Parameters the
        step did not measure are checked through the next step's loss: a NaN or Inf
        weight makes the forward pass non-finite, and the second snapshot lets that
        previous step be replayed."""
        grads = [] if grad_norm is not None else [p.grad for p in self._params if p.grad is not None]
        head = [loss.detach().reshape(()).float()]
        head += [t.reshape(()).float() for t in (grad_norm, param_norm) if t is not None]
        norms = list(torch._foreach_norm(grads, 2, dtype=torch.float32)) if grads else []
        values = torch.stack(head + norms).tolist()
        loss_v = values[0]
        grad_v = values[1] if grad_norm is not None else math.sqrt(sum(v * v for v in values[len(head):]))
        param_v = values[len(head) - 1] if param_norm is not None else float("nan")
        bad = None
        if not math.isfinite(loss_v):
            bad = "loss"
        # A norm can overflow on finite values; the exact check runs only then.
        elif not math.isfinite(grad_v) and not _all_finite([p.grad for p in self._params if p.grad is not None]):
            bad = "gradients"
        elif param_norm is not None and not math.isfinite(param_v) and not _all_finite([p.detach() for p in self._params]):
            bad = "parameters"
        return StepCheck(loss_v, grad_v, param_v, bad)


def guard(step_fn: Callable, model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer] = None) -> Guard:
    """Wrap one training step (forward, backward, optimizer step; returns the loss).

    The returned callable runs the sentinel after each step. At the first non-finite
    step it restores the model and optimizer to their state before that step,
    replays the step once under the exact tracer, and raises NonFiniteError carrying
    the step number, the quantity the sentinel saw and the tracer's Event.
    ``step_fn`` may return ``(loss, grad_norm)`` or ``(loss, grad_norm, param_norm)``
    to spare the sentinel those norms. Build the guard after the model is on its
    device and dtype: the snapshot holds on to the parameter tensors it finds then.
    """
    return Guard(step_fn, model, optimizer)
