"""The exact tracer: run code under a TorchDispatchMode and name the first op whose
non-finite output reached something that matters.

What it reports for that op (an :class:`Event`): the aten op, the phase (forward,
backward, optimizer or update), the module path, the user's source line, the kind
(nan or inf), the largest |x| among the op's inputs, and the origin: ``op`` when this
op made the value non-finite, ``input`` when a NaN or +Inf came in from outside the
traced code (bad data or already-bad parameters).

The rules, in the order the tracer applies them to each op's output (each names the
method of :class:`Provenance` that applies it):

- **Carried** (``_carried``; ``carried`` for ops that only carry). A non-finite value made from an earlier event's non-finite value
  belongs to that event; it is not a new one.
- **From outside** (``_from_outside``). A NaN or +inf in an input that no traced op made is an event
  with origin ``input`` at the first op that reads it.
- **Masks** (``_masks_from_inputs``, ``_uncovered``). Only -inf that derives from a mask is a mask: the infinities that
  ``masked_fill``, ``full``, ``where`` and the other constant writers write (not
  ``index_put_`` with ``accumulate=True`` or ``scatter`` with ``reduce``: they sum
  into their target, and an overflow there is theirs), a -inf
  that enters from outside the trace, and whatever flows from these with its sign
  kept. A NaN, or an infinity of a sign that no input's mask held, is made by the op
  (origin ``op``): a softmax over a fully masked row (NaN), ``exp`` overflowing next
  to a masked entry (+inf), ``nll_loss`` picking a masked class (+inf from a -inf
  mask), ``neg`` of a mask. An overflow to -inf inside a tensor that already holds a
  -inf mask cannot be told from the mask and is taken as part of it.

Each event is a candidate. ``first`` (``finish``, ``read_out``) is the earliest one whose value *reached*
something that matters; the rest go to ``transient``, in order. A value reaches
something when, at the end of the block, it is held by a parameter, a buffer, a
gradient or optimizer state of a module or optimizer the block ran; or when it is
read back to the host (``.item()``); or when nothing inside the block read it after
it was made (the loss, a result the block returns or drops, a gradient autograd
stored). An infinity that a later op absorbs (``x / inf``, ``masked_fill`` over it,
``clamp`` followed by a finite op) and that nothing above holds is transient: the
backward of ``atan2`` at (0, 0) and of ``std`` on a constant input each make one.

Which op made which value is followed per storage: a view, an in-place write and
the copy autograd saves for the backward all share their tensor's storage. The
storage is tracked by its Python object, held weakly, so a freed storage's memory
that a new tensor reuses starts clean.

Every argument an op writes is checked, not only its output: the schema's
``Tensor(a!)`` arguments, and the running statistics that the batch-norm kernels
update without declaring it.

Backward events also carry the autograd node (``SqrtBackward0``, or a custom
Function's ``MyFnBackward``) and the forward op that created it, matched through
autograd's sequence numbers, so that the module and source line point at the
forward code the user wrote. The tracer sees only the ops of the thread that entered
it: a backward whose forward it never saw names its forward op as ``? (forward ran
before the block or on a thread the tracer does not trace)``, and a match made while
another thread ran modules is marked unsure, since autograd numbers nodes per thread.

Both modes run every op through one path, ``Tracer.__torch_dispatch__``, which
records it for the rules (``Provenance.feed``); the mode decides only when values are
read back. Where an op ran, and the Event that names it, come from :mod:`nanlab.debug.attribution`;
the mode that checks with one host sync instead of one per op is :mod:`nanlab.debug.deferred`.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

from nanlab.debug.attribution import OpLocator
from nanlab.debug.deferred import DeferredMode, stored_values
from nanlab.lab.result import Event

__all__ = ["Event", "Tracer", "Replay", "trace", "replay"]

# Ops whose job is to write a chosen constant: an infinity they write is a mask. An
# overload that reduces into its target (scatter's ``reduce``) and a call that
# accumulates (index_put with ``accumulate=True``) compute what they write, so are
# no constant writers (see ``_plan`` and ``_writes_constants``).
_MASK_WRITERS = {
    "masked_fill", "masked_fill_", "full", "full_like", "new_full", "fill", "fill_",
    "where", "scalar_tensor", "index_put", "index_put_", "lift_fresh", "lift_fresh_copy",
    "masked_scatter", "masked_scatter_", "scatter", "scatter_", "constant_pad_nd",
}
# Ops that read their tensor inputs for shape, dtype and device only: their output
# holds nothing of the inputs' values.
_SHAPE_ONLY = {"empty_like", "zeros_like", "ones_like", "full_like", "new_empty", "new_zeros",
               "new_ones", "new_full", "new_empty_strided", "rand_like", "randn_like", "randint_like"}
# Ops whose output is finite whatever they are given, so are never checked. (empty*
# may hold stale bits that nothing reads before overwriting.)
_WRITE_FINITE = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided",
                 "zeros", "zeros_like", "new_zeros", "ones", "ones_like", "new_ones", "zero_"}
# Ops that map finite inputs to finite outputs and keep an infinity's sign, so that a
# new event never starts here and they are not checked. Their outputs carry what
# their inputs held. (Casts stay checked: float32 -> float16 is where fp16 overflow
# happens. neg and abs are checked: they turn a -inf mask into +inf.)
_CARRIERS = {"clone", "tanh", "sigmoid", "relu", "relu_", "threshold_backward", "hardtanh", "sign",
             "clamp", "clamp_min", "clamp_max", "maximum", "minimum", "gather", "index_select", "cat",
             "stack", "sort", "topk", "amax", "amin", "max", "min", "leaky_relu"}
# Ops that hand a tensor's value to Python.
_READOUTS = {"_local_scalar_dense"}
# Ops that update their running statistics in place although their schema does not
# mark them written: {op: (positions written, position of the ``training`` flag or None)}.
_UNDECLARED_WRITES = {
    "native_batch_norm": ((3, 4), 5),
    "cudnn_batch_norm": ((3, 4), 5),
    "miopen_batch_norm": ((3, 4), 5),
    "batch_norm_update_stats": ((1, 2), None),
}

# An output's content: (holds NaN, holds +inf, holds -inf).
FINITE = (False, False, False)
# Readings, (content, largest |x|), that the tracer knows without measuring, in either
# mode: a write its mode found finite, and an input whose content the rules do not need.
FINITE_READING = (FINITE, None)
UNMEASURED = (None, None)


def _is_inexact(t) -> bool:
    """Whether the tracer checks a tensor: floating point or complex (``log`` of a
    complex zero is -inf), and not empty."""
    return isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex()) and t.numel() > 0


def _inexact_tensors(tree) -> list[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        return [tree] if _is_inexact(tree) else []
    return [t for t in tree_leaves(tree) if _is_inexact(t)]


def _is_finite_fast(t: torch.Tensor) -> bool:
    """One reduction on the common finite path; a sum that overflowed on finite values
    falls through to the exact check."""
    v = stored_values(t)
    # Half types accumulate in float32 so that a sum of finite values rarely overflows.
    total = v.sum(dtype=torch.float32) if v.element_size() < 4 else v.sum()
    return math.isfinite(total.item()) or _content(t) == FINITE


def _measure(t: torch.Tensor) -> tuple:
    """(content, largest |x|) of an input, for judging an op and describing it."""
    return (FINITE if _is_finite_fast(t) else _content(t)), _absmax(t)


def _content(t: torch.Tensor) -> tuple:
    """(holds NaN, holds +inf, holds -inf), exactly."""
    v = stored_values(t)
    return bool(v.isnan().any()), bool((v == math.inf).any()), bool((v == -math.inf).any())


def _absmax(t: torch.Tensor) -> float:
    """Largest |x|, NaN ignored."""
    return stored_values(t).detach().abs().nan_to_num(nan=0.0, posinf=math.inf).max().item()


def _kind(content) -> str:
    return "nan" if content[0] else "inf"


class _Storages:
    """A number for each storage, stable while the storage lives and never given to
    another one: a freed storage's memory that a new tensor reuses gets a new number.
    Tensors without a storage (sparse) are numbered themselves."""

    def __init__(self):
        self._numbers = WeakIdKeyDictionary()
        self._next = 0

    def key(self, t: torch.Tensor) -> int:
        owner = t.untyped_storage() if t.layout == torch.strided else t
        number = self._numbers.get(owner)
        if number is None:
            number = self._numbers[owner] = self._next
            self._next += 1
        return number


@dataclass
class _Held:
    """What the rules remember of one storage's non-finite values: the event whose bad
    value it holds (None for none), the signs of infinity it holds as masks, and
    whether an op has read its value since it was written. A storage holding only -inf
    masks is not remembered: an unremembered -inf is taken as a mask anyway."""

    event: Optional[int]
    masks: frozenset
    read: bool = False


@dataclass
class Provenance:
    """The rules (see the module docstring) applied to one op at a time, in the order the
    ops ran. Immediate mode feeds it as the ops run; deferred mode feeds it the same
    ops from its records after its one sync, so both modes reach the same verdicts.

    Keys are storage numbers from :class:`_Storages`; a content is a
    (nan, +inf, -inf) triple, or None where it was not measured."""

    make_event: Callable  # (describe, kind, origin) -> Event; describe() -> (op name, OpContext, absmax)
    held: dict = field(default_factory=dict)  # storage key -> _Held
    events: list = field(default_factory=list)
    reached: set = field(default_factory=set)

    def feed(self, record: tuple, resolve: Callable) -> None:
        """Apply the rules to one recorded op. Both modes record ops the same way (see
        ``Tracer.__torch_dispatch__``); ``resolve`` turns a mode's reading of a tensor
        into (content, largest |x|). The records:

        - ``("checked", name, where, groups, writer)``: ``where()`` gives the OpContext;
          groups as :meth:`checked` takes them, with readings for contents;
        - ``("carried", read_keys, write_keys)`` and ``("finite", write_keys)``;
        - ``("read_out", key, reading)``."""
        kind = record[0]
        if kind == "checked":
            _, name, where, groups, writer = record
            fed = [([(k, resolve(r)[0]) for k, r in reads], [(k, resolve(r)[0], partial) for k, r, partial in writes])
                   for reads, writes in groups]

            def describe():
                absmax = max((a for reads, _ in groups for _, r in reads if (a := resolve(r)[1]) is not None),
                             default=None)
                return name, where(), absmax

            self.checked(describe, fed, writer)
        elif kind == "carried":
            self.carried(record[1], record[2])
        elif kind == "finite":
            self.wrote_finite(record[1])
        else:
            self.read_out(record[1], resolve(record[2])[0])

    def checked(self, describe, groups, writer: bool) -> None:
        """An op whose outputs were measured. ``groups``: [(reads, writes)], reads
        [(key, content)] of the inputs as they were when it ran, writes [(key,
        content, partial)] of what it wrote (``partial``: a view into a larger storage).
        A ``_foreach_`` op has one group per list position; any other op has one."""
        made = None  # an op reports at most one event, however many tensors it spoiled
        for reads, writes in groups:
            for key, _ in reads:
                self._mark_read(key)
            for key, content, partial in writes:
                if content == FINITE:
                    if not partial:
                        self.held.pop(key, None)
                    continue
                event, masks, origin = self._judge(content, reads, writer)
                if origin is not None:
                    if made is None:
                        self.events.append(self.make_event(describe, _kind(content), origin))
                        made = len(self.events) - 1
                    event = made
                self._hold(key, event, masks, partial)

    def carried(self, read_keys, write_keys) -> None:
        """An unchecked op whose outputs hold what its inputs held (see _CARRIERS)."""
        event, masks = None, frozenset()
        for key in read_keys:
            held = self._mark_read(key)
            if held is not None:
                masks |= held.masks
                if held.event is not None and (event is None or held.event < event):
                    event = held.event
        for key in write_keys:
            self._hold(key, event, masks, partial=False)

    def wrote_finite(self, write_keys) -> None:
        for key in write_keys:
            self.held.pop(key, None)

    def read_out(self, key, content) -> None:
        """A value handed to Python (``.item()``): if it is an event's bad value, that
        event reached the host."""
        held = self._mark_read(key)
        if held is not None and held.event is not None and content is not None and self._uncovered(content, held.masks):
            self.reached.add(held.event)

    def finish(self, persistent: Callable) -> tuple[Optional[Event], list]:
        """``persistent()`` gives [(key, content)] of the parameters, buffers, gradients
        and optimizer state at the end of the block; it is asked only while some
        storage holds an event's value. Returns (first, transient)."""
        if self.holds_events():
            for key, content in persistent():
                held = self.held.get(key)
                if held is not None and held.event is not None and self._uncovered(content, held.masks):
                    self.reached.add(held.event)
        for held in self.held.values():
            if held.event is not None and not held.read:
                self.reached.add(held.event)  # nothing read it after it was made: a result
        first = min(self.reached) if self.reached else None
        transient = [e for i, e in enumerate(self.events) if i not in self.reached]
        return (self.events[first] if first is not None else None), transient

    def holds_events(self) -> bool:
        return any(h.event is not None for h in self.held.values())

    # -- the rules ---------------------------------------------------------------

    @staticmethod
    def _uncovered(content, masks) -> bool:
        """Whether a content holds a non-finite value its masks do not explain."""
        nan, pos, neg = content
        return nan or (pos and "+" not in masks) or (neg and "-" not in masks)

    def _mark_read(self, key) -> Optional[_Held]:
        held = self.held.get(key)
        if held is not None:
            held.read = True
        return held

    def _hold(self, key, event, masks, partial: bool) -> None:
        if partial and key in self.held:
            # A write into part of a storage leaves the rest of it as it was.
            old = self.held[key]
            if event is None or (old.event is not None and old.event < event):
                event, read = old.event, old.read
            else:
                read = False
            self.held[key] = _Held(event, old.masks | masks, read)
        elif event is not None or "+" in masks:
            self.held[key] = _Held(event, masks)
        else:
            self.held.pop(key, None)

    def _judge(self, content, reads, writer: bool):
        """(earlier event carried or None, masks the output holds, origin of a new
        event or None) for one non-finite output: the rules Carried, From outside and
        Masks of the module docstring, in that order."""
        unexplained, masks = self._unexplained_inputs(reads)
        masks |= self._masks_from_inputs(unexplained, writer)
        present = _signs(content[1], content[2])
        carried = self._carried(unexplained)
        if carried is not None:
            # Only the masks that came in stay masks: the carried value is no constant.
            return carried, masks & present, None
        if self._from_outside(unexplained, writer):
            return None, masks & present, "input"
        if writer:
            masks |= {"+", "-"}  # the infinities a constant writer writes are masks
        return None, masks & present, ("op" if self._uncovered(content, masks) else None)

    def _unexplained_inputs(self, reads) -> tuple[list, frozenset]:
        """The inputs holding a non-finite value that their own masks do not explain, as
        [(event held or None, nan, +inf, -inf)], and the signs of the masks the inputs
        hold (unmeasured and finite inputs bring nothing)."""
        unexplained, masks = [], frozenset()
        for key, c in reads:
            if c is None or c == FINITE:
                continue
            nan, pos, neg = c
            held = self.held.get(key)
            held_masks = held.masks if held is not None else frozenset()
            masks |= _signs(pos, neg) & held_masks
            pos, neg = pos and "+" not in held_masks, neg and "-" not in held_masks
            if nan or pos or neg:
                unexplained.append((held.event if held is not None else None, nan, pos, neg))
        return unexplained, masks

    @staticmethod
    def _carried(unexplained) -> Optional[int]:
        """Carried: the earliest event whose bad value an input holds."""
        return min((event for event, *_ in unexplained if event is not None), default=None)

    @staticmethod
    def _is_outside_value(nan, pos, writer: bool) -> bool:
        # A constant writer handed +inf writes it as a constant (the Masks rule).
        return nan or (pos and not writer)

    @classmethod
    def _from_outside(cls, unexplained, writer: bool) -> bool:
        """From outside: an input holds a NaN or +inf that no traced op made."""
        return any(event is None and cls._is_outside_value(nan, pos, writer) for event, nan, pos, _ in unexplained)

    @classmethod
    def _masks_from_inputs(cls, unexplained, writer: bool) -> frozenset:
        """Masks: a -inf that enters from outside the trace, and an infinity a constant
        writer is handed (the constant it writes)."""
        masks = frozenset()
        for event, nan, pos, neg in unexplained:
            if event is None and not cls._is_outside_value(nan, pos, writer):
                masks |= _signs(pos, neg)
        return masks


