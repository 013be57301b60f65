"""The batched engine: many runs of one small model trained in lockstep.

A sweep asks the same question of many configs: train this variant at this lr
(clip, init, optimizer), and say when it first went non-finite. When the model is
a stack of ``nn.Linear`` layers and elementwise activations, every run's weights can
live in one tensor with a leading copy dimension, so that a step of all of them is
one batched matmul per layer. Each copy keeps its own lr, momentum, eps, weight
decay and clip threshold as a per-copy tensor, and every operation that mixes
numbers stays inside one copy, so a copy that goes NaN cannot leak into another.

A copy's numbers are a single run's, bit for bit: the updates are torch.optim's
single-tensor updates op for op (:class:`BatchedOptimizer`), and every op of the
model, the loss and the norms runs batched only where :class:`Exactness` found the
batched kernel gives the single run's bits for that shape, copy by copy elsewhere.

Per step, each copy is checked as :class:`nanlab.debug.sentinel.Guard` checks a run:
loss, then gradients, then parameters after the update. A copy whose check fails
is retired with the parameters it had before that step (what the guard restores)
and dropped from the batch, so it stops costing work. The engine does not replay a
failed copy under the tracer: it records the step and the quantity, and leaves the
op-level account to a single run of that config.

Anything else (another layer type, autocast, loss scaling, a loss that vmap cannot
batch) trains through the shared loop, :func:`nanlab.lab.loop.train`, and the reason
is returned with the result.
"""
from __future__ import annotations

import copy
import json
import math
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from nanlab.config.options import CLIP_NORM_EPS, OPTIMIZER_DEFAULTS, OPTIMIZERS
from nanlab.lab import verdicts
from nanlab.lab.build import DTYPES, apply_init, resolve_device
from nanlab.lab.loop import _to, evaluate, overrides_of, train
from nanlab.lab.result import FirstNonFinite, VariantResult
from nanlab.lab.scenario import Context, Data, Scenario, Variant

# Modules that act on each element alone: they give the same numbers on a
# [copies, n, features] tensor as on each copy's [n, features] slice.
ELEMENTWISE = (nn.Tanh, nn.ReLU, nn.Sigmoid, nn.LeakyReLU, nn.GELU, nn.ELU, nn.CELU, nn.SELU, nn.SiLU, nn.Mish,
               nn.Softplus, nn.Softsign, nn.Hardtanh, nn.ReLU6, nn.Identity)
BATCHED, LOOP = "batched", "loop"
CALIBRATION_COPIES = 4


@dataclass(frozen=True)
class Run:
    """One training run a sweep asks for: a variant of the scenario at a point's config."""

    variant: Variant
    cfg: object  # the point's finalized config, before the variant's own overrides


@dataclass
class Outcome:
    """What one run measured, and how it ran: ``engine`` is "batched" or "loop";
    ``reason`` says why a run went through the loop."""

    result: VariantResult
    engine: str
    reason: str = ""


# ---------------------------------------------------------------------------
# The model, as a plan of batched operations


def layer_plan(model: nn.Module):
    """The model as a list of ("linear", has_bias) and ("act", module) steps, or a
    string saying why it cannot be batched."""
    if type(model) is nn.Linear:
        modules = [model]
    elif type(model) is nn.Sequential:
        modules = list(model)
    else:
        return (f"its model, {type(model).__name__}, is not an nn.Linear or an nn.Sequential of nn.Linear "
                "layers and elementwise activations")
    plan = []
    for module in modules:
        if type(module) is nn.Linear:
            plan.append(("linear", module.bias is not None))
        elif type(module) in ELEMENTWISE:
            plan.append(("act", module))
        else:
            return (f"its model has a {type(module).__name__} layer, which is neither nn.Linear nor an "
                    "elementwise activation")
    if not any(kind == "linear" for kind, _ in plan):
        return "its model has no nn.Linear layer"
    if not all(p.requires_grad for p in model.parameters()):
        return "its model has frozen parameters"
    if any(True for _ in model.buffers()):
        return "its model has buffers"
    return plan


def plan_signature(plan, model: nn.Module) -> str:
    shapes = [tuple(p.shape) for p in model.parameters()]
    return repr([(kind, arg if kind == "linear" else repr(arg)) for kind, arg in plan]) + repr(shapes)


def _per_copy(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-copy vector [copies] shaped to broadcast against ``like`` [copies, ...]."""
    return values.view(-1, *([1] * (like.dim() - 1)))


def _expand(x: torch.Tensor, copies: int) -> torch.Tensor:
    """The input of every copy: ``x`` is [n, in] (shared) or already [copies, n, in]."""
    return x if x.dim() == 3 else x.expand(copies, *x.shape)


def linear_backward(batched: dict, grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, has_bias: bool,
                    input_grad: bool) -> tuple:
    """Every copy's F.linear backward: (grad of x or None, of the weight, of the bias or None).

    These are the ops autograd runs for F.linear's addmm, grad W computed as
    (grad^T x), each batched or copy by copy as :class:`Exactness` found gives a
    single run's bits. (Autograd's own backward of a batched matmul would multiply
    x^T by the gradient instead: the same sums, blocked differently.)"""
    copies, xs = weight.shape[0], _expand(x, weight.shape[0])
    grad_x = None
    if input_grad:
        grad_x = (torch.bmm(grad, weight) if batched["grad_input"]
                  else torch.stack([grad[c].mm(weight[c]) for c in range(copies)]))
    grad_weight = (torch.bmm(grad.transpose(1, 2), xs) if batched["grad_weight"]
                   else torch.stack([grad[c].t().mm(xs[c]) for c in range(copies)]))
    grad_bias = None
    if has_bias:
        grad_bias = grad.sum(1) if batched["grad_bias"] else torch.stack([grad[c].sum(0) for c in range(copies)])
    return grad_x, grad_weight, grad_bias


# The ways to compute every copy's F.linear, tried in this order by Exactness: x W^T
# batched; (W x^T)^T batched, which is how torch computes a layer with one output
# (a matrix-vector product) and so gives its bits where the first does not; copy by copy.
FORWARDS = ("batched", "transposed", "copies")


def linear_forward(how: str, x: torch.Tensor, weight: torch.Tensor, bias) -> torch.Tensor:
    copies, xs = weight.shape[0], _expand(x, weight.shape[0])
    if how == "batched":
        if bias is None:
            return torch.bmm(xs, weight.transpose(1, 2))
        return torch.baddbmm(bias.unsqueeze(1), xs, weight.transpose(1, 2))  # the bias inside, as addmm adds it
    if how == "transposed":
        if bias is None:
            return torch.bmm(weight, xs.transpose(1, 2)).transpose(1, 2)
        return torch.baddbmm(bias.unsqueeze(2), weight, xs.transpose(1, 2)).transpose(1, 2)
    if bias is None:
        return torch.stack([xs[c].mm(weight[c].t()) for c in range(copies)])
    return torch.stack([torch.addmm(bias[c], xs[c], weight[c].t()) for c in range(copies)])


def _one_by_one(fn: Callable, *tensors: torch.Tensor) -> torch.Tensor:
    """``fn`` applied to each copy's slices of ``tensors`` [copies, ...], as a single run applies it."""
    return torch.stack([fn(*(t[c] for t in tensors)) for c in range(tensors[0].shape[0])])


