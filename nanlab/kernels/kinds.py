"""Kinds of kernel, declared: the built-in ones and any a kernel author adds.

A ``Kind`` says how a kernel is called and what it should compute, in the spirit of
PyTorch's OpInfo: its positional tensor arguments (``Arg``: a shape in named sizes
and an input domain), its keyword arguments, and a reference, either a float64
torch function (differentiable: autograd gives the reference gradient) or an
elementwise mpmath function (differentiated by mpmath at 50 digits). From that
declaration a user kind gets the cases that break kernels (extremal values of its
domain, large and tiny magnitudes, float16's range), and the checker gives it what
every built-in kind has: all four dtypes, gradient checks, xfail and baselines.
``nanlab.kernels.search`` draws inputs from the same declaration.

    LOGADDEXP = Kind("logaddexp", reference=ref_logaddexp,
                     args=(Arg("a", ("N",), extremes=(-math.inf,)), Arg("b", ("N",), extremes=(-math.inf,))))
    check(my_logaddexp, kind=LOGADDEXP)

The built-in kinds are declared here too (``BUILTIN``), for their domains: their
cases and references stay in the catalogue.
"""
from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Union

import torch

from nanlab.config import options
from nanlab.kernels import catalogue
from nanlab.kernels.catalogue import NEG_INF, REFERENCES, REQUIRED_KEYWORDS, Case

INF = math.inf
# Values that break naive kernels, in the order a search shrinks towards (simplest first):
# exp's overflow in float16 (11.1) and float32 (88.7) and float64 (709.8), sigmoid's and
# exp's underflow (float16 -17.3, float32 -103.9, float64 -745), float16's largest finite
# value (65504), and magnitudes that square to overflow or underflow.
EXTREMAL_VALUES = (0.0, 1.0, -1.0, 12.0, -18.0, 89.0, -104.0, 300.0, 710.0, -746.0, 1e4, -1e4, 6.5e4, -6.5e4,
                   1e-30, -1e-30, 1e-8)
MAX_EXTREMAL_ELEMENTS = 4096  # the cartesian product of an elementwise kind's extremal values stays small


@dataclass(frozen=True)
class Arg:
    """One positional tensor argument: ``shape`` in ints and named sizes ("N", "C"),
    values within [low, high] (either may be infinite: inf itself is then in the
    domain), plus ``extremes``, values outside the interval that belong to it all the
    same (-inf for masked logits). ``integer``: a long tensor (class targets) with
    values in [low, high), where ``high`` may name a size ("C")."""

    name: str
    shape: tuple = ("N",)
    low: float = -1e4
    high: Union[float, str] = 1e4
    extremes: tuple = ()
    integer: bool = False

    def contains(self, value: float) -> bool:
        return value in self.extremes or self.low <= value <= self.high

    def extremal_values(self) -> list:
        """EXTREMAL_VALUES within the domain, the domain's finite edges, then the declared extremes."""
        edges = [float(v) for v in (self.low, self.high) if not isinstance(v, str) and math.isfinite(v)]
        values = [v for v in EXTREMAL_VALUES if self.contains(v)] + edges + list(self.extremes)
        values += [v for v in (INF, -INF) if self.contains(v)]  # an infinite edge that the domain includes
        return list(dict.fromkeys(values))

    def size(self, sizes: dict) -> tuple:
        return tuple(sizes[d] if isinstance(d, str) else int(d) for d in self.shape)


