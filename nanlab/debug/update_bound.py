"""Whether one optimizer update with finite gradients can overflow a parameter or
the optimizer's state: the proof that lets :class:`nanlab.debug.sentinel.Guard` skip
its snapshot.

Every quantity is an upper bound on the largest |x| of a tensor, per param group, as
a Python float. The update rules of SGD, Adam, AdamW and RMSprop (not centered) are
followed one elementwise operation at a time: each intermediate's bound must stay
below a quarter of the dtype's largest finite value, so that the rounding of a few
operations (a relative error of 2**-8 at most, in bfloat16) cannot reach it. Sums
of absolute values bound every sum; a division is bounded only by a denominator
that cannot be smaller than ``eps`` rounded to the dtype (an ``eps`` that rounds to
zero proves nothing); the bias corrections are bounded by their smallest value,
at the first step. What the update writes is then bounded too, and these new
bounds carry over to the next step without reading the tensors again (the running
bound). Largest |x| is bounded by an L2 norm, per tensor, when the bounds are
measured: a pass over the tensors, made only when no running bound is at hand.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

# The state tensors each known optimizer keeps, per parameter, that its rule bounds.
STATE_KEYS = {
    torch.optim.SGD: ("momentum_buffer",),
    torch.optim.Adam: ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"),
    torch.optim.AdamW: ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"),
    torch.optim.RMSprop: ("square_avg", "momentum_buffer", "grad_avg"),
}


def is_known(optimizer) -> bool:
    """Whether the optimizer's update rule is one this module bounds (its exact class:
    a subclass may change the rule)."""
    return type(optimizer) in STATE_KEYS


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


def measure(optimizer, groups_params) -> list:
    """Bounds of every param group, read from the tensors: {"param": ..., state key:
    ...}. One pass over the parameters and the state, one host sync."""
    keys = STATE_KEYS[type(optimizer)]
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