def _grad(output: torch.Tensor, inputs: list, upstream: torch.Tensor) -> tuple:
    """``torch.autograd.grad(output, inputs, upstream)``, as the gradient of
    sum(output * upstream): the same numbers (the backward multiplies upstream by
    exactly 1), without the shape check that passing grad_outputs would import sympy for."""
    return torch.autograd.grad((output * upstream).sum(), inputs)


# The op autograd runs for an activation's backward, from its output (torch's
# derivatives.yaml). Any other elementwise activation goes back through autograd.
FROM_OUTPUT = {
    nn.Tanh: torch.ops.aten.tanh_backward,
    nn.Sigmoid: torch.ops.aten.sigmoid_backward,
    nn.ReLU: lambda grad, out: torch.ops.aten.threshold_backward(grad, out, 0),
}


def activation_forward(module: nn.Module, h: torch.Tensor, batched: bool) -> tuple:
    """(output, what its backward needs): the output alone where FROM_OUTPUT knows the
    backward, else the autograd leaf the output was computed from."""
    if type(module) in FROM_OUTPUT:
        out = module(h) if batched else _one_by_one(module, h)
        return out, None
    leaf = h.detach().requires_grad_()
    with torch.enable_grad():
        out = module(leaf) if batched else _one_by_one(module, leaf)
    return out, leaf


def activation_backward(module: nn.Module, grad: torch.Tensor, out: torch.Tensor, leaf, batched: bool):
    if leaf is not None:
        return _grad(out, [leaf], grad)[0]
    backward = FROM_OUTPUT[type(module)]
    return backward(grad, out) if batched else _one_by_one(backward, grad, out)


def _same(a, b) -> bool:
    """Bitwise equal, NaN included."""
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and bool(((a == b) | (a.isnan() & b.isnan())).all())


class Exactness:
    """Which batched ops give, for each copy, the very bits a single run computes.

    A batched kernel may block a sum differently from the kernel torch runs for one
    copy (a [n, 64] x [64, 1] product goes through a matrix-vector kernel unbatched,
    and through a matrix-matrix kernel batched), or an elementwise kernel may treat
    a copy's last elements as a vector where the single run treats them one by one.
    Each op of a plan is therefore tried once per shape, on random numbers, against
    the single-run op, and runs batched only where the bits agree; elsewhere it runs
    copy by copy (still one Python call per copy and op, not per run)."""

    _found: dict = {}

    def __init__(self, copies: int, device, dtype, seed: int = 20240601):
        self.copies, self.device, self.dtype = copies, device, dtype
        self.generator = torch.Generator(device="cpu").manual_seed(seed)

    def _rand(self, *shape, scale=1.0):
        return (torch.randn(*shape, generator=self.generator, dtype=torch.float64) * scale).to(self.device, self.dtype)

    def linear(self, n: int, fan_in: int, fan_out: int, bias: bool, shared_input: bool) -> dict:
        key = ("linear", str(self.device), self.dtype, self.copies, n, fan_in, fan_out, bias, shared_input)
        if key not in self._found:
            c = self.copies
            x = self._rand(n, fan_in) if shared_input else self._rand(c, n, fan_in)
            weight, grad = self._rand(c, fan_out, fan_in, scale=0.3), self._rand(c, n, fan_out)
            b = self._rand(c, fan_out) if bias else None
            single = []
            for k in range(c):
                xk = (x if shared_input else x[k]).clone().requires_grad_(not shared_input)
                wk = weight[k].clone().requires_grad_()
                bk = b[k].clone().requires_grad_() if bias else None
                out = F.linear(xk, wk, bk)
                wanted = [t for t in (xk, wk, bk) if t is not None and t.requires_grad]
                grads = dict(zip([id(t) for t in wanted], _grad(out, wanted, grad[k])))
                single.append((out.detach(), grads.get(id(xk)), grads[id(wk)], grads.get(id(bk)) if bias else None))
            every = {"grad_input": True, "grad_weight": True, "grad_bias": True}
            batched = (None, *linear_backward(every, grad, x, weight, bias, not shared_input))
            outputs = torch.stack([s[0] for s in single])
            choice = {"forward": next(how for how in FORWARDS if how == "copies" or _same(
                linear_forward(how, x, weight, b), outputs))}
            for i, name in enumerate(every, start=1):
                reference = None if single[0][i] is None else torch.stack([s[i] for s in single])
                choice[name] = _same(batched[i], reference)
            self._found[key] = choice
        return self._found[key]

    def elementwise(self, module: nn.Module, shape: tuple) -> bool:
        key = ("act", str(self.device), self.dtype, self.copies, repr(module), shape)
        if key not in self._found:
            x, grad = self._rand(self.copies, *shape, scale=2.0), self._rand(self.copies, *shape)
            out, leaf = activation_forward(module, x, True)
            gb = activation_backward(module, grad, out, leaf, True)
            ok = True
            for k in range(self.copies):
                xk = x[k].clone().requires_grad_()
                ok_k = module(xk)
                (gk,) = _grad(ok_k, [xk], grad[k])
                ok = ok and _same(ok_k.detach(), out[k].detach()) and _same(gk, gb[k])
            self._found[key] = ok
        return self._found[key]

    def loss(self, fn: Callable, out_shape: tuple, target) -> bool:
        """Whether torch.func.vmap of the loss gives each copy's loss and gradient;
        raises VmapFailure when vmap cannot run it at all."""
        key = ("loss", str(self.device), self.dtype, self.copies, fn, out_shape, tuple(target.shape), target.dtype)
        if key not in self._found:
            out, grad = self._rand(self.copies, *out_shape), self._rand(self.copies)
            ob = out.clone().requires_grad_()
            try:
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message="There is a performance drop")
                    losses = torch.func.vmap(fn, in_dims=(0, None))(ob, target)
                (gb,) = _grad(losses, [ob], grad)
            except Exception as err:  # whatever vmap rejects, the loop can still run
                first = str(err).splitlines()[0] if str(err) else ""
                raise VmapFailure(f"its loss cannot be batched by torch.func.vmap ({type(err).__name__}: {first})")
            ok = True
            for k in range(self.copies):
                ok_ = out[k].clone().requires_grad_()
                lk = fn(ok_, target)
                (gk,) = _grad(lk, [ok_], grad[k])
                ok = ok and _same(lk.detach(), losses[k].detach()) and _same(gk, gb[k])
            self._found[key] = ok
        return self._found[key]

    def exact_loss(self, fn: Callable, out_shape: tuple, target) -> bool:
        """Whether torch.func.vmap of the scenario's float64 exact loss gives each copy's value."""
        key = ("exact", str(self.device), self.copies, fn, out_shape, tuple(target.shape), target.dtype)
        if key not in self._found:
            out = self._rand(self.copies, *out_shape).double()
            try:
                batched = torch.func.vmap(fn, in_dims=(0, None))(out, target)
            except Exception:  # vmap cannot run it: it is computed copy by copy
                self._found[key] = False
                return False
            self._found[key] = _same(batched, torch.stack([fn(out[k], target) for k in range(self.copies)]))
        return self._found[key]

    def norm(self, shapes: list, norm_dtype) -> bool:
        key = ("norm", str(self.device), self.dtype, self.copies, tuple(shapes), norm_dtype)
        if key not in self._found:
            tensors = [self._rand(self.copies, *shape, scale=3.0) for shape in shapes]
            batched = norms(tensors, norm_dtype, True)
            self._found[key] = _same(batched, norms(tensors, norm_dtype, False))
        return self._found[key]