@dataclass(frozen=True)
class Kind:
    """A kind of kernel. ``keywords`` are passed to every case (each one a keyword every
    kernel of the kind must take); a value may be a function of the sizes (a norm's
    ``normalized_shape``). ``keyword_choices`` are the values a search draws from
    (``reduction``: none, sum, mean). ``reference`` is a float64 torch function of the
    arguments and keywords; ``mp_reference`` an elementwise mpmath function of the
    float arguments, used where ``reference`` is None. ``framework_op`` is the
    benchmark that marks a kernel "imprecise" (optional). ``cases`` are hand-written
    Cases added to the generated ones; ``sizes`` the named sizes' defaults."""

    name: str
    args: tuple
    reference: Optional[Callable] = field(default=None, repr=False)
    mp_reference: Optional[Callable] = field(default=None, repr=False)
    keywords: dict = field(default_factory=dict)
    keyword_choices: dict = field(default_factory=dict)
    framework_op: Optional[Callable] = field(default=None, repr=False)
    cases: tuple = ()
    sizes: dict = field(default_factory=lambda: {"N": 8, "C": 5})

    def __post_init__(self):
        if not self.name.isidentifier():
            raise ValueError(f"Kind name {self.name!r} must be an identifier (it names cases and baselines)")
        if not self.args or self.args[0].integer:
            raise ValueError(f"kind {self.name}: the first argument is the one differentiated: a float tensor")
        if (self.reference is None) == (self.mp_reference is None):
            raise ValueError(f"kind {self.name}: give exactly one of reference= and mp_reference=")
        strays = [str(c) for c in self.cases if c.kind != self.name]
        if strays:
            raise ValueError(f"kind {self.name}: cases= holds cases of other kinds ({', '.join(strays)})")

    @property
    def required(self) -> tuple:
        return tuple(self.keywords) + tuple(k for k in self.keyword_choices if k not in self.keywords)

    def keywords_for(self, sizes: dict, chosen: Optional[dict] = None) -> dict:
        words = {k: v(sizes) if callable(v) else v for k, v in self.keywords.items()}
        for k, values in self.keyword_choices.items():
            words.setdefault(k, values[0])
        return {**words, **(chosen or {})}

    @functools.cached_property
    def reference_fn(self) -> Callable:
        """The reference as the checker calls it: ``reference``, or the mpmath one wrapped as a torch function."""
        return self.reference if self.reference is not None else _mp_elementwise(self)

    def case(self, name: str, description: str, tensors: list, keywords: Optional[dict] = None) -> Case:
        """A Case of this kind on given float64 tensors (a search's find, pasted into a test)."""
        fixed = [t.clone() for t in tensors]
        words = dict(keywords if keywords is not None else self.keywords_for(self.sizes))
        return Case(name, self.name, description, lambda g: ([t.clone() for t in fixed], dict(words)),
                    reference_fn=self.reference_fn)

    def generated_cases(self) -> list:
        """The extremal cases every declared kind gets from its domain."""
        made = []
        for name, description, fill in _GENERATORS:
            def build(g, fill=fill):
                sizes = dict(self.sizes)
                tensors = fill(self, g, sizes)
                return tensors, self.keywords_for(sizes)

            probe = fill(self, torch.Generator().manual_seed(0), dict(self.sizes))
            if probe is None:  # the domain holds no such values (a [0, 1] input has no large magnitudes)
                continue
            made.append(Case(name, self.name, description, build, reference_fn=self.reference_fn))
        return made

    def all_cases(self) -> list:
        """The hand-written cases (of this kind: the catalogue finds its reference by the
        kind's name), then the generated ones whose names they do not take."""
        names = {c.name for c in self.cases}
        return list(self.cases) + [c for c in self.generated_cases() if c.name not in names]


# ---------------------------------------------------------------- generated cases

def _integers(arg: Arg, g, sizes) -> torch.Tensor:
    high = sizes[arg.high] if isinstance(arg.high, str) else int(arg.high)
    return torch.randint(int(arg.low), high, arg.size(sizes), generator=g)


def _fill(kind: Kind, g, sizes, draw: Callable) -> Optional[list]:
    """Each float argument from ``draw(arg, g, shape)`` (None where its domain has no such
    values, and the case is skipped when no argument has any), integer ones at random."""
    tensors, any_drawn = [], False
    for arg in kind.args:
        if arg.integer:
            tensors.append(_integers(arg, g, sizes))
            continue
        values = draw(arg, g, arg.size(sizes))
        if values is None:
            values = _random_values(arg, g, arg.size(sizes))
        else:
            any_drawn = True
        tensors.append(values)
    return tensors if any_drawn else None


def _interval(arg: Arg, lo: float, hi: float) -> Optional[tuple]:
    lo, hi = max(lo, arg.low), min(hi, arg.high)
    return (lo, hi) if lo <= hi else None


def _random_values(arg: Arg, g, shape) -> torch.Tensor:
    """Moderate values: uniform over the domain's part within [-3, 3], or over its first
    units where the domain lies beyond that."""
    span = _interval(arg, -3.0, 3.0)
    if span is None:
        span = (arg.low, min(arg.high, arg.low + 6.0)) if arg.low > 3.0 else (max(arg.high - 6.0, arg.low), arg.high)
    lo, hi = span
    return lo + (hi - lo) * torch.rand(shape, generator=g, dtype=torch.float64)


