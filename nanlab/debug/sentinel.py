"""The sentinel and the guard: cheap checks every step, the exact tracer only once.

Every step, :class:`Guard` takes a small pre-step snapshot (:class:`Snapshot`:
buffers, the gradients still being accumulated, hyperparameters, schedulers and the
RNG state). Just before each optimizer update, a hook (:class:`_UpdateWatch`) reads
the norms of the gradients, buffers and loss; a non-finite one refuses the update,
and otherwise the optimizer's parameters and state are copied only if a running
bound (the update bound, above) cannot show the update stays finite.
After the step the sentinel (:class:`Sentinel`) checks, with one host sync on a
GPU, the loss and what the hook did not cover, optimizer state included, reusing
any norm the step already computed and passes back. At the first non-finite step
it restores the snapshot, replays that step once under the tracer to find the
first bad op, restores again and raises :class:`nanlab.NonFiniteError`. A step that
raises its own exception is restored too, and the exception re-raised.
``snapshot="always"`` copies parameters and optimizer state before every step
instead, as the guard did before it could prove updates finite.
"""
from __future__ import annotations

import copy
import math
from contextlib import contextmanager
import operator
from itertools import repeat
import warnings
import weakref
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch

from nanlab.errors import NonFiniteError
from nanlab.debug.tracer import replay


def total_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Global L2 norm of a list of tensors, with no host sync. Computed in float32 at
    least, so that float16 gradients of a finite size do not overflow the norm, and in
    float64 for float64 tensors."""
    if not tensors:
        return torch.zeros(())
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(tensors, 2, dtype=dtype)))


def _all_finite(tensors) -> bool:
    return all(bool(torch.isfinite(t.detach().coalesce().values() if t.is_sparse else t.detach()).all())
               for t in tensors)


@dataclass
class StepCheck:
    """What the sentinel read after one step. A norm reads NaN when the step did not
    pass it back; that quantity was still checked, by a fused flag."""

    loss: float
    grad_norm: float
    param_norm: float
    # None, or the first non-finite quantity: loss, gradients, parameters, buffers, optimizer_state
    bad: Optional[str]


_IS_SPARSE = operator.attrgetter("is_sparse")


def _fusable(tensors) -> bool:
    """Whether AMP's fused non-finite check takes these tensors."""
    return all(t.is_floating_point() and t.layout == torch.strided for t in tensors)


class Sentinel:
    """The per-step check of loss, gradients, parameters, buffers and optimizer
    state, read at once.

    Each of these gets a non-finite flag from the fused check AMP's GradScaler runs
    on gradients, with a scale of exactly 1: values are unchanged and version
    counters are not bumped. On a CPU that is about 7 us for 14 tensors, against 25
    us for ``_foreach_norm``; on CUDA it is one kernel launch per device. Sparse and
    complex tensors, which the fused check does not take, are checked one by one.

    On a GPU the loss, the flags and any norms the step passes back land in one small
    float64 buffer (so that a float64 loss is neither rounded nor overflowed on the
    way) that is read with one host sync. On the CPU there is no device to wait for,
    and each is read directly, which spares the copies.

    The sentinel holds on to the parameter tensors it is given, like the snapshot.
    Buffers and optimizer state are passed to each check, because a module may
    rebind them and an optimizer creates its state in its first step.
    """

    def __init__(self, params: list[torch.Tensor]):
        self._params = params
        self._device = device = params[0].device if params else torch.device("cpu")
        self._read_directly = device.type == "cpu"
        # float32, as the fused check writes: [gradients or parameters, buffers, optimizer state]
        self._flags = torch.zeros(3, device=device)
        self._readings = torch.zeros(6, dtype=torch.float64, device=device)  # loss, grad norm, param norm, flags
        self._slots = [self._readings[i:i + 1] for i in range(3)]
        self._flag_slots = self._readings[3:6]
        self._one = torch.ones(1, device=device)
        self._other_devices: dict[torch.device, tuple] = {}  # a flag and the scale 1 for each other device

    def check(self, loss: torch.Tensor, grad_norm: Optional[torch.Tensor] = None,
              param_norm: Optional[torch.Tensor] = None, buffers: Sequence[torch.Tensor] = (),
              state: Sequence[torch.Tensor] = (), grads_of: Optional[list] = None,
              params: Optional[list] = None) -> StepCheck:
        """Check one step. A norm the step already computed and passes back is that
        quantity's check (and is reported); otherwise the fused flag is, and the norm
        reads NaN (not measured). ``buffers``: the model's floating point buffers;
        ``state``: the optimizers' floating point state. ``grads_of`` and ``params``:
        the parameters whose gradients and values to check (all by default); the
        guard leaves out those it has already checked or proven finite."""
        grads_of = self._params if grads_of is None else grads_of
        params = self._params if params is None else params
        grads = [g for p in grads_of if (g := p.grad) is not None]
        watched = (grads if grad_norm is None else []) + ([p.detach() for p in params] if param_norm is None else [])
        for slot, tensors in enumerate((watched, buffers, state)):
            if tensors:
                self._flag(slot, tensors)
        if self._read_directly and loss.device.type == "cpu":
            loss_v = loss.item()
            grad_v = grad_norm.item() if grad_norm is not None else 0.0
            param_v = param_norm.item() if param_norm is not None else 0.0
            either_flag, buffers_flag, state_flag = self._flags.tolist()
        else:
            for slot, value in zip(self._slots, (loss, grad_norm, param_norm)):
                if value is not None:
                    slot.copy_(value.detach().reshape(1))
            self._flag_slots.copy_(self._flags)
            loss_v, grad_v, param_v, either_flag, buffers_flag, state_flag = self._readings.tolist()
        if either_flag or buffers_flag or state_flag:
            self._clear_flags()
        # One fused flag covers gradients and parameters; only when it is set does an
        # exact check tell which. A norm can overflow on finite values; the exact check
        # runs only then.
        if grad_norm is None:
            grad_v, grads_bad = float("nan"), either_flag != 0 and not _all_finite(grads)
        else:
            grads_bad = not math.isfinite(grad_v) and not _all_finite(grads)
        if param_norm is None:
            param_v, params_bad = float("nan"), either_flag != 0 and not _all_finite(params)
        else:
            params_bad = not math.isfinite(param_v) and not _all_finite(params)
        if not math.isfinite(loss_v):
            bad = "loss"
        elif grads_bad:
            bad = "gradients"
        elif params_bad:
            bad = "parameters"
        elif buffers_flag != 0:
            bad = "buffers"
        elif state_flag != 0:
            bad = "optimizer_state"
        else:
            bad = None
        return StepCheck(loss_v, grad_v, param_v, bad)

    def _clear_flags(self) -> None:
        self._flags.zero_()
        for found, _ in self._other_devices.values():
            found.zero_()

    def _flag(self, slot: int, tensors: Sequence[torch.Tensor]) -> None:
        """Set flag ``slot`` if any of the tensors holds a non-finite value. The fused
        check only ever sets its flag: _clear_flags resets it after a hit."""
        flag = self._flags[slot:slot + 1]
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for t in tensors:
            by_device.setdefault(t.device, []).append(t)
        for device, group in by_device.items():
            if device == self._device:
                found, one = flag, self._one
            else:
                if device not in self._other_devices:
                    self._other_devices[device] = (torch.zeros(1, device=device), torch.ones(1, device=device))
                found, one = self._other_devices[device]
                found.zero_()
            if _fusable(group) and not any(map(_IS_SPARSE, group)):
                torch._amp_foreach_non_finite_check_and_unscale_(group, found, one)
            else:
                torch.maximum(found, _any_nonfinite(group, device).reshape(1), out=found)
            if device != self._device:
                torch.maximum(flag, found.to(self._device), out=flag)