def norms(tensors: list, dtype: torch.dtype, batched: bool = True) -> torch.Tensor:
    """Each copy's global L2 norm over these tensors, as nanlab.debug.sentinel.total_norm
    computes one run's: a norm per tensor, then the norm of those. ``batched=False``
    is total_norm itself, copy by copy."""
    if batched:
        per_tensor = [torch.linalg.vector_norm(t.reshape(t.shape[0], -1), dim=1, dtype=dtype) for t in tensors]
        return torch.linalg.vector_norm(torch.stack(per_tensor, 1), dim=1)
    copies = tensors[0].shape[0]
    return torch.stack([torch.linalg.vector_norm(torch.stack(torch._foreach_norm([t[c] for t in tensors], 2, dtype=dtype)))
                        for c in range(copies)])


class BatchedModel:
    """The plan of one batch, with each op batched where that is exact."""

    def __init__(self, plan, params: list, data: Data, loss: Callable, exact_loss: Callable, norm_dtype):
        copies, n = params[0].shape[0], data.x.shape[0]
        # Four copies show a kernel's choices: where a copy's slice starts and ends
        # inside the batched tensor, and how the batch is split.
        exact = Exactness(min(copies, CALIBRATION_COPIES), params[0].device, params[0].dtype)
        self.plan, self.loss, self.norm_dtype = plan, loss, norm_dtype
        # Until the first linear layer every copy sees the same [n, in] tensor: those
        # ops run once, unbatched, exactly as in a single run.
        self.ops, i, width, shared = [], 0, data.x.shape[1], True
        for kind, arg in plan:
            if kind == "linear":
                fan_out = params[i].shape[1]
                self.ops.append(exact.linear(n, width, fan_out, arg, shared))
                i, width, shared = i + (2 if arg else 1), fan_out, False
            else:
                self.ops.append(True if shared else exact.elementwise(arg, (n, width)))
        self.out_shape = (n, width)
        self.first_linear = next(i for i, (kind, _) in enumerate(plan) if kind == "linear")
        self.vmapped = exact.loss(loss, self.out_shape, data.y)
        self.exact_loss = exact_loss
        self.target64 = data.y.double() if data.y.is_floating_point() else data.y
        self.exact_vmapped = exact.exact_loss(exact_loss, self.out_shape, self.target64)
        self.batched_norm = exact.norm([tuple(p.shape[1:]) for p in params], norm_dtype)
        # Made once: building a vmapped function costs about a tenth of running it.
        self.batched_loss = torch.func.vmap(loss, in_dims=(0, None))
        self.batched_exact_loss = torch.func.vmap(exact_loss, in_dims=(0, None))
        self.batched_losses = torch.func.vmap(_both_losses(loss, exact_loss), in_dims=(0, 0, None, None))

    def step(self, params: list, data: Data) -> tuple:
        """Each copy's training loss, the exact float64 loss of its outputs (which the
        loop records every step), and its gradients: the forward and the backward
        written out as the ops autograd would run for one run, on tensors that carry
        no autograd graph; only the loss (and an activation FROM_OUTPUT does not
        know) goes through autograd."""
        saved, h, i = [], data.x, 0
        for (kind, arg), batched in zip(self.plan, self.ops):
            if kind == "linear":
                weight, bias = params[i], params[i + 1] if arg else None
                saved.append((h, i))
                i += 2 if arg else 1
                h = linear_forward(batched["forward"], h, weight, bias)
            else:
                h, leaf = activation_forward(arg, h, batched)
                saved.append((h, leaf))
        out = h.detach().requires_grad_()
        out64, exact = out.detach().double(), None
        with torch.enable_grad():
            if self.vmapped:
                with warnings.catch_warnings():
                    # vmap warns when it loops over an op it has no batching rule for
                    # (kl_div); the numbers are the same, Exactness checked them.
                    warnings.filterwarnings("ignore", message="There is a performance drop")
                    if self.exact_vmapped:  # one vmap call for both: each call costs more in Python than in ops
                        losses, exact = self.batched_losses(out, out64, data.y, self.target64)
                    else:
                        losses = self.batched_loss(out, data.y)
            else:
                losses = torch.stack([self.loss(out[c], data.y) for c in range(out.shape[0])])
            (grad,) = torch.autograd.grad(losses.sum(), [out])
        grads = [None] * len(params)
        # Back to the first linear layer: before it, every copy's input is the data, which needs no gradient.
        for index in range(self.first_linear, len(self.plan))[::-1]:
            (kind, arg), batched, (h, extra) = self.plan[index], self.ops[index], saved[index]
            if kind == "linear":
                grad, grads[extra], bias_grad = linear_backward(
                    batched, grad, h, params[extra], arg, index > self.first_linear)
                if arg:
                    grads[extra + 1] = bias_grad
            else:
                grad = activation_backward(arg, grad, h, extra, batched)
        if exact is None:
            with torch.no_grad():
                exact = (self.batched_exact_loss(out64, self.target64) if self.exact_vmapped else
                         torch.stack([self.exact_loss(out64[c], self.target64) for c in range(out.shape[0])]))
        return losses.detach(), exact.detach(), grads

    def norms(self, tensors: list) -> torch.Tensor:
        return norms(tensors, self.norm_dtype, self.batched_norm)