def _signs(pos: bool, neg: bool) -> frozenset:
    """The signs of infinity a (+inf, -inf) pair holds."""
    return frozenset(s for s, present in (("+", pos), ("-", neg)) if present)


@dataclass(frozen=True)
class _Plan:
    """How the tracer treats one op overload, worked out once."""

    kind: str  # view, carrier, finite, checked
    writer: bool  # a constant writer (_MASK_WRITERS), unless it accumulates
    accumulate: Optional[int]  # position of an ``accumulate`` flag that makes a constant writer compute
    shape_only: bool
    readout: bool
    foreach: bool
    writes: tuple  # (position, argument name, also read) of each argument it writes
    training_flag: Optional[int]  # for _UNDECLARED_WRITES: only write when this arg is True


_PLANS: dict = {}


def _plan(func) -> _Plan:
    plan = _PLANS.get(func)
    if plan is None:
        name = func.overloadpacket.__name__
        schema = func._schema
        writes = [(i, a.name, not a.is_out) for i, a in enumerate(schema.arguments)
                  if a.alias_info is not None and a.alias_info.is_write]
        undeclared, flag = _UNDECLARED_WRITES.get(name, ((), None))
        writes += [(i, schema.arguments[i].name, True) for i in undeclared]
        names = [a.name for a in schema.arguments]
        writer = name in _MASK_WRITERS and "reduce" not in names
        accumulate = names.index("accumulate") if writer and "accumulate" in names else None
        if func.is_view:
            kind = "view"
        elif name in _WRITE_FINITE:
            kind = "finite"
        elif name in _CARRIERS:
            kind = "carrier"
        else:
            kind = "checked"
        plan = _PLANS[func] = _Plan(kind, writer, accumulate, name in _SHAPE_ONLY, name in _READOUTS,
                                    name.startswith("_foreach_"), tuple(writes), flag)
    return plan