def _magnitudes(lo: float, hi: float, log: bool = False) -> Callable:
    """Values of magnitude lo to hi, of both signs where the domain allows."""

    def draw(arg, g, shape):
        signs = [s for s in (1.0, -1.0) if _interval(arg, *sorted((s * lo, s * hi)))]
        if not signs:
            return None
        u = torch.rand(shape, generator=g, dtype=torch.float64)
        size = torch.exp(math.log(lo) + (math.log(hi) - math.log(lo)) * u) if log else lo + (hi - lo) * u
        pick = torch.randint(0, len(signs), shape, generator=g)
        values = size * torch.tensor(signs, dtype=torch.float64)[pick]
        return values.clamp(arg.low, arg.high)

    return draw


def _extremal_fill(kind: Kind, g, sizes) -> Optional[list]:
    """Every extremal value of each float argument. For an elementwise kind (all float
    arguments of one 1-D shape), every combination of them, so that logaddexp(89, 89)
    and (-inf, -inf) are both there; otherwise each argument cycles through its values."""
    floats = [a for a in kind.args if not a.integer]
    values = [a.extremal_values() for a in floats]
    elementwise = len({a.shape for a in floats}) == 1 and len(floats[0].shape) == 1
    if elementwise and math.prod(len(v) for v in values) <= MAX_EXTREMAL_ELEMENTS:
        columns = list(zip(*itertools.product(*values)))
        sizes[floats[0].shape[0]] = len(columns[0])
        by_arg = dict(zip((a.name for a in floats), columns))
        return [_integers(a, g, sizes) if a.integer else torch.tensor(by_arg[a.name], dtype=torch.float64)
                for a in kind.args]
    tensors = []
    for offset, arg in enumerate(kind.args):
        if arg.integer:
            tensors.append(_integers(arg, g, sizes))
            continue
        pool = torch.tensor(arg.extremal_values(), dtype=torch.float64)
        n = math.prod(arg.size(sizes))
        index = (torch.arange(n) * (offset + 1) + offset) % len(pool)  # a different pairing per argument
        tensors.append(pool[index].reshape(arg.size(sizes)))
    return tensors


_GENERATORS = (
    ("random", "moderate values within the domain",
     lambda kind, g, sizes: _fill(kind, g, sizes, _random_values)),
    ("extremal_values", "every extremal value of the domain (0, +-1, past exp's overflow and underflow in each "
     "dtype, float16's maximum, the domain's edges and extremes), in every combination for an elementwise kind",
     _extremal_fill),
    ("large_magnitude", "|x| ~ U(1e3, 1e4): catches exp and squares that overflow",
     lambda kind, g, sizes: _fill(kind, g, sizes, _magnitudes(1e3, 1e4))),
    ("near_fp16_max", "|x| ~ U(6e4, 6.5e4): at float16's largest finite values",
     lambda kind, g, sizes: _fill(kind, g, sizes, _magnitudes(6e4, 6.5e4))),
    ("tiny_magnitude", "|x| from 1e-30 to 1e-6: catches divisions by values that underflow",
     lambda kind, g, sizes: _fill(kind, g, sizes, _magnitudes(1e-30, 1e-6, log=True))),
)


# ---------------------------------------------------------------- mpmath references

def _mp_elementwise(kind: Kind) -> Callable:
    """A float64 torch function (with backward) from the kind's elementwise mpmath
    reference: each element at 50 digits, its derivative in the first argument by
    mpmath.diff. An element that mpmath cannot evaluate (or differentiate, at an
    infinity) is NaN there: undefined, so any value is accepted."""
    function = kind.mp_reference

    def at(args, derivative: bool) -> float:
        import mpmath

        with mpmath.workdps(50):
            try:
                values = [mpmath.mpf(v) for v in args]
                if derivative:
                    return float(mpmath.diff(lambda a: function(a, *values[1:]), values[0]))
                return float(function(*values))
            except (ValueError, ZeroDivisionError, OverflowError, TypeError):
                return math.nan

    def each(tensors, derivative):
        flat = [t.detach().double().flatten().tolist() for t in tensors]
        return torch.tensor([at(args, derivative) for args in zip(*flat)], dtype=torch.float64).reshape(tensors[0].shape)

    class _Mp(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, *rest):
            ctx.rest = rest
            ctx.save_for_backward(x)
            return each([x, *rest], derivative=False)

        @staticmethod
        def backward(ctx, grad):
            (x,) = ctx.saved_tensors
            return (grad * each([x, *ctx.rest], derivative=True), *(None for _ in ctx.rest))

    def reference(x, *rest, **keywords):
        floats = [t for t in rest if isinstance(t, torch.Tensor) and t.is_floating_point()]
        return _Mp.apply(x, *floats)

    reference.__name__ = f"mp_{kind.name}"
    return reference