def _both_losses(loss: Callable, exact_loss: Callable) -> Callable:
    """The training loss of an output and, without a gradient, the float64 exact loss."""
    def both(out, out64, target, target64):
        with torch.no_grad():
            exact = exact_loss(out64, target64)
        return loss(out, target), exact

    return both


def all_finite(tensors: list) -> torch.Tensor:
    """Per copy: True where every element of every tensor is finite."""
    flags = [torch.isfinite(t.reshape(t.shape[0], -1)).all(1) for t in tensors]
    return torch.stack(flags, 1).all(1)


# ---------------------------------------------------------------------------
# Optimizers: torch.optim's single-tensor updates, with per-copy hyperparameters


def opmath(dtype: torch.dtype) -> torch.dtype:
    """The type torch's CPU kernels compute a tensor of this dtype in."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def scale(x: torch.Tensor, factor) -> torch.Tensor:
    """x times a per-copy factor, as torch multiplies by a Python float: in opmath.
    A Python float factor is torch's own op."""
    if isinstance(factor, float):
        return x * factor
    op = opmath(x.dtype)
    return (x.to(op) * _per_copy(factor.to(op), x)).to(x.dtype)


def add_scaled(a: torch.Tensor, b: torch.Tensor, alpha) -> torch.Tensor:
    """``torch.add(a, b, alpha=alpha)`` with a per-copy alpha.

    torch's add kernel computes a + alpha * b as one fused multiply-add, rounded once,
    after casting alpha to opmath. A product of two float32 numbers is exact in
    float64, so float64 arithmetic gives that one rounding (a double rounding that
    differs is rarer than 1 in 2^29). float64 tensors have no wider type here: they
    take torch's own op, copy by copy."""
    if isinstance(alpha, float):
        return torch.add(a, b, alpha=alpha)
    values = alpha.tolist()
    if all(v == values[0] for v in values):
        return torch.add(a, b, alpha=values[0])
    if _fused_addcmul(a):  # addcmul by a tensor is the same fused multiply-add, one kernel
        return torch.addcmul(a, b, _per_copy(alpha.to(a.dtype), a))
    if a.dtype == torch.float64:
        return torch.stack([torch.add(a[c], b[c], alpha=v) for c, v in enumerate(values)])
    exact = a.double() + b.double() * _per_copy(alpha.to(a.dtype).double(), a)
    return exact.to(a.dtype)


_FUSED: dict = {}


def _fused_addcmul(like: torch.Tensor) -> bool:
    """Whether ``torch.addcmul(a, b, per-copy alpha)`` gives ``torch.add(a[c], b[c],
    alpha=alpha[c])``'s bits for tensors shaped like this one, tried once on random numbers."""
    key = (str(like.device), like.dtype, tuple(like.shape[1:]))
    if key not in _FUSED:
        gen = torch.Generator().manual_seed(7)
        a, b = (torch.randn(3, *like.shape[1:], generator=gen, dtype=torch.float64).to(like.device, like.dtype)
                for _ in range(2))
        alpha = [-0.1234567, 0.37, -3.3e-5]
        single = torch.stack([torch.add(a[c], b[c], alpha=v) for c, v in enumerate(alpha)])
        batched = torch.addcmul(a, b, _per_copy(torch.tensor(alpha, dtype=torch.float64).to(like.dtype), a))
        _FUSED[key] = _same(batched, single)
    return _FUSED[key]


def div_scaled(a: torch.Tensor, t1: torch.Tensor, t2: torch.Tensor, value) -> torch.Tensor:
    """``torch.addcdiv(a, t1, t2, value=value)`` with a per-copy value: the kernel
    computes a + (value * t1) / t2 in opmath and rounds once at the end."""
    if isinstance(value, float):
        return torch.addcdiv(a, t1, t2, value=value)
    op = opmath(a.dtype)
    return (a.to(op) + (_per_copy(value.to(op), a) * t1.to(op)) / t2.to(op)).to(a.dtype)


def plus(x: torch.Tensor, value) -> torch.Tensor:
    """x + a per-copy value (a Python float: torch's own op)."""
    if isinstance(value, float):
        return x + value
    return x + _per_copy(value.to(x.dtype), x)


def _any(value, test) -> bool:
    return bool(test(value)) if isinstance(value, float) else bool(test(value).any())