def _argument(args, kwargs, position: int, name: str):
    return args[position] if position < len(args) else kwargs.get(name)


def _writes_constants(plan: _Plan, args, kwargs) -> bool:
    """Whether this call writes constants: a constant writer that is not told to add
    into its target (``index_put_(..., accumulate=True)`` sums, and its overflow is its own)."""
    return plan.writer and not (plan.accumulate is not None and _argument(args, kwargs, plan.accumulate, "accumulate"))


def _written_arguments(plan: _Plan, args, kwargs) -> list[tuple]:
    """[(tensor, also read)] for each floating point or complex tensor the op writes in place."""
    if not plan.writes:
        return []
    if plan.training_flag is not None and not _argument(args, kwargs, plan.training_flag, "training"):
        return []
    found = []
    for position, name, read in plan.writes:
        for t in _inexact_tensors(_argument(args, kwargs, position, name)):
            found.append((t, read))
    return found


def _written_tensors(written, out) -> list[torch.Tensor]:
    """Every floating point or complex tensor an op wrote: its in-place arguments, then its
    outputs, each once (an in-place op returns the tensor it wrote)."""
    return list({id(t): t for t in [t for t, _ in written] + _inexact_tensors(out)}.values())


def _op_groups(plan: _Plan, args, kwargs, out, written) -> list[tuple]:
    """[(inputs read, tensors written)] of one op: one group for most ops; for a
    ``_foreach_`` op, one per list position, so that a bad value in one parameter's
    update is traced to that parameter's own inputs."""
    write_only = {id(t) for t, read in written if not read}
    reads = [] if plan.shape_only else [t for t in _inexact_tensors((args, kwargs)) if id(t) not in write_only]
    writes = _written_tensors(written, out)
    if not plan.foreach:
        return [(reads, writes)]
    lists = [a for a in (*args, *kwargs.values()) if isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor)]
    if isinstance(out, (list, tuple)) and out:
        lists.append(list(out))
    length = len(lists[0]) if lists else 0
    if not lists or any(len(lst) != length for lst in lists):
        return [(reads, writes)]
    in_lists = {id(t) for lst in lists for t in lst}
    shared = [t for t in reads if id(t) not in in_lists]  # a tensor every position uses (an lr, say)
    written_ids = {id(t) for t in writes}
    groups = []
    for i in range(length):
        column = [lst[i] for lst in lists if _is_inexact(lst[i])]
        groups.append(([t for t in column if id(t) not in write_only] + shared,
                       [t for t in column if id(t) in written_ids]))
    return groups


