"""The sentinel and the guard: cheap checks every step, the exact tracer only once.

Every step, :class:`Guard` takes a pre-step snapshot (one fused copy of parameters,
buffers and optimizer state, plus the RNG state), runs the step, then checks loss,
gradients and parameters with one host sync (:class:`Sentinel`), reusing any norm
the step already computed and passes back. At the first non-finite step it restores
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
    """Global L2 norm of a list of tensors, with no host sync. Computed in float32 at
    least, so that float16 gradients of a finite size do not overflow the norm, and in
    float64 for float64 tensors."""
    if not tensors:
        return torch.zeros(())
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(tensors, 2, dtype=dtype)))


def _all_finite(tensors) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


@dataclass
class StepCheck:
    """What the sentinel read after one step. A norm reads NaN when the step did not
    pass it back; that quantity was still checked, by a fused flag."""

    loss: float
    grad_norm: float
    param_norm: float
    bad: Optional[str]  # None, or the first non-finite quantity: loss, gradients, parameters


class Sentinel:
    """The per-step check of loss, gradients and parameters, read with one host sync.

    Gradients and parameters each get a non-finite flag from the fused check AMP's
    GradScaler runs on gradients, with a scale of exactly 1: values are unchanged
    and version counters are not bumped. On a CPU that is about 7 us for 14 tensors,
    against 25 us for ``_foreach_norm``; on CUDA it is one kernel launch per device.
    The loss, the flags and any norms the step passes back land in one small buffer
    that is read once. Sparse and complex tensors, which the fused check does not
    take, are checked one by one.

    The sentinel holds on to the parameter tensors it is given, like the snapshot.
    """

    def __init__(self, params: list[torch.Tensor]):
        self._params = params
        device = params[0].device if params else torch.device("cpu")
        # float64, so that a float64 run's loss is neither rounded nor overflowed on the way.
        self._readings = torch.zeros(5, dtype=torch.float64, device=device)  # loss, grad norm, param norm, flags
        self._slots = [self._readings[i:i + 1] for i in range(3)]
        self._flags = self._readings[3:5]  # gradients bad, parameters bad
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for p in params:
            by_device.setdefault(p.device, []).append(p)
        self._groups = []
        for group_device, group in by_device.items():
            fusable = all(p.is_floating_point() and p.layout == torch.strided for p in group)
            found = torch.zeros(2, device=group_device)  # the fused check takes float32 flags
            self._groups.append((group, [p.detach() for p in group], fusable, found, found[0:1], found[1:2],
                                 torch.ones(1, device=group_device)))

    def check(self, loss: torch.Tensor, grad_norm: Optional[torch.Tensor] = None,
              param_norm: Optional[torch.Tensor] = None) -> StepCheck:
        """Check one step. A norm the step already computed and passes back is that
        quantity's check (and is reported); otherwise the fused flag is, and the norm
        reads NaN (not measured)."""
        if grad_norm is None or param_norm is None:
            self._flag_nonfinite()
        for slot, value in zip(self._slots, (loss, grad_norm, param_norm)):
            if value is not None:
                slot.copy_(value.detach().reshape(1))
        loss_v, grad_v, param_v, grads_flag, params_flag = self._readings.tolist()
        # A norm can overflow on finite values; the exact check runs only then.
        if grad_norm is None:
            grad_v, grads_bad = float("nan"), grads_flag != 0
        else:
            grads_bad = not math.isfinite(grad_v) and not _all_finite(self._grads())
        if param_norm is None:
            param_v, params_bad = float("nan"), params_flag != 0
        else:
            params_bad = not math.isfinite(param_v) and not _all_finite([p.detach() for p in self._params])
        bad = next((name for name, is_bad in (("loss", not math.isfinite(loss_v)), ("gradients", grads_bad),
                                              ("parameters", params_bad)) if is_bad), None)
        return StepCheck(loss_v, grad_v, param_v, bad)

    def _grads(self) -> list[torch.Tensor]:
        return [p.grad for p in self._params if p.grad is not None]

    def _flag_nonfinite(self) -> None:
        for i, (params, data, fusable, found, grads_found, params_found, one) in enumerate(self._groups):
            grads = [p.grad for p in params if p.grad is not None]
            if fusable and not any(g.is_sparse for g in grads):
                found.zero_()
                if grads:
                    torch._amp_foreach_non_finite_check_and_unscale_(grads, grads_found, one)
                torch._amp_foreach_non_finite_check_and_unscale_(data, params_found, one)
            else:
                found.copy_(torch.stack([_any_nonfinite(grads, found.device), _any_nonfinite(data, found.device)]))
            if i == 0:
                self._flags.copy_(found)
            else:
                torch.maximum(self._flags, found.to(self._flags), out=self._flags)


def _any_nonfinite(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    flags = [(~torch.isfinite(t.detach().coalesce().values() if t.is_sparse else t.detach())).any() for t in tensors]
    return torch.stack(flags).any().float() if flags else torch.zeros((), device=device)


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


class Guard:
    """``guard(step_fn, model, optimizer)``: see :func:`nanlab.guard`."""

    def __init__(self, step_fn: Callable, model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer] = None):
        self.step_fn, self.model, self.optimizer = step_fn, model, optimizer
        self.snapshot = Snapshot(model, optimizer)
        self._sentinel = Sentinel(list(model.parameters()))
        self.step = 0
        self.last: Optional[StepCheck] = None

    def __call__(self, *args):
        self.snapshot.take()
        out = self.step_fn(*args)
        loss, grad_norm, param_norm = (tuple(out) + (None, None))[:3] if isinstance(out, tuple) else (out, None, None)
        self.last = check = self._sentinel.check(loss, grad_norm, param_norm)
        if check.bad is not None:
            self.snapshot.restore()
            event = replay(self.step_fn, *args)
            self.snapshot.restore()
            raise NonFiniteError(self.step, check.bad, event)
        self.step += 1
        return out


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