def sgd_update(p, g, state, h, first, steps):
    """torch.optim.SGD's single-tensor step (dampening 0, no nesterov)."""
    if _any(h["momentum"], lambda m: m != 0):
        # buf * 0 + g is g exactly: a copy without momentum gets torch's plain update.
        buf = g.clone() if first else scale(state["momentum_buffer"], h["momentum"]) + g
        state["momentum_buffer"] = g = buf
    return add_scaled(p, g, -h["lr"])


def adam_update(p, g, state, h, first, steps):
    """torch.optim.Adam's single-tensor step (no amsgrad, coupled weight decay)."""
    beta1, beta2 = OPTIMIZERS["adam"].constants["betas"]
    if first:
        state["exp_avg"] = torch.zeros_like(p)
        state["exp_avg_sq"] = torch.zeros_like(p)
    state["exp_avg"] = exp_avg = torch.lerp(state["exp_avg"], g, 1 - beta1)
    state["exp_avg_sq"] = exp_avg_sq = torch.addcmul(state["exp_avg_sq"] * beta2, g, g, value=1 - beta2)
    bias_correction1 = 1 - beta1 ** steps
    bias_correction2_sqrt = (1 - beta2 ** steps) ** 0.5
    # torch divides the Python-float lr by the bias correction in double precision
    step_size = h["lr"] / bias_correction1
    denom = plus(exp_avg_sq.sqrt() / bias_correction2_sqrt, h["eps"])
    return div_scaled(p, exp_avg, denom, -step_size)


def rmsprop_update(p, g, state, h, first, steps):
    """torch.optim.RMSprop's single-tensor step (not centered)."""
    alpha = OPTIMIZERS["rmsprop"].constants["alpha"]
    if first:
        state["square_avg"] = torch.zeros_like(p)
        state["momentum_buffer"] = torch.zeros_like(p)  # torch keeps it only for momentum > 0
    state["square_avg"] = square_avg = torch.addcmul(state["square_avg"] * alpha, g, g, value=1 - alpha)
    avg = plus(square_avg.sqrt(), h["eps"])
    momentum, lr = h["momentum"], h["lr"]
    plain = div_scaled(p, g, avg, -lr)
    if not _any(momentum, lambda m: m > 0):
        return plain
    one = 1.0 if isinstance(lr, float) else torch.ones_like(lr)
    state["momentum_buffer"] = buf = div_scaled(scale(state["momentum_buffer"], momentum), g, avg, one)
    with_momentum = add_scaled(p, buf, -lr)
    if isinstance(momentum, float):
        return with_momentum
    return torch.where(_per_copy(momentum > 0, p), with_momentum, plain)


UPDATES = {"sgd": sgd_update, "adam": adam_update, "rmsprop": rmsprop_update}


def _shared(hyper: dict) -> dict:
    """The settings, each one every copy shares as the Python float torch.optim is
    given: then each op is torch's own, with no per-copy tensor work in a step."""
    return {k: float(v[0]) if len(v) and bool((v == v[0]).all()) else v for k, v in hyper.items()}


class BatchedOptimizer:
    """torch.optim.SGD, Adam or RMSprop, as nanlab builds them (nanlab.lab.build.make_optimizer):
    torch's single-tensor update (the one it runs on CPU tensors), op for op, for every
    copy. ``hyper`` holds per-copy float64 tensors: lr, momentum, eps, weight_decay;
    each op casts them as torch casts the Python float. State is created at the first
    step, as torch.optim creates it.

    float32 and float64 copies step together. float16 and bfloat16 copies step one
    by one, with Python floats: torch's elementwise kernels round those types
    differently in their vectorized body and their scalar tail, so only a tensor of
    the single run's own size gets the single run's bits."""

    def __init__(self, name: str, hyper: dict, dtype: torch.dtype):
        self.update, self.hyper, self.shared = UPDATES[name], hyper, _shared(hyper)
        self.one_by_one = dtype in (torch.float16, torch.bfloat16)
        self.state: Optional[list] = None
        self.steps = 0

    def keep(self, index: torch.Tensor) -> None:
        """Drop every copy not in ``index`` (retired copies)."""
        self.hyper = {k: v.index_select(0, index) for k, v in self.hyper.items()}
        self.shared = _shared(self.hyper)
        if self.state is not None:
            self.state = [{k: v.index_select(0, index) for k, v in s.items()} for s in self.state]

    def step(self, params: list, grads: list) -> list:
        """New parameters (out of place, so the old ones stay for a retired copy)."""
        self.steps += 1
        first = self.state is None
        if first:
            self.state = [{} for _ in params]
        if not self.one_by_one:
            return [self._step(p, g, state, self.shared, first) for p, g, state in zip(params, grads, self.state)]
        out = []
        for p, g, state in zip(params, grads, self.state):
            copies, new_states = [], []
            for c, values in enumerate(zip(*(v.tolist() for v in self.hyper.values()))):
                own = {k: v[c] for k, v in state.items()}
                copies.append(self._step(p[c], g[c], own, dict(zip(self.hyper, values)), first))
                new_states.append(own)
            # A copy keeps only the state its settings use (no momentum buffer without
            # momentum); the stacked state holds zeros there, which it never reads.
            keys = dict.fromkeys(k for own in new_states for k in own)
            state.update({k: torch.stack([own.get(k, torch.zeros_like(p[0])) for own in new_states]) for k in keys})
            out.append(torch.stack(copies))
        return out

    def _step(self, p, g, state, h, first):
        if _any(h["weight_decay"], lambda wd: wd != 0):
            g = add_scaled(g, p, h["weight_decay"])
        return self.update(p, g, state, h, first, self.steps)


def clip(name: str, grads: list, thresholds: torch.Tensor, grad_norm: torch.Tensor, norm_of: Callable) -> tuple:
    """nanlab.lab.build.clip_gradients per copy: returns the clipped gradients and the norm
    the sentinel checks (the pre-clip norm for norm clipping, as the loop reports it)."""
    if name == "norm":
        coef = torch.clamp(thresholds.to(grad_norm.dtype) / (grad_norm + CLIP_NORM_EPS), max=1.0)
        return [scale(g, coef) for g in grads], grad_norm
    if name == "value":
        clipped = []
        for g in grads:
            t = _per_copy(thresholds.to(g.dtype), g)
            clipped.append(torch.clamp(g, min=-t, max=t))
        return clipped, norm_of(clipped)
    return grads, grad_norm