# ---------------------------------------------------------------- the built-in kinds and the registry

# The built-in kinds' finite inputs stay within float16's range (65504), so that no dtype turns
# one into +inf, which the catalogue never feeds these kinds (softmax([0, inf]) has no value).
FP16_SAFE = 6.5e4


def _row(name):
    return Kind(name, (Arg("x", ("N", "C"), -FP16_SAFE, FP16_SAFE, extremes=(NEG_INF,)),), REFERENCES[name],
                keywords={"dim": -1})


def _norm(name):
    return Kind(name, (Arg("x", ("N", "C"), -FP16_SAFE, FP16_SAFE),), REFERENCES[name],
                keywords={"normalized_shape": lambda sizes: (sizes["C"],), "eps": 1e-5})


_REDUCTIONS = {"reduction": ("mean", "sum", "none")}
_LOGITS = Arg("logits", ("N", "C"), -FP16_SAFE, FP16_SAFE, extremes=(NEG_INF,))
_LOG_PROBS = Arg("input", ("N", "C"), -FP16_SAFE, 0.0, extremes=(NEG_INF,))
_TARGETS = Arg("target", ("N",), 0, "C", integer=True)
_PROBS = Arg("target", ("N",), 0.0, 1.0)

# Each built-in kind's call, for a search over its inputs; the catalogue holds its cases.
BUILTIN = {kind.name: kind for kind in (
    Kind("cross_entropy", (_LOGITS, _TARGETS), REFERENCES["cross_entropy"], keyword_choices=_REDUCTIONS),
    Kind("binary_cross_entropy", (Arg("input", ("N",), 0.0, 1.0), _PROBS), REFERENCES["binary_cross_entropy"],
         keyword_choices=_REDUCTIONS),
    Kind("binary_cross_entropy_with_logits", (Arg("logits", ("N",), -FP16_SAFE, FP16_SAFE), _PROBS),
         REFERENCES["binary_cross_entropy_with_logits"], keyword_choices=_REDUCTIONS),
    _row("softmax"), _row("log_softmax"), _row("logsumexp"),
    Kind("kl_div", (_LOG_PROBS, Arg("target", ("N", "C"), 0.0, 1.0)), REFERENCES["kl_div"],
         keyword_choices={"reduction": ("batchmean", "sum", "none", "mean")}),
    Kind("nll_loss", (_LOG_PROBS, _TARGETS), REFERENCES["nll_loss"], keyword_choices=_REDUCTIONS),
    Kind("softplus", (Arg("x", ("N",), -1e5, 1e5, extremes=(INF, NEG_INF)),), REFERENCES["softplus"]),
    Kind("log_sigmoid", (Arg("x", ("N",), -1e5, 1e5, extremes=(INF, NEG_INF)),), REFERENCES["log_sigmoid"]),
    _norm("rms_norm"), _norm("layer_norm"),
)}
assert set(BUILTIN) == set(options.KERNEL_KINDS), "BUILTIN must declare every options.KERNEL_KINDS"
for _kind in BUILTIN.values():
    assert set(_kind.required) == set(REQUIRED_KEYWORDS[_kind.name]), _kind.name


def register(kind: Kind) -> Kind:
    """Make a user kind known by name (to cases(), xfail and baselines); check() does this
    for a Kind it is given. Declaring it again replaces it; a built-in name is refused."""
    if kind.name in options.KERNEL_KINDS:
        raise ValueError(f"{kind.name!r} is a built-in kind; give your kind another name")
    catalogue.USER_KINDS[kind.name] = kind
    return kind


def resolve(kind: Union[str, Kind]) -> Kind:
    """The Kind for a name (built-in or registered) or a Kind (registered on the way)."""
    if isinstance(kind, Kind):
        return kind if BUILTIN.get(kind.name) is kind else register(kind)
    if kind in BUILTIN:
        return BUILTIN[kind]
    if kind in catalogue.USER_KINDS:
        return catalogue.USER_KINDS[kind]
    raise ValueError(catalogue.unknown_kind(kind))


__all__ = ["Arg", "Kind", "BUILTIN", "EXTREMAL_VALUES", "register", "resolve"]