def _is_partial(t: torch.Tensor) -> bool:
    """Whether ``t`` covers only part of its storage (a view, or a slice of one)."""
    return t.layout == torch.strided and t.untyped_storage().nbytes() != t.numel() * t.element_size()


@dataclass
class Replay:
    """What :func:`replay` saw: the first event and the transient ones, what the step
    returned, and the exception it raised (None if it returned)."""

    first: Optional[Event]
    transient: list
    returned: object = None
    error: Optional[BaseException] = None


class ImmediateMode:
    """Checks each op on the host as it runs and feeds the rules at once: on the CPU
    reading a value back costs nothing. A reading is (content, largest |x|)."""

    def __init__(self, rules: Provenance):
        self._rules = rules

    def following(self) -> bool:
        """Whether the rules hold anything an unchecked op could carry or overwrite."""
        return bool(self._rules.held)

    def maybe_nonfinite(self, tensors) -> set:
        """The ids of those tensors that hold a non-finite value."""
        return {id(t) for t in tensors if not _is_finite_fast(t)}

    def measure(self, t: torch.Tensor) -> tuple:
        return _measure(t)

    def measure_overwritten(self, t: torch.Tensor) -> tuple:
        """An input the op is about to overwrite. (max |x| is finite exactly when x
        is, and is the input's absmax as well: one reduction on the common path.)"""
        top = stored_values(t).detach().abs().amax().item()
        return (FINITE, top) if math.isfinite(top) else (_content(t), _absmax(t))

    def where(self, locate: Callable) -> Callable:
        # The rules run before the op returns, so locate() still sees its stack; it
        # runs only for an op that makes an event.
        return locate

    def record(self, record: tuple) -> None:
        self._rules.feed(record, lambda reading: reading)

    def flush(self) -> None:
        pass  # every op was fed as it ran

    def nonfinite_contents(self, tensors) -> list[tuple]:
        """[(tensor, content)] of those tensors that hold a non-finite value."""
        return [(t, _content(t)) for t in tensors if not _is_finite_fast(t)]