def _any_nonfinite(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    flags = [(~torch.isfinite(t.detach().coalesce().values() if t.is_sparse else t.detach())).any() for t in tensors]
    return torch.stack(flags).any().float() if flags else torch.zeros((), device=device)


def _as_list(optimizer) -> list:
    """None, one optimizer, or several, as a list."""
    if optimizer is None:
        return []
    if isinstance(optimizer, torch.optim.Optimizer):
        return [optimizer]
    return list(optimizer)


def _step_noter(snapshot_ref, index: int):
    """An optimizer step hook that tells the snapshot (held weakly) its optimizer ran."""
    def note(optimizer, args, kwargs):
        snapshot = snapshot_ref()
        if snapshot is not None:
            snapshot._stepped[index] = True
    return note


def _remove_hooks(handles) -> None:
    for handle in handles:
        handle.remove()


# Param-group values that hold no tensor of their own: numbers, flags, names, and the
# "params" list (the parameters, which the snapshot copies anyway).
_PLAIN = {float, int, bool, str, type(None), list}


class Snapshot:
    """Pre-step copy of everything one step can change: parameters, buffers,
    gradients, optimizer state and hyperparameters, schedulers and the RNG.

    ``take(full=False)`` leaves out the parameters and the optimizer state, the
    bulk of it: the guard then copies one optimizer's parameters and state with
    ``take_optimizer`` just before that optimizer's update, and only when it
    cannot show the update is harmless. ``restore`` puts back what was taken.

    Each snapshot re-reads what it copies, so it follows what the step really
    touches: a buffer the module rebinds (``self.buf = ...``), optimizer state that is
    replaced rather than updated in place (LBFGS), state entries that appear or
    vanish, gradients that come and go. Restoring puts the very objects the snapshot
    found back in their places, with their values as they were. The copies are one
    fused copy, reused while what is copied keeps its layout (the same buffers and
    optimizer tensors, gradients copied for the same parameters); anything else
    allocates new copies.

    Gradients: a step accumulates into the gradients it finds, or clears them first
    (zero_grad). A gradient that one of the guard's optimizers has applied since the
    last snapshot (its step ran) is one the next step clears: adding to it would
    apply it twice. Every other gradient is one that gradient accumulation is still
    building up. So the snapshot copies the gradients of the parameters whose
    optimizer has not stepped since the last snapshot, or that no optimizer of the
    guard updates, and a restore gives those back as copies of their values and the
    applied ones back as None. (Copying every gradient would cost this benchmark's
    small model another 2% a step, and holding the gradient tensors instead would
    keep zero_grad from freeing them, which costs more.) The first snapshot, and the
    one after a restore, copy every gradient. The optimizers' steps are seen through
    a step hook on each, removed when the snapshot goes.

    The modules and the parameters (the model's, and any other tensor an optimizer
    updates) are listed once, when the snapshot is made: a submodule, parameter or
    param group added later is not followed (buffers, rebound or added to a module
    listed then, are).
    """

    def __init__(self, model: torch.nn.Module, optimizers=(), schedulers: Sequence = ()):
        self.model = model
        self.optimizers = _as_list(optimizers)
        self.schedulers = list(schedulers)
        modules = list(model.modules())
        self._params = [p for m in modules for p in m._parameters.values() if p is not None]
        # Tensors an optimizer updates that the model does not hold are snapshotted too.
        in_model = {id(p) for p in self._params}
        self._params += list({id(p): p for opt in self.optimizers for g in opt.param_groups for p in g["params"]
                              if id(p) not in in_model}.values())
        self._param_data = [p.detach() for p in self._params]
        self._buffer_dicts = [m._buffers for m in modules]
        self._buffer_count = -1
        self._holding: list[dict] = []  # the buffer dicts that hold any
        self._buffer_ids: Optional[list] = None
        self._buffer_bindings: list[tuple] = []  # (module's buffer dict, name, tensor)
        self._buffer_data: list[torch.Tensor] = []
        self.float_buffers: list[torch.Tensor] = []  # what the sentinel checks besides parameters
        self._layout = None
        self._kept: list[torch.Tensor] = []  # restored in place from the first len(_kept) copies
        self._saved: list[torch.Tensor] = []
        self._copied: list = []  # positions of the parameters whose gradients were copied
        self._states: list = []  # (optimizer, its state entries), in a full snapshot
        self._groups: list = []  # (optimizer, its param groups' hyperparameters)
        self._partial: list = []  # (tensors, their copies, optimizer, its state entries): take_optimizer
        self._kept_copies: dict = {}  # optimizer index -> (state tensor ids, copies): take_optimizer(keep=True)
        self._schedulers: list = []
        position = {id(p): i for i, p in enumerate(self._params)}
        self._updated_by = [sorted({position[id(p)] for g in opt.param_groups for p in g["params"] if id(p) in position})
                            for opt in self.optimizers]  # per optimizer: the positions of its parameters
        covered = {i for positions in self._updated_by for i in positions}
        self._no_optimizer = [i for i in range(len(self._params)) if i not in covered]
        self._stepped = [False] * len(self.optimizers)  # since the last snapshot
        handles = [opt.register_step_post_hook(_step_noter(weakref.ref(self), i))
                   for i, opt in enumerate(self.optimizers)]
        weakref.finalize(self, _remove_hooks, handles)

    def _read_buffers(self, buffer_ids: list) -> None:
        self._buffer_ids = buffer_ids
        self._buffer_bindings = [(d, name, t) for d in self._buffer_dicts for name, t in d.items() if t is not None]
        self._buffer_data = [t.detach() for _, _, t in self._buffer_bindings]
        self.float_buffers = [t for t in self._buffer_data if t.is_floating_point() and t.numel()]

    def take(self, full: bool = True) -> None:
        # The ids of the buffers the modules hold now: rebinding one changes them.
        count = sum(map(len, self._buffer_dicts))
        if count != self._buffer_count:
            self._buffer_count = count
            self._holding = [d for d in self._buffer_dicts if d]
        buffer_ids = [id(t) for d in self._holding for t in d.values()]
        if buffer_ids != self._buffer_ids:
            self._read_buffers(buffer_ids)
        stepped = self._stepped
        self._stepped = [False] * len(stepped)
        if all(stepped):  # the common case: no gradient left to accumulate into but the unoptimized ones
            candidates = self._no_optimizer
        else:
            candidates = sorted({*self._no_optimizer,
                                 *(i for positions, ran in zip(self._updated_by, stepped) if not ran for i in positions)})
        params = self._params
        self._copied = copied = [i for i in candidates if params[i].grad is not None]
        grads = {i: params[i].grad for i in copied}
        self._states, state_tensors = [], []
        if full:
            for opt in self.optimizers:
                saved, tensors = _state_entries(opt)
                self._states.append((opt, saved))
                state_tensors += tensors
        # Each param group's hyperparameters (a scheduler may write a tensor lr in place).
        self._groups = []
        for opt in self.optimizers:
            groups = list(map(dict, opt.param_groups))
            # Most hyperparameters are plain numbers: only the rest need a closer look.
            for value in [v for g in groups for v in g.values() if type(v) not in _PLAIN]:
                if isinstance(value, torch.Tensor):
                    state_tensors.append(value)
                elif isinstance(value, tuple):  # betas, which may hold tensors
                    state_tensors += [v for v in value if isinstance(v, torch.Tensor)]
            self._groups.append((opt, groups))
        if self.schedulers:
            self._schedulers = [_scheduler_state(s) for s in self.schedulers]
        self._kept = kept = (self._param_data if full else []) + self._buffer_data + state_tensors
        live = kept + [grads[i] for i in copied] if copied else kept
        layout = (full, buffer_ids, copied, [id(t) for t in state_tensors])
        if layout != self._layout:
            self._layout = layout
            self._saved = [t.detach().clone() for t in live]
        elif live:
            torch._foreach_copy_(self._saved, live)
        self._partial = []
        self._rng = torch.default_generator.get_state()
        self._cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None

    def take_optimizer(self, index: int, keep: bool = False) -> None:
        """Copy one optimizer's parameters and state, now (its update is about to
        run). Held until the next take or release, so a restore puts them back.
        ``keep``: hold on to the copies afterwards too, to copy into them next time
        (for a small model, whose copies cost less to keep than to allocate)."""
        opt = self.optimizers[index]
        saved, tensors = _state_entries(opt)
        live = [self._param_data[i] for i in self._updated_by[index]] + tensors
        layout = [id(t) for t in tensors]
        kept = self._kept_copies.get(index)
        if kept is not None and kept[0] == layout:
            copies = kept[1]
            torch._foreach_copy_(copies, live)
        else:
            copies = [t.detach().clone() for t in live]
            if keep:
                self._kept_copies[index] = (layout, copies)
        self._partial.append((live, copies, opt, saved))

    def release(self) -> None:
        """Free the copies take_optimizer made, once the step is known to be good."""
        self._partial = []

    def restore(self) -> None:
        kept = len(self._kept)
        with torch.no_grad():
            if kept:
                torch._foreach_copy_([t.detach() for t in self._kept], self._saved[:kept])
            for live, copies, _, _ in self._partial:
                torch._foreach_copy_([t.detach() for t in live], copies)
        for owner, name, tensor in self._buffer_bindings:
            if owner.get(name) is not tensor:
                owner[name] = tensor
        for param in self._params:
            param.grad = None
        # Copies of the copies, so that a step run after the restore (the replay)
        # cannot write into the snapshot.
        for i, saved in zip(self._copied, self._saved[kept:]):
            self._params[i].grad = saved.clone()
        self._stepped = [False] * len(self._stepped)  # copy every gradient next time
        for opt, saved in self._states + [(opt, saved) for _, _, opt, saved in self._partial]:
            _restore_entries(opt, saved)
        for opt, groups in self._groups:
            for group, values in zip(opt.param_groups, groups):
                group.clear()
                group.update(values)
        for scheduler, state in zip(self.schedulers, self._schedulers):
            _load_scheduler_state(scheduler, state)
        torch.default_generator.set_state(self._rng)
        if self._cuda_rng is not None:
            torch.cuda.set_rng_state_all(self._cuda_rng)


def _state_entries(opt) -> tuple[dict, list]:
    """An optimizer's state, entry by entry: the objects themselves (a list is copied,
    as LBFGS appends to its history in place), and the tensors among them."""
    saved, tensors = {}, []
    for param, state in opt.state.items():
        entry = saved[param] = dict(state)
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors.append(value)
            elif isinstance(value, (list, tuple)):
                if isinstance(value, list):
                    entry[key] = list(value)
                tensors += [v for v in value if isinstance(v, torch.Tensor)]
    return saved, tensors


def _restore_entries(opt, saved: dict) -> None:
    # State created during the failed step (e.g. Adam's moments at step 0) goes away.
    for param in [p for p in opt.state if p not in saved]:
        del opt.state[param]
    for param, entry in saved.items():
        state = opt.state[param]
        state.clear()
        state.update({k: list(v) if isinstance(v, list) else v for k, v in entry.items()})


def float_state(optimizers) -> list[torch.Tensor]:
    """The floating point tensors of the optimizers' state (Adam's moments, momentum
    buffers), for the sentinel."""
    found = []
    for opt in optimizers:
        for state in opt.state.values():
            for value in state.values():
                values = value if isinstance(value, (list, tuple)) else (value,)
                found += [v.detach() for v in values if isinstance(v, torch.Tensor) and v.is_floating_point()
                          and v.numel()]
    return found


def _scaler_stages(scheduler) -> Optional[dict]:
    """A GradScaler's per-optimizer stage (unscaled, stepped, the inf it found), which
    its state_dict leaves out; None for anything else. Without it a restored step
    still reads "unscale_() has already been called" on the next unscale_."""
    stages = getattr(scheduler, "_per_optimizer_states", None)
    return stages if isinstance(scheduler, torch.amp.GradScaler) and isinstance(stages, dict) else None


def _scheduler_state(scheduler) -> tuple:
    stages = _scaler_stages(scheduler)
    return copy.deepcopy(scheduler.state_dict()), (None if stages is None else copy.deepcopy(dict(stages)))


def _load_scheduler_state(scheduler, state: tuple) -> None:
    saved, stages = state
    scheduler.load_state_dict(copy.deepcopy(saved))
    live = _scaler_stages(scheduler)
    if live is not None and stages is not None:
        live.clear()
        live.update(copy.deepcopy(stages))


def _scales(schedulers) -> list:
    """The scale of each enabled GradScaler among the schedulers, as a float."""
    return [s.get_scale() for s in schedulers if isinstance(s, torch.amp.GradScaler) and s.is_enabled()]


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return f"a {type(value).__name__}"


_EXPECTED = "nanlab.guard: the step must return its loss as a one-element tensor, or a tuple (loss, grad_norm[, param_norm])"


def _unpack(out) -> tuple:
    """(loss, grad_norm, param_norm) from what the step returned, or a TypeError that
    says in one line what the guard expects."""
    if isinstance(out, tuple):
        if not 1 <= len(out) <= 3:
            raise TypeError(f"{_EXPECTED}; it returned a tuple of {len(out)}")
        loss, grad_norm, param_norm = (out + (None, None))[:3]
    else:
        loss, grad_norm, param_norm = out, None, None
    if not isinstance(loss, torch.Tensor):
        hint = {float: " (return the tensor, not loss.item())", int: " (return the tensor, not loss.item())",
                dict: " (return the loss entry, e.g. out['loss'])"}.get(type(loss), "")
        raise TypeError(f"{_EXPECTED}; it returned {_describe(loss)}{hint}")
    if loss.numel() != 1:
        raise TypeError(f"{_EXPECTED}; it returned {_describe(loss)} (reduce it first, e.g. loss.mean())")
    for name, norm in (("grad_norm", grad_norm), ("param_norm", param_norm)):
        if norm is not None and not (isinstance(norm, torch.Tensor) and norm.numel() == 1):
            raise TypeError(f"{_EXPECTED}; its {name} is {_describe(norm)}, not a one-element tensor or None")
    return loss, grad_norm, param_norm


def _same_value(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


class _Refused(BaseException):
    """Raised through the user's step by the guard's hook on ``optimizer.step``, so
    that an update from a non-finite loss, gradient or buffer is never made. A
    BaseException, so that an ``except Exception`` in the step lets it through."""

    def __init__(self, quantity: str, loss: Optional[float]):
        super().__init__(quantity)
        self.quantity, self.loss = quantity, loss


class _BackwardRoots:
    """Notes the tensors the step calls ``.backward()`` on (its loss, or a GradScaler's
    scaled loss), so that the check before the update can read them: while the step
    runs, ``torch.Tensor.backward`` is wrapped, and put back when it ends. (A
    TorchFunctionMode would see the same calls, but every other torch call of the
    step would pass through Python too: about 6 us each on this CPU, a third of a
    small MLP's step.) A loss handed to ``torch.autograd.backward`` directly is not
    seen; the sentinel still checks it after the step."""

    def __init__(self):
        self.roots: list[torch.Tensor] = []
        self._original = None

    def __enter__(self):
        self._original = original = torch.Tensor.backward
        roots = self.roots

        def backward(tensor, *args, **kwargs):
            roots.append(tensor)
            return original(tensor, *args, **kwargs)

        torch.Tensor.backward = backward
        return self

    def __exit__(self, *exc):
        torch.Tensor.backward = self._original
        self.roots.clear()


_WIDE = {torch.float32, torch.float64}


def _norms(tensors: list[torch.Tensor], one_device: bool) -> list[float]:
    """The L2 norm of each tensor (float32 at least), read with one host sync. A
    non-finite norm flags any NaN or Inf the tensor holds (and, rarely, finite values
    too large to square: an exact check tells those apart)."""
    if all(t.dtype in _WIDE for t in tensors):
        norms = torch._foreach_norm(tensors, 2)  # a fifth faster than with a dtype, on this CPU
    else:  # float16's norm would overflow at 65504
        dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
        norms = torch._foreach_norm(tensors, 2, dtype=dtype)
    if one_device:
        return torch.stack(norms).tolist()
    return [n.item() for n in norms]


def _step_hook(watch_ref, name: str, index: int):
    """An optimizer step hook calling ``watch.<name>(index)``, the watch held weakly."""
    def hook(optimizer, args, kwargs):
        watch = watch_ref()
        if watch is not None:
            getattr(watch, name)(index, args, kwargs)
    return hook


def _signature(optimizer) -> tuple:
    """What changes when an optimizer's state is replaced (load_state_dict), grows (the
    first step) or gets a new param group: running bounds from before are stale."""
    return id(optimizer.state), len(optimizer.state), len(optimizer.param_groups)


# -- The update bound ------------------------------------------------------------
#
# Whether one optimizer update with finite gradients can overflow a parameter or
# the optimizer's state: the proof that lets the guard skip its copy.
#
# Every quantity is an upper bound on the largest |x| of a tensor, per param group, as
# a Python float. The update rules of SGD, Adam, AdamW and RMSprop (not centered) are
# followed one elementwise operation at a time: each intermediate's bound must stay
# below a quarter of the dtype's largest finite value, so that the rounding of a few
# operations (a relative error of 2**-8 at most, in bfloat16) cannot reach it. Sums
# of absolute values bound every sum; a division is bounded only by a denominator
# that cannot be smaller than ``eps`` rounded to the dtype (an ``eps`` that rounds to
# zero proves nothing); the bias corrections are bounded by their smallest value,
# at the first step. What the update writes is then bounded too, and these new
# bounds carry over to the next step without reading the tensors again (the running
# bound). Largest |x| is bounded by an L2 norm, per tensor, when the bounds are
# measured: a pass over the tensors, made only when no running bound is at hand.

# The state tensors each known optimizer keeps, per parameter, that its rule bounds.
_STATE_KEYS = {
    torch.optim.SGD: ("momentum_buffer",),
    torch.optim.Adam: ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"),
    torch.optim.AdamW: ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"),
    torch.optim.RMSprop: ("square_avg", "momentum_buffer", "grad_avg"),
}


def bound_known(optimizer) -> bool:
    """Whether the optimizer's update rule is one this module bounds (its exact class:
    a subclass may change the rule)."""
    return type(optimizer) in _STATE_KEYS


def _number(value) -> float:
    return float(value.detach().cpu()) if isinstance(value, torch.Tensor) else float(value)


_ROUNDED: dict = {}


def _rounded(value: float, dtypes) -> float:
    """``value`` as the group's least precise dtype stores it: eps=1e-8 is 0 in float16."""
    found = []
    for dtype in dtypes:
        key = (value, dtype)
        if key not in _ROUNDED:
            _ROUNDED[key] = torch.tensor(value, dtype=dtype).item()
        found.append(_ROUNDED[key])
    return min(found)


def group_limit(params) -> Optional[float]:
    """A quarter of the largest finite value of the group's narrowest dtype, or None
    for a group this module does not bound (complex or integer parameters)."""
    if not all(p.is_floating_point() for p in params):
        return None
    return min(torch.finfo(p.dtype).max for p in params) / 4


def measure_bounds(optimizer, groups_params) -> list:
    """Bounds of every param group, read from the tensors: {"param": ..., state key:
    ...}. One pass over the parameters and the state, one host sync."""
    keys = _STATE_KEYS[type(optimizer)]
    tensors, slots = [], []
    for g, params in enumerate(groups_params):
        for p in params:
            tensors.append(p.detach())
            slots.append((g, "param"))
            state = optimizer.state.get(p, {})
            for key in keys:
                value = state.get(key)
                if isinstance(value, torch.Tensor) and value.is_floating_point() and value.numel():
                    tensors.append(value.detach())
                    slots.append((g, key))
    bounds = [dict.fromkeys(("param",) + keys, 0.0) for _ in groups_params]
    if tensors:
        dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
        norms = torch.stack([n.to(tensors[0].device) for n in torch._foreach_norm(tensors, 2, dtype=dtype)])
        for (g, key), norm in zip(slots, norms.tolist()):
            bounds[g][key] = max(bounds[g][key], norm if math.isfinite(norm) else math.inf)
    return bounds


def next_bounds(optimizer, group: dict, grad: float, bounds: dict, limit: float, dtypes) -> Optional[dict]:
    """The bounds after one update of this group with gradients of largest |g| at
    most ``grad``, or None when the rule cannot show that every value it computes
    stays below ``limit``."""
    rule = _RULES[type(optimizer)]
    try:
        new, computed = rule(group, grad, bounds, dtypes, type(optimizer) is torch.optim.AdamW)
    except (ZeroDivisionError, OverflowError, ValueError):
        return None
    if all(math.isfinite(v) and v <= limit for v in computed):
        return new
    return None


def _sgd(group, grad, b, dtypes, decoupled):
    lr, mu, damp = abs(_number(group["lr"])), abs(_number(group["momentum"])), abs(_number(group["dampening"]))
    g = grad + abs(_number(group["weight_decay"])) * b["param"]
    computed, new = [g], dict(b)
    step = g
    if mu != 0:
        # The first step clones g; later ones take mu * buf + (1 - dampening) * g.
        buf = new["momentum_buffer"] = mu * b["momentum_buffer"] + max(1.0, abs(1 - damp)) * g
        step = g + mu * buf if group["nesterov"] else buf
        computed += [buf, step]
    new["param"] = b["param"] + lr * step
    return new, computed + [lr * step, new["param"]]


def _adam(group, grad, b, dtypes, decoupled):
    lr, wd = abs(_number(group["lr"])), abs(_number(group["weight_decay"]))
    beta1, beta2 = (_number(x) for x in group["betas"])
    if not (0 <= beta1 < 1 and 0 <= beta2 < 1):
        raise ValueError("betas outside [0, 1)")
    eps = _rounded(_number(group["eps"]), dtypes)
    if eps <= 0:
        raise ValueError("eps rounds to zero")
    param = b["param"]
    if group.get("decoupled_weight_decay", decoupled) or wd == 0:
        param, g = param * max(1.0, abs(1 - lr * wd)), grad
    else:
        g = grad + wd * param
    exp_avg = beta1 * b["exp_avg"] + (1 - beta1) * g
    squared = g * g
    exp_avg_sq = beta2 * b["exp_avg_sq"] + (1 - beta2) * squared
    new = dict(b, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq)
    denominator_sq = exp_avg_sq
    if group["amsgrad"]:
        denominator_sq = new["max_exp_avg_sq"] = max(b["max_exp_avg_sq"], exp_avg_sq)
    # The bias corrections 1 - beta**t are smallest at t = 1.
    denominator = math.sqrt(denominator_sq) / math.sqrt(1 - beta2) + eps
    ratio = exp_avg / eps  # the denominator is at least eps
    step = lr / (1 - beta1) * ratio
    new["param"] = param + step
    return new, [param, g, exp_avg, squared, exp_avg_sq, denominator, ratio, step, new["param"]]


def _rmsprop(group, grad, b, dtypes, decoupled):
    if group["centered"]:
        # square_avg - grad_avg**2 can round below zero, and its square root is NaN.
        raise ValueError("centered")
    lr, alpha, mu = abs(_number(group["lr"])), _number(group["alpha"]), abs(_number(group["momentum"]))
    if not 0 <= alpha <= 1:
        raise ValueError("alpha outside [0, 1]")
    eps = _rounded(_number(group["eps"]), dtypes)
    if eps <= 0:
        raise ValueError("eps rounds to zero")
    g = grad + abs(_number(group["weight_decay"])) * b["param"]
    squared = g * g
    square_avg = alpha * b["square_avg"] + (1 - alpha) * squared
    denominator = math.sqrt(square_avg) + eps
    step = g / eps
    new = dict(b, square_avg=square_avg)
    computed = [g, squared, square_avg, denominator, step]
    if mu > 0:
        step = new["momentum_buffer"] = mu * b["momentum_buffer"] + step
        computed.append(step)
    new["param"] = b["param"] + lr * step
    return new, computed + [lr * step, new["param"]]


_RULES = {torch.optim.SGD: _sgd, torch.optim.Adam: _adam, torch.optim.AdamW: _adam, torch.optim.RMSprop: _rmsprop}


# Parameters under this many bytes are copied before each update instead of proven
# finite: on the 15-tensor MLP of benchmarks/tracer_overhead.py the copy and a fused
# flag cost less than the norms and the proof.
COPY_BELOW_BYTES = 1 << 20


class _UpdateWatch:
    """The guard's default mode: checks each update before it is made, and copies an
    optimizer's parameters and state only when it cannot prove the update harmless.

    A hook on each optimizer's ``step`` reads, with one host sync, the norm of every
    gradient, every floating point buffer and the loss the step called backward on. If any is non-finite, the hook raises
    :class:`_Refused` through the step, so the update is never made and the
    parameters and optimizer state need no restore. Otherwise, for the one optimizer
    of a guard with a known update rule (the update bound, above), it shows
    from the gradient norms and a running bound on the parameters and state that the
    update cannot overflow them; when it cannot (or the optimizer is unknown, takes
    a closure, is one of several, or a parameter was written outside its step), it
    copies that optimizer's parameters and state first, and the sentinel checks them
    after the step.
    """

    def __init__(self, snapshot: Snapshot, model_params: list):
        self.snapshot = snapshot
        self.optimizers = snapshot.optimizers
        self.params = snapshot._params
        self.model_params = model_params
        self.check_loss = not _scales(snapshot.schedulers)  # a GradScaler's backward is of the scaled loss
        self.bounds: list = [None] * len(self.optimizers)  # per optimizer: per group bounds, or None
        self.signatures: list = [None] * len(self.optimizers)
        self.fallback: Optional[str] = None  # why every later step takes the full snapshot
        self.active = False
        self._updates = [{id(p) for g in opt.param_groups for p in g["params"]} for opt in self.optimizers]
        # Sparse gradients (an embedding with sparse=True) and complex ones are not
        # for the fused norm: such a model is copied before each update.
        self._dense = (all(p.is_floating_point() and p.layout == torch.strided for p in self.params)
                       and not any(getattr(m, "sparse", False) is True for m in snapshot.model.modules()))
        self._one_device = len({p.device for p in self.params}) <= 1
        # A small model is copied before each update rather than proven: the copy
        # costs less than the norms, and undoes even an update the step raises after.
        self._small = sum(p.numel() * p.element_size() for p in self.params) < COPY_BELOW_BYTES
        self._flag: Optional[torch.Tensor] = None  # the fused flag of _flag_before, and its scale of 1
        self._groups: dict = {}  # optimizer index -> (signature, [(limit, dtypes)] per group)
        self._last_versions: Optional[list] = None
        self.proven: set = set()
        self.copied: set = set()
        ref = weakref.ref(self)
        handles = [h for i, opt in enumerate(self.optimizers)
                   for h in (opt.register_step_pre_hook(_step_hook(ref, "before", i)),
                             opt.register_step_post_hook(_step_hook(ref, "after", i)))]
        weakref.finalize(self, _remove_hooks, handles)

    def _versions(self) -> list:
        return [p._version for p in self.params]

    @contextmanager
    def watching(self):
        self.proven, self.copied, self.pending = set(), set(), {}
        self.grads_checked = False
        self.written_outside = False
        self.versions = self._versions()
        if self.versions != self._last_versions:
            self.bounds = [None] * len(self.optimizers)  # written since the last step: measure again
        self.roots = _BackwardRoots()
        self.active = True
        try:
            with self.roots:
                yield
        finally:
            self.active = False
            now = self._versions()
            if now != self.versions:
                self.written_outside = True
            self._last_versions = now
            if self.written_outside and self.fallback is None:
                self.fallback = "a parameter was written outside optimizer.step()"

    def before(self, index: int, args, kwargs) -> None:
        if not self.active:
            return
        if self._versions() != self.versions:
            self.written_outside = True
        opt = self.optimizers[index]
        # Every gradient, not only this optimizer's: once the update is made, a bad
        # gradient found after it could not be undone.
        with_grad = [p for p in self.params if p.grad is not None]
        grads = [p.grad for p in with_grad]
        closure = args[1] if len(args) > 1 else kwargs.get("closure")  # args[0] is the optimizer
        if closure is not None or not self._dense:
            self._copy(index)  # the closure makes its own gradients: nothing to check before
            return
        if self._small and self._one_device:
            self._flag_before(grads)
            self.grads_checked = True
            self.snapshot.take_optimizer(index, keep=True)
            self.copied.add(index)
            return
        grad_norms = self._check_before(grads)
        self.grads_checked = True
        if (len(self.optimizers) == 1 and self.fallback is None and not self.written_outside
                and bound_known(opt)):
            largest = {id(p): n for p, n in zip(with_grad, grad_norms)}
            new = self._prove(index, opt, largest)
            if new is not None:
                self.pending[index] = new
                self.proven.add(index)
                return
        self._copy(index)

    def after(self, index: int, args, kwargs) -> None:
        if not self.active:
            return
        self.bounds[index] = self.pending.pop(index, None)
        self.signatures[index] = _signature(self.optimizers[index])
        self.versions = self._versions()

    def _copy(self, index: int) -> None:
        self.snapshot.take_optimizer(index)
        self.copied.add(index)

    def _flag_before(self, grads: list) -> None:
        """_check_before for a small model: one fused non-finite flag, no norms."""
        roots = [r.detach() for r in self.roots.roots] if self.check_loss else []
        tensors = [t for t in grads + self.snapshot.float_buffers + roots if t.is_floating_point()]
        if not tensors:
            return
        if self._flag is None:
            self._flag, self._one = torch.zeros(1, device=tensors[0].device), torch.ones(1, device=tensors[0].device)
        torch._amp_foreach_non_finite_check_and_unscale_(tensors, self._flag, self._one)
        if self._flag.item():
            self._flag.zero_()  # the fused check only ever sets it
            for quantity, group in (("loss", roots), ("gradients", grads), ("buffers", self.snapshot.float_buffers)):
                if not _all_finite(group):
                    raise _Refused(quantity, self._loss(roots))

    def _check_before(self, grads: list) -> list[float]:
        """The norm of each gradient; raises _Refused if the loss, a gradient or a
        buffer is non-finite."""
        roots = [r.detach() for r in self.roots.roots] if self.check_loss else []
        buffers = self.snapshot.float_buffers
        tensors = grads + buffers + roots
        norms = _norms(tensors, self._one_device) if tensors else []
        grad_norms, buffer_norms, root_norms = (norms[:len(grads)], norms[len(grads):len(grads) + len(buffers)],
                                                norms[len(grads) + len(buffers):])
        if not all(map(math.isfinite, root_norms)):
            raise _Refused("loss", self._loss(roots))
        if not _all_finite([g for g, n in zip(grads, grad_norms) if not math.isfinite(n)]):
            raise _Refused("gradients", self._loss(roots))
        if not _all_finite([b for b, n in zip(buffers, buffer_norms) if not math.isfinite(n)]):
            raise _Refused("buffers", self._loss(roots))
        return grad_norms

    @staticmethod
    def _loss(roots: list) -> Optional[float]:
        """The loss, read back only for a refused step: the one tensor backward ran on."""
        return float(roots[0].double()) if len(roots) == 1 and roots[0].numel() == 1 else None

    def _prove(self, index: int, opt, grad_norms: dict) -> Optional[list]:
        """Next bounds for every param group if the update provably stays finite, else
        None. Running bounds first; measured ones if those are too loose."""
        groups = opt.param_groups
        signature = _signature(opt)
        running = self.bounds[index] if self.signatures[index] == signature else None
        cached = self._groups.get(index)
        if cached is None or cached[0][1:] != signature[1:]:
            cached = self._groups[index] = (signature, [(group_limit(g["params"]),
                                                         {p.dtype for p in g["params"]}) for g in groups])
        for bounds in ([running] if running is not None else []) + [None]:
            if bounds is None:
                bounds = measure_bounds(opt, [g["params"] for g in groups])
            new = []
            for group, group_bounds, (limit, dtypes) in zip(groups, bounds, cached[1]):
                if limit is None:
                    return None
                grad = max(map(grad_norms.get, map(id, group["params"]), repeat(0.0)), default=0.0)
                found = next_bounds(opt, group, grad, group_bounds, limit, dtypes)
                if found is None:
                    break
                new.append(found)
            else:
                return new
        return None

    def unchecked(self) -> dict:
        """What the sentinel still checks after the step: the gradients, unless they
        were checked before an update, the parameters no proven update covers, and
        the state of the optimizers whose update was not proven."""
        if self.written_outside:
            return dict(state=float_state(self.optimizers))
        proven = set().union(*(self._updates[i] for i in self.proven))
        return dict(grads_of=[] if self.grads_checked else None,
                    params=[p for p in self.model_params if id(p) not in proven],
                    state=float_state([self.optimizers[i] for i in sorted(self.copied)]))

    def forget(self) -> None:
        """After a restore: the running bounds describe a state that is gone."""
        self.bounds = [None] * len(self.optimizers)
        self._last_versions = None


SNAPSHOT_MODES = ("auto", "always")


class Guard:
    """``guard(step_fn, model, optimizer, schedulers, snapshot)``: see :func:`nanlab.guard`."""

    def __init__(self, step_fn: Callable, model: torch.nn.Module,
                 optimizer: Union[torch.optim.Optimizer, Sequence[torch.optim.Optimizer], None] = None,
                 schedulers: Sequence = (), snapshot: str = "auto"):
        if snapshot not in SNAPSHOT_MODES:
            raise ValueError(f"nanlab.guard: snapshot={snapshot!r} is not allowed; use one of "
                             f"{', '.join(map(repr, SNAPSHOT_MODES))}")
        self.step_fn, self.model, self.optimizer = step_fn, model, optimizer
        self.optimizers = _as_list(optimizer)
        self.snapshot = Snapshot(model, self.optimizers, schedulers)
        model_params = list(model.parameters())
        self._sentinel = Sentinel(model_params)
        # Without an optimizer to hook, any write may happen anywhere: snapshot all.
        self._watch = _UpdateWatch(self.snapshot, model_params) if snapshot == "auto" and self.optimizers else None
        self.step = 0
        self.last: Optional[StepCheck] = None
        self.copied = False  # whether the last step copied parameters or optimizer state

    @property
    def fallback(self) -> Optional[str]:
        """Why this guard copies everything before every step, or None when it copies
        only what an update it cannot prove harmless would change."""
        if self._watch is None:
            return "snapshot='always'" if self.optimizers else "no optimizer to hook"
        return self._watch.fallback

    def __call__(self, *args):
        watch = self._watch if self._watch is not None and self._watch.fallback is None else None
        self.snapshot.take(full=watch is None)
        scales = _scales(self.snapshot.schedulers)
        refused = None
        try:
            if watch is None:
                out = self.step_fn(*args)
            else:
                with watch.watching():
                    out = self.step_fn(*args)
            if type(out) is torch.Tensor and out.numel() == 1:  # the common case, checked fast
                loss, grad_norm, param_norm = out, None, None
            else:
                loss, grad_norm, param_norm = _unpack(out)
        except _Refused as caught:
            refused = caught
        except BaseException as error:
            self._restore_after(watch, error)
            raise
        self.copied = watch is None or bool(watch.copied)
        if refused is not None:
            self.last = check = StepCheck(math.nan if refused.loss is None else refused.loss, math.nan, math.nan,
                                          refused.quantity)
        else:
            unchecked = watch.unchecked() if watch is not None else dict(state=float_state(self.optimizers))
            self.last = check = self._sentinel.check(loss, grad_norm, param_norm, self.snapshot.float_buffers,
                                                     **unchecked)
        if check.bad == "gradients" and self._scaler_skipped(scales):
            # A GradScaler found these infinite gradients, skipped the update and
            # lowered its scale: what it is for, and what unguarded training goes on from.
            check.bad = None
        if check.bad is not None:
            self._fail(check, args, watch, refused)
        self.snapshot.release()
        self.step += 1
        return out

    def _kept_update(self, watch) -> bool:
        """Whether an update ran that the guard proved finite and so did not copy:
        it cannot be undone."""
        return watch is not None and bool(watch.proven)

    def _restore_after(self, watch, error: BaseException) -> None:
        if self._kept_update(watch):
            error.add_note(f"nanlab.guard: step {self.step} raised after an update it had proven finite and "
                           f"not copied: the update is kept. Raise before optimizer.step(), or use "
                           f"snapshot='always', to have it undone.")
            self.snapshot.release()
            watch.forget()
            return
        self.snapshot.restore()
        if watch is not None:
            watch.forget()

    def _fail(self, check: StepCheck, args, watch, refused: Optional[_Refused]):
        kept = refused is None and self._kept_update(watch)
        if not kept:
            self.snapshot.restore()
        if watch is not None:
            # The replay runs the whole step, update included: copy what it changes.
            self.snapshot.take()
            watch.forget()
        try:
            seen = replay(self.step_fn, *args, watch=(self.model, *self.optimizers))
        finally:
            self.snapshot.restore()  # even if the replay is interrupted
            self.snapshot.release()
        if kept:
            warnings.warn(f"nanlab.guard: step {self.step} went non-finite ({check.bad}) after an update the guard "
                          f"had proven finite and not copied, so the parameters and optimizer state are left as "
                          f"that update made them, and the replay started from there. Use snapshot='always' to "
                          f"have such a step undone.", RuntimeWarning, stacklevel=3)
        elif refused is None or refused.loss is not None:
            self._warn_if_replay_differs(check, seen)
        raise NonFiniteError(self.step, check.bad, seen.first)

    def _scaler_skipped(self, scales_before: list) -> bool:
        """Whether a GradScaler lowered its scale this step (so skipped the update),
        with every parameter and buffer still finite."""
        after = _scales(self.snapshot.schedulers)
        return (any(a < b for a, b in zip(after, scales_before)) and _all_finite(self.snapshot._params)
                and _all_finite(self.snapshot.float_buffers))

    def _warn_if_replay_differs(self, check: StepCheck, seen) -> None:
        """The replay is only the failed step if the step depends on nothing but its
        arguments and the state the guard restores."""
        if seen.error is not None:
            replayed = f"raised {type(seen.error).__name__}: {seen.error}"
        else:
            loss = seen.returned[0] if isinstance(seen.returned, tuple) and seen.returned else seen.returned
            value = float(loss.detach().double()) if isinstance(loss, torch.Tensor) and loss.numel() == 1 else math.nan
            if _same_value(value, check.loss):
                return
            replayed = f"returned loss {value}"
        warnings.warn(f"nanlab.guard: step {self.step} returned loss {check.loss}, but its replay {replayed}: the "
                      f"step depends on more than its arguments (a batch pulled from an iterator, say), so the "
                      f"traced event may not be what broke it. Pass the batch to the guarded step as arguments.",
                      RuntimeWarning, stacklevel=3)


def guard(step_fn: Callable, model: torch.nn.Module,
          optimizer: Union[torch.optim.Optimizer, Sequence[torch.optim.Optimizer], None] = None,
          schedulers: Sequence = (), snapshot: str = "auto") -> Guard:
    """Wrap one training step (forward, backward, optimizer step; returns the loss).

    The returned callable checks the loss, the gradients and the buffers before each
    optimizer update, and refuses an update they would spoil; it copies an
    optimizer's parameters and state only before an update it cannot prove finite
    (``snapshot="always"``: before every step), and runs the sentinel after each
    step, optimizer state included. At the first non-finite
    step it restores the model, its gradients, the optimizers and the schedulers to
    their state before that step, replays the step once under the exact tracer, and
    raises NonFiniteError carrying the step number, the quantity the sentinel saw and
    the tracer's Event. A step that raises its own exception is restored and the
    exception re-raised; an update the guard proved finite, and so did not copy,
    is kept when the step fails after it (a note on the exception, or a warning,
    says so). ``guard.copied`` says whether the last step copied parameters or
    optimizer state, and ``guard.fallback`` why every step is copied, if it is.

    ``step_fn`` takes its batch as arguments, ``guarded(x, y)``: the replay calls it
    again with the same arguments, and a step that draws its batch from an iterator
    would trace another batch (the guard warns when the replay's loss differs). It
    returns the loss as a one-element tensor, or ``(loss, grad_norm)`` or ``(loss,
    grad_norm, param_norm)`` to spare the sentinel those norms. ``optimizer`` may be
    one optimizer or a list; ``schedulers``: LR schedulers, or anything else with
    ``state_dict()`` and ``load_state_dict()`` that the step advances (a GradScaler).
    Build the guard after the model is on its device and dtype: the snapshot holds
    on to the modules it finds then.
    """
    return Guard(step_fn, model, optimizer, schedulers, snapshot)