# ---------------------------------------------------------------------------
# One batch: runs that share data, model shape, loss, optimizer kind and clip kind


@dataclass
class Prepared:
    """A run made concrete: its config after the variant's overrides, its data, and
    its model built exactly as the loop builds it (seed, make_model, init, dtype)."""

    run: Run
    vcfg: "Settings"
    overrides: dict
    device: torch.device
    dtype: torch.dtype
    data: Data
    model: nn.Module  # shared by the runs built alike; a scratch model to measure a copy on
    start: list  # the initial parameters
    exact_start: float
    accuracy_start: Optional[float]
    plan: object  # list of steps, or the reason the model cannot be batched


def _hyper(prepared: list, device) -> dict:
    def column(get):
        return torch.tensor([float(get(p.vcfg)) for p in prepared], dtype=torch.float64, device=device)

    # Every optimizer.* setting of the table, whichever the optimizer reads: a copy's
    # update reads its own optimizer's keys.
    settings = {key: column(lambda c, key=key: c.optimizer[key]) for key in ("lr", *OPTIMIZER_DEFAULTS)}
    return {**settings, "clip": column(lambda c: c.clip.threshold)}


# glibc's malloc hands a freed block of more than its mmap threshold (128 KiB at
# first, raised only as far as the largest block freed) back to the kernel, and trims
# the heap's free top past twice that: a batch's step allocates and frees its
# megabyte-sized activations and gradients anew, so each step's new pages faulted in
# again, one system call and zeroed page at a time (8 to 11% of a 12-copy batch's CPU
# time, measured with getrusage). Raised once per process, those blocks are reused.
MMAP_THRESHOLD_BYTES, TRIM_THRESHOLD_BYTES = 64 * 2 ** 20, 256 * 2 ** 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
_malloc_tuned = False


def keep_freed_memory() -> None:
    """Let this process's malloc keep a step's freed tensors for the next step (glibc
    only; elsewhere nothing changes). Where memory comes from never changes a number."""
    global _malloc_tuned
    if _malloc_tuned:
        return
    _malloc_tuned = True
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
        libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    except (OSError, AttributeError):  # not glibc
        pass


def _norm_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the sentinel's norms are taken in for parameters of this dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def train_batch(scenario: Scenario, batch: list, work: Callable[[int], None] = lambda copies: None,
                threads: int = 1) -> list:
    """Train every Prepared run of one batch together; a VariantResult per run.
    ``work(copies)`` hears how many copies each step trained (retired ones no longer count);
    ``threads``: the CPU thread count the batch trains on (one: a sweep's other cores
    are its other workers'); the count before it comes back after."""
    started = time.perf_counter()
    keep_freed_memory()
    first = batch[0]
    vcfg, data, plan = first.vcfg, first.data, first.plan
    steps, clip_name, opt_name = int(vcfg.steps), vcfg.clip.name, vcfg.optimizer.name
    device = first.device
    norm_dtype = _norm_dtype(first.dtype)
    count = len(batch)

    hyper = _hyper(batch, device)
    thresholds = hyper.pop("clip")
    optimizer = BatchedOptimizer(opt_name, hyper, first.dtype)
    params = [torch.stack(tensors) for tensors in zip(*[r.start for r in batch])]
    model = BatchedModel(plan, params, data, first.run.variant.loss, scenario.exact_loss, norm_dtype)

    threads_before = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(threads)
    alive = torch.arange(count, device=device)  # which original copy each row holds
    # Per step and copy: loss, gradient norm, parameter norm, exact loss (NaN where not reached).
    record = torch.full((steps, 4, count), math.nan, dtype=torch.float64, device=device)
    retired = {}  # copy index -> (step, quantity, parameters before that step)
    taken = 0
    for step in range(steps):
        losses, exact, grads = model.step(params, data)
        grad_norm = model.norms(grads)
        grads, checked_norm = clip(clip_name, grads, thresholds, grad_norm, model.norms)
        new = optimizer.step(params, grads)
        param_norm = model.norms(new)
        # The loop records the norm before clipping, and its sentinel checks the one the update used.
        readings = torch.stack([losses.to(torch.float64), grad_norm.to(torch.float64),
                                param_norm.to(torch.float64), exact, checked_norm.to(torch.float64)])
        record[step].index_copy_(1, alive, readings[:4])
        taken = step + 1
        work(len(alive))
        if bool(torch.isfinite(readings[[0, 2, 4]]).all()):
            params = new
            continue
        # A norm can overflow on finite values; as in the sentinel, only then is each element looked at.
        bad_loss = ~torch.isfinite(losses)
        bad_grads = ~torch.isfinite(checked_norm) & ~all_finite(grads)
        bad_params = ~torch.isfinite(param_norm) & ~all_finite(new)
        bad = bad_loss | bad_grads | bad_params
        for row in torch.nonzero(bad).flatten().tolist():
            quantity = "loss" if bad_loss[row] else "gradients" if bad_grads[row] else "parameters"
            retired[int(alive[row])] = (step, quantity, [p[row].detach().clone() for p in params])
        keep = torch.nonzero(~bad).flatten()
        params = [p.index_select(0, keep) for p in new]
        alive = alive.index_select(0, keep)
        optimizer.keep(keep)
        thresholds = thresholds.index_select(0, keep)
        if len(alive) == 0:
            break

    final = {int(c): [p[row] for p in params] for row, c in enumerate(alive.tolist())}
    history = record.tolist()
    seconds = (time.perf_counter() - started) / count
    results = []
    for index, prepared in enumerate(batch):
        end = retired.get(index)
        length = end[0] + 1 if end else taken
        losses = [history[s][0][index] for s in range(length)]
        grad_norms = [history[s][1][index] for s in range(length)]
        param_norms = [history[s][2][index] for s in range(length - (1 if end else 0))]
        exact_losses = [history[s][3][index] for s in range(length)]
        first_bad = FirstNonFinite(end[0], end[1], losses[-1]) if end else None
        results.append(_finish(scenario, prepared, end[2] if end else final[index], first_bad, losses, grad_norms,
                               param_norms, exact_losses, seconds))
    torch.set_num_threads(threads_before)  # measuring each copy's end is small ops too: on the batch's threads
    return results