class Tracer(TorchDispatchMode):
    """Checks what every op writes. After the block, ``first`` holds the first Event
    that reached something that matters and ``transient`` the events that did not.

    Every op takes the same path (``__torch_dispatch__``); the mode only decides when
    values are read back. Immediate mode (:class:`ImmediateMode`, the CPU default)
    measures each op as it runs. Deferred mode (:class:`nanlab.debug.deferred.DeferredMode`,
    the CUDA default, or ``defer=True``) keeps the measurements on the device and reads
    them all back with one sync when the block ends. ``watch``: modules and optimizers
    whose state counts as reached even if the block never ran them (the guard passes
    its model and optimizers).
    """

    def __init__(self, defer: Optional[bool] = None, watch=()):
        super().__init__()
        self.defer = defer
        self.first: Optional[Event] = None
        self.transient: list[Event] = []
        self._where = OpLocator()
        self._storages = _Storages()
        self._rules = Provenance(self._make_event)
        self._mode = None  # at the first op: ``defer``, or else whether its tensors are on CUDA
        self._watch = watch

    def __enter__(self):
        self._where.install()
        for thing in self._watch:
            if isinstance(thing, torch.nn.Module):
                self._where.modules_seen.update((id(m), m) for m in thing.modules())
            elif thing is not None:
                self._where.optimizers_seen[id(thing)] = thing
        return super().__enter__()

    def __exit__(self, *exc):
        self._where.remove()
        result = super().__exit__(*exc)
        mode = self._mode or self._pick_mode(())
        mode.flush()
        key = self._storages.key
        self.first, self.transient = self._rules.finish(
            lambda: [(key(t), content) for t, content in mode.nonfinite_contents(self._where.persistent_tensors())])
        return result

    def _pick_mode(self, tensors):
        if self.defer is None:
            self.defer = any(t.is_cuda for t in tensors)
        self._mode = DeferredMode(self._rules) if self.defer else ImmediateMode(self._rules)
        return self._mode

    def _make_event(self, describe, kind, origin) -> Event:
        name, ctx, absmax = describe()
        return self._where.event(name, kind, origin, absmax, ctx)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        plan = _plan(func)
        if plan.kind == "view":  # a view shares its base's storage: nothing new to follow
            return func(*args, **kwargs)
        mode = self._mode or self._pick_mode(_inexact_tensors((args, kwargs)))
        if plan.kind == "checked":
            return self._check(mode, func, plan, args, kwargs)
        out = func(*args, **kwargs)
        if torch._C._current_autograd_node() is None:
            self._where.note_forward_op(func.overloadpacket.__name__, remember=False)
        if mode.following():
            key = self._storages.key
            write_keys = [key(t) for t in _written_tensors(_written_arguments(plan, args, kwargs), out)]
            if plan.kind == "finite":
                mode.record(("finite", write_keys))
            else:
                mode.record(("carried", [key(t) for t in _inexact_tensors((args, kwargs))], write_keys))
        return out

    def _check(self, mode, func, plan, args, kwargs):
        """Run an op whose outputs the rules judge, and record it with the mode's readings."""
        written = _written_arguments(plan, args, kwargs)
        # The values an op overwrites are gone once it has run: measure them first.
        overwritten = {id(t): mode.measure_overwritten(t) for t, read in written if read}
        out = func(*args, **kwargs)
        node = torch._C._current_autograd_node()
        name = func.overloadpacket.__name__
        if node is None:
            self._where.note_forward_op(name)
        key = self._storages.key
        writes = _written_tensors(written, out)
        if not writes:
            if plan.readout and mode.following():
                for t in _inexact_tensors((args, kwargs)):
                    mode.record(("read_out", key(t), mode.measure(t)))
            return out
        spoiled = mode.maybe_nonfinite(writes)
        if not spoiled and not mode.following():
            return out  # the fast path: all it wrote is finite and the rules follow nothing
        readings: dict[int, object] = {}

        def read(t):
            if not spoiled:  # the rules only mark it read: its content is not needed
                return key(t), UNMEASURED
            if id(t) not in readings:
                readings[id(t)] = overwritten[id(t)] if id(t) in overwritten else mode.measure(t)
            return key(t), readings[id(t)]

        def wrote(t):
            return key(t), (mode.measure(t) if id(t) in spoiled else FINITE_READING), _is_partial(t)

        groups = [([read(t) for t in reads], [wrote(t) for t in ws])
                  for reads, ws in _op_groups(plan, args, kwargs, out, written)]
        where = mode.where(lambda: self._where.context(node, [t for t, _ in written]))
        mode.record(("checked", name, where, groups, _writes_constants(plan, args, kwargs)))
        return out


@contextmanager
def trace(defer: Optional[bool] = None):
    """Run a block under the exact tracer; afterwards ``tr.first`` is None or an Event,
    and ``tr.transient`` lists the events whose values never reached anything.

    It never raises because of a NaN: the block runs to its end as it would untraced.
    ``defer`` picks the mode (see Tracer); by default CUDA tensors defer and CPU ones don't.
    """
    tracer = Tracer(defer=defer)
    with tracer:
        yield tracer


def replay(fn, *args, watch=()) -> Replay:
    """Run ``fn(*args)`` to its end under the tracer. An exception it raises is caught
    and kept; the events up to it are judged as if the block had ended there."""
    tracer = Tracer(watch=watch)
    returned, error = None, None
    try:
        with tracer:
            returned = fn(*args)
    except Exception as exc:  # noqa: BLE001 - the step's own failure, handed back to the caller
        error = exc
    return Replay(tracer.first, tracer.transient, returned, error)