def _finish(scenario, prepared: Prepared, params: list, first_bad, losses, grad_norms, param_norms,
            exact_losses, seconds) -> VariantResult:
    """The run's VariantResult, its end measured on the scenario's own model."""
    model, data, variant = prepared.model, prepared.data, prepared.run.variant
    with torch.no_grad():
        for p, value in zip(model.parameters(), params):
            p.copy_(value)
    exact_end, acc_end = evaluate(scenario, model, data)
    metrics = dict(scenario.metrics(model, data)) if scenario.metrics else {}
    result = VariantResult(
        name=variant.name, role=variant.role, summary=variant.summary, lossy=variant.lossy,
        overrides=prepared.overrides, finite=first_bad is None, first_nonfinite=first_bad, losses=losses,
        grad_norms=grad_norms, param_norms=param_norms, exact_losses=exact_losses,
        final_loss=next((x for x in reversed(losses) if math.isfinite(x)), None),
        exact_loss_start=prepared.exact_start, exact_loss_end=exact_end, accuracy_start=prepared.accuracy_start,
        accuracy_end=acc_end, loss_gap=losses[0] - prepared.exact_start if losses else None, metrics=metrics,
        seconds=seconds)
    return verdicts.judge_learning(result, scenario.learn)


# ---------------------------------------------------------------------------
# Many runs: prepare, deduplicate, group into batches, fall back to the loop


def _key(cfg) -> str:
    plain = cfg if isinstance(cfg, dict) else OmegaConf.to_container(cfg, resolve=True)
    return json.dumps(plain, sort_keys=True, default=str)


class Settings(dict):
    """A plain config dict, read as the DictConfig it came from: ``cfg.optimizer.lr``."""

    def __getattr__(self, name):
        try:
            value = self[name]
        except KeyError:
            raise AttributeError(name) from None
        return Settings(value) if isinstance(value, dict) else value


def _with_overrides(plain: dict, overrides: dict) -> dict:
    """``plain`` with dotted-key overrides set (as nanlab.lab.loop.variant_config sets
    them), copying only the dicts on the way to each key."""
    out = dict(plain)
    for key, value in overrides.items():
        node, parts = out, key.split(".")
        for part in parts[:-1]:
            node[part] = dict(node.get(part) or {})
            node = node[part]
        node[parts[-1]] = value
    return out


class VmapFailure(RuntimeError):
    """The variant's loss cannot be batched with torch.func.vmap."""


@dataclass
class Schedule:
    """How a list of runs will train: the distinct runs, grouped into batches, and
    those that go through the loop, each with its reason."""

    runs: list
    order: list  # per run: the key of the distinct run that answers it
    distinct: dict  # key -> Prepared
    batches: list  # lists of keys
    looped: dict  # key -> reason
    overrides: list  # per run: the variant's own overrides at that point

    def tally(self) -> dict:
        """How the runs train, as counts that add up over schedules (:func:`add_tallies`):
        (variant names,) -> [runs, distinct runs, batches] on the batched engine;
        (variant, reason) -> [distinct runs] the loop trains for that reason."""
        batched = {k for b in self.batches for k in b if k not in self.looped}
        tally: dict = {}
        if batched:
            names = tuple(dict.fromkeys(r.variant.name for r, k in zip(self.runs, self.order) if k in batched))
            tally[names] = [sum(k in batched for k in self.order), len(batched),
                            sum(any(k in batched for k in b) for b in self.batches)]
        for run, key in zip(self.runs, self.order):
            if key in self.looped:
                tally.setdefault((run.variant.name, self.looped[key]), set()).add(key)
        return {what: [len(n)] if isinstance(n, set) else n for what, n in tally.items()}

    def describe(self) -> list:
        return describe(self.tally())


def add_tallies(total: dict, more: dict) -> dict:
    for what, counts in more.items():
        total[what] = [a + b for a, b in zip(total.get(what, [0] * len(counts)), counts)]
    return total


def describe(tally: dict) -> list:
    """One line per engine used: which variants, how many runs, and why the loop."""
    return [f"batched engine: {n[0]} runs ({n[1]} distinct) in {n[2]} batches, for {', '.join(what)}"
            if len(n) == 3 else f"in-process loop: {n[0]} runs of {what[0]}, because {what[1]}"
            for what, n in tally.items()]


class Engine:
    """Trains a scenario's runs; batched wherever the model and variant allow.

    Identical runs (same variant, same config after its overrides) are trained once:
    a variant that pins its own lr, say, is the same run at every lr of the grid."""

    def __init__(self, scenario: Scenario, force_loop: bool = False, max_batch: int = 512,
                 threads: int = 1):
        self.scenario, self.force_loop, self.max_batch, self.threads = scenario, force_loop, max_batch, threads
        self._raw: dict = {}
        self._prepared: dict = {}
        self._plains: dict = {}
        self._data: dict = {}
        self._built: dict = {}
        self.copy_steps = 0  # steps trained, summed over copies: the batched engine's work

    def _raw_data(self, cfg):
        key = (int(cfg.seed), str(cfg.dtype), str(cfg.device))
        if key not in self._raw:
            ctx = Context(cfg, resolve_device(cfg.device), DTYPES[cfg.dtype])
            self._raw[key] = (ctx, self.scenario.make_data(ctx))
        return key, self._raw[key]

    def _count(self, copies: int) -> None:
        self.copy_steps += copies

    def why_loop(self, variant: Variant) -> Optional[str]:
        """Why this variant cannot be batched whatever its model, or None."""
        if self.force_loop:
            return "sweep.engine=loop was asked for"
        if variant.amp:
            return f"it trains under autocast ({variant.amp})"
        if variant.loss_scaling:
            return "it uses loss scaling"
        return None

    def _plain(self, cfg) -> dict:
        """The point's config as plain data, once per config object (kept alive here,
        so that its id is not reused)."""
        if id(cfg) not in self._plains:
            self._plains[id(cfg)] = (cfg, OmegaConf.to_container(cfg, resolve=True))
        return self._plains[id(cfg)][1]

    def prepare(self, run: Run) -> Prepared:
        """The run made concrete. Its config after the variant's overrides is plain data
        (building a DictConfig for each of hundreds of runs would cost more than
        training them); scenario code sees a DictConfig, built when a model is."""
        raw_key, (_, raw) = self._raw_data(run.cfg)
        variant = run.variant
        if (raw_key, variant.name) not in self._prepared:
            self._prepared[(raw_key, variant.name)] = variant.prepare(raw) if variant.prepare else raw
        prepared = self._prepared[(raw_key, variant.name)]
        overrides = overrides_of(variant, prepared, run.cfg)
        vcfg = Settings(_with_overrides(self._plain(run.cfg), overrides))
        device, dtype = resolve_device(vcfg.device), DTYPES[vcfg.dtype]
        data_key = (raw_key, variant.name, str(vcfg.dtype))
        if data_key not in self._data:  # one tensor per data, so that runs on it can batch together
            self._data[data_key] = _to(prepared, device, dtype)
        build_key = (*data_key, int(vcfg.seed), _key(vcfg.init))
        if build_key not in self._built:
            data = self._data[data_key]
            real = OmegaConf.create(dict(vcfg))
            ctx = Context(real, device, dtype)
            torch.manual_seed(int(vcfg.seed))
            model = variant.model(ctx, data) if variant.model else self.scenario.make_model(ctx, data, **variant.swap)
            apply_init(model, real.init)
            model.to(device=device, dtype=dtype)
            exact_start, acc_start = evaluate(self.scenario, model, data)
            plan = layer_plan(model)
            if not isinstance(plan, str) and not (isinstance(data.x, torch.Tensor) and data.x.dim() == 2):
                plan = "its inputs are not one [n, features] tensor"
            start = [p.detach().clone() for p in model.parameters()]
            self._built[build_key] = (data, model, start, exact_start, acc_start, plan)
        data, model, start, exact_start, acc_start, plan = self._built[build_key]
        return Prepared(run, vcfg, overrides, device, dtype, data, model, start, exact_start, acc_start, plan)

    def schedule(self, runs: list) -> Schedule:
        distinct, order, looped, overrides = {}, [], {}, []
        for run in runs:
            prepared = self.prepare(run)
            key = (_behaviour(run.variant), _key(prepared.vcfg))
            if key not in distinct:
                distinct[key] = prepared
                reason = self.why_loop(run.variant) or (prepared.plan if isinstance(prepared.plan, str) else None)
                if reason is not None:
                    looped[key] = reason
            order.append(key)
            overrides.append(prepared.overrides)
        groups: dict = {}
        for key, prepared in distinct.items():
            if key not in looped:
                groups.setdefault(_batch_group(prepared), []).append(key)
        batches = [keys[i:i + self.max_batch] for keys in groups.values() for i in range(0, len(keys), self.max_batch)]
        return Schedule(runs, order, distinct, batches, looped, overrides)

    def calibrate(self, prepared: list) -> None:
        """Find here, once, what the batches of these runs will ask Exactness (and
        the optimizer's fused-update check): worker processes forked afterwards
        inherit the answers instead of each finding them again, every round."""
        threads_before, seen = torch.get_num_threads(), set()
        for run in prepared:
            if isinstance(run.plan, str) or self.why_loop(run.run.variant):
                continue
            group = _batch_group(run)
            if group in seen:
                continue
            seen.add(group)
            params = [torch.stack([p] * CALIBRATION_COPIES) for p in run.start]
            if run.device.type == "cpu":
                torch.set_num_threads(self.threads)
            try:
                BatchedModel(run.plan, params, run.data, run.run.variant.loss, self.scenario.exact_loss,
                             _norm_dtype(run.dtype))
                for p in params:
                    _fused_addcmul(p)
            except VmapFailure:  # the batch will find it again, and train in the loop
                pass
            finally:
                torch.set_num_threads(threads_before)

    def train(self, schedule: Schedule) -> list:
        """An Outcome per run of the schedule, in order."""
        outcomes = {}
        for keys in schedule.batches:
            batch = [schedule.distinct[k] for k in keys]
            try:
                results = train_batch(self.scenario, batch, self._count, self.threads)
            except VmapFailure as err:
                for k in keys:
                    schedule.looped[k] = str(err)
                continue
            for k, result in zip(keys, results):
                outcomes[k] = Outcome(result, BATCHED)
        for key, reason in schedule.looped.items():
            prepared = schedule.distinct[key]
            _, (ctx, raw) = self._raw_data(prepared.run.cfg)
            result = train(self.scenario, prepared.run.variant, prepared.run.cfg, raw, ctx)
            outcomes[key] = Outcome(verdicts.judge_learning(result, self.scenario.learn), LOOP, reason)
        out, answered = [], set()
        for run, key, overrides in zip(schedule.runs, schedule.order, schedule.overrides):
            outcome = outcomes[key]
            # Runs answered by one training (a variant that pins its own lr, or two
            # variants that train alike) each get their own result, named as asked.
            result = copy.deepcopy(outcome.result) if key in answered else outcome.result
            answered.add(key)
            variant = run.variant
            result.name, result.role, result.summary, result.lossy = (variant.name, variant.role, variant.summary,
                                                                      variant.lossy)
            result.overrides = overrides
            out.append(Outcome(result, outcome.engine, outcome.reason))
        return out


def _batch_group(prepared: Prepared) -> tuple:
    """What runs must share to train in one batch."""
    v = prepared.vcfg
    return (v.optimizer.name, v.clip.name, str(v.dtype), int(v.steps), str(prepared.device), id(prepared.data),
            plan_signature(prepared.plan, prepared.model), prepared.run.variant.loss)


def _behaviour(variant: Variant) -> tuple:
    """What makes a variant train the way it does, apart from its name and its
    config overrides (which are already in the config it is keyed with)."""
    return (variant.loss, variant.prepare, variant.model, repr(sorted(variant.swap.items())), variant.amp,
            variant.loss_scaling)
