"""Example kernels that prove the checker: naive ones it must fail, stable ones it must pass.

Run any of them through the CLI, e.g.
``python -m nanlab mode=check kernel.fn=nanlab.kernels.examples:naive_softmax_cross_entropy kernel.kind=cross_entropy``.
"""
import numpy as np
import torch
import torch.nn.functional as F

from nanlab.kernels.catalogue import IGNORE
from nanlab.kernels.catalogue import reduce_loss as _reduce


# ---------------------------------------------------------------- naive: must fail

def naive_softmax_cross_entropy(logits, target, reduction="mean", ignore_index=IGNORE):
    """exp / sum(exp), then -log of the target's probability."""
    e = torch.exp(logits)
    p = e / e.sum(1, keepdim=True)
    valid = target != ignore_index
    nll = -torch.log(p.gather(1, torch.where(valid, target, 0)[:, None]).squeeze(1))
    return _reduce(torch.where(valid, nll, torch.zeros_like(nll)), reduction, valid.sum())


def log_of_softmax_cross_entropy(logits, target, reduction="mean", ignore_index=IGNORE):
    """The library's stable softmax, then log: underflow gives log(0) = -inf."""
    return F.nll_loss(torch.log(torch.softmax(logits, 1)), target, reduction=reduction, ignore_index=ignore_index)


def bce_without_clamp(p, y, reduction="mean"):
    return _reduce(-(y * torch.log(p) + (1 - y) * torch.log(1 - p)), reduction)


def bce_with_logits_via_sigmoid(z, y, reduction="mean"):
    p = torch.sigmoid(z)
    return _reduce(-(y * torch.log(p) + (1 - y) * torch.log(1 - p)), reduction)


def naive_softmax(x, dim=-1):
    """exp / sum(exp): overflows to inf / inf = NaN on large inputs."""
    e = torch.exp(x)
    return e / e.sum(dim, keepdim=True)


def log_softmax_without_max(x, dim=-1):
    return x - torch.log(torch.exp(x).sum(dim, keepdim=True))


class _FirstRowUpstream(torch.autograd.Function):
    """Correct forward; the backward scales every row by the first row's upstream
    gradient, a bug that an all-ones upstream gradient cannot see."""

    @staticmethod
    def forward(ctx, logits, target):
        logp = torch.log_softmax(logits, 1)
        ctx.save_for_backward(logp, target)
        return -logp.gather(1, target[:, None]).squeeze(1)

    @staticmethod
    def backward(ctx, grad):
        logp, target = ctx.saved_tensors
        d = logp.exp() - F.one_hot(target, logp.shape[1]).to(logp.dtype)
        return grad[0] * d, None


def cross_entropy_none_backward_uses_first_upstream(logits, target, reduction="none"):
    per_row = _FirstRowUpstream.apply(logits, target)
    return _reduce(per_row, reduction)


def cross_entropy_masks_after_lse(logits, target, reduction="mean", ignore_index=IGNORE):
    """Takes the log-sum-exp of every row, ignored ones included, then multiplies the
    ignored rows by 0: a fully -inf ignored row gives (-inf) - (-inf) = NaN, and NaN * 0 = NaN."""
    valid = target != ignore_index
    lse = torch.logsumexp(logits, 1)
    picked = logits.gather(1, torch.where(valid, target, 0)[:, None]).squeeze(1)
    per_row = (lse - picked) * valid.to(logits.dtype)
    return _reduce(per_row, reduction, valid.sum())


def naive_logsumexp(x, dim=-1):
    """log(sum(exp(x))): exp overflows to inf above 88.7 in float32, and underflows to log(0) = -inf far below 0."""
    return torch.log(torch.exp(x).sum(dim))


def naive_softplus(x, beta=1.0, threshold=20.0):
    """log(1 + exp(x)): inf once exp overflows (x > 88.7 in float32, 11.1 in float16)."""
    return torch.log(1 + torch.exp(beta * x)) / beta


def log_of_sigmoid(x):
    """log(sigmoid(x)): sigmoid underflows to 0 far below 0 (x < -103.9 in float32), and log(0) = -inf."""
    return torch.log(torch.sigmoid(x))


def naive_kl_div(x, target, reduction="mean", log_target=False):
    """t * (log t - x): a target of 0 gives 0 * (-inf - x) = NaN (and 0 * (log 0 - (-inf)) too)."""
    p = torch.exp(target) if log_target else target
    log_p = target if log_target else torch.log(target)
    pointwise = p * (log_p - x)
    if reduction == "batchmean":
        return pointwise.sum() / x.shape[0]
    return _reduce(pointwise, reduction)


def nll_loss_via_exp_log(x, target, weight=None, ignore_index=IGNORE, reduction="mean"):
    """-log(exp(x)[target]): exp underflows to 0 for a log-prob far below 0 (-104 in float32), and log(0) = -inf."""
    valid = target != ignore_index
    probs = torch.exp(x)
    picked = probs.gather(1, torch.where(valid, target, 0)[:, None]).squeeze(1)
    w = torch.ones(x.shape[1], dtype=x.dtype) if weight is None else weight
    w_row = torch.where(valid, w[torch.where(valid, target, 0)], torch.zeros((), dtype=x.dtype))
    per_row = -w_row * torch.log(picked)
    return _reduce(per_row, reduction, w_row.sum())


def rms_norm_without_eps(x, normalized_shape, weight=None, eps=None):
    """x / sqrt(mean(x^2)), eps taken and ignored: an all-zero row is 0/0 = NaN."""
    dims = tuple(range(x.dim() - len(normalized_shape), x.dim()))
    y = x / torch.sqrt((x * x).mean(dims, keepdim=True))
    return y if weight is None else y * weight


def layer_norm_without_eps(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    """(x - mean) / sqrt(var), eps taken and ignored: a constant row is 0/0 = NaN."""
    dims = tuple(range(x.dim() - len(normalized_shape), x.dim()))
    centred = x - x.mean(dims, keepdim=True)
    y = centred / torch.sqrt((centred * centred).mean(dims, keepdim=True))
    if weight is not None:
        y = y * weight
    return y if bias is None else y + bias


def layer_norm_one_pass_variance(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    """var = E[x^2] - E[x]^2 in the input's dtype: cancels when the mean is far from 0, and x^2 overflows float16."""
    dims = tuple(range(x.dim() - len(normalized_shape), x.dim()))
    mean = x.mean(dims, keepdim=True)
    var = (x * x).mean(dims, keepdim=True) - mean * mean
    y = (x - mean) / torch.sqrt(var + eps)
    if weight is not None:
        y = y * weight
    return y if bias is None else y + bias


# ---------------------------------------------------------------- stable: must pass

torch_cross_entropy = F.cross_entropy  # fails fully_neg_inf_row_ignored: see the case's framework_failures
torch_binary_cross_entropy_with_logits = F.binary_cross_entropy_with_logits
torch_log_softmax = torch.log_softmax
torch_softmax = torch.softmax
torch_logsumexp = torch.logsumexp  # its gradient fails all_equal and huge_close_values: see those cases

torch_softplus = F.softplus
torch_log_sigmoid = F.logsigmoid
torch_nll_loss = F.nll_loss
torch_rms_norm = F.rms_norm
torch_kl_div = F.kl_div  # NaN where a target of 0 meets an input of -inf: see zero_targets_next_to_neg_inf
torch_layer_norm = F.layer_norm  # fails constant_rows and large_offset: see those cases


def stable_kl_div(x, target, reduction="mean", log_target=False):
    """p (log p - x) with every term where p = 0 set to 0 before any arithmetic reaches it,
    so neither 0 * -inf nor -inf - -inf is ever computed."""
    if log_target:
        present = target > float("-inf")
        p = torch.exp(target)
        log_p = torch.where(present, target, torch.zeros_like(target))
    else:
        present = target > 0
        p = target
        log_p = torch.log(torch.where(present, target, torch.ones_like(target)))
    pointwise = torch.where(present, p * (log_p - torch.where(present, x, torch.zeros_like(x))), torch.zeros_like(x))
    if reduction == "batchmean":
        return pointwise.sum() / x.shape[0]
    return _reduce(pointwise, reduction)


def upcast_layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    """Two-pass layer norm in float32 or wider (mean, then the mean square of x - mean), cast back to
    the input's dtype: a constant row has variance exactly 0, and float16 never squares a large value."""
    dims = tuple(range(x.dim() - len(normalized_shape), x.dim()))
    wide = x.to(torch.promote_types(x.dtype, torch.float32))
    centred = wide - wide.mean(dims, keepdim=True)
    y = centred * torch.rsqrt((centred * centred).mean(dims, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.to(y.dtype)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.to(x.dtype)


def stable_logsumexp(x, dim=-1):
    """max + log(sum(exp(x - max))), with the max detached. Autograd then gives the
    gradient as exp(x - max) / sum(exp(x - max)), which never touches the rounded
    output, unlike torch.logsumexp's exp(x - lse)."""
    m = x.amax(dim, keepdim=True).detach()
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # an all -inf row: keep -inf, not NaN
    return (m + torch.log(torch.exp(x - m).sum(dim, keepdim=True))).squeeze(dim)


def numpy_cross_entropy(logits, target, reduction="mean", ignore_index=IGNORE):
    """Stable cross-entropy in NumPy: ignored rows are replaced before any arithmetic,
    then log-softmax by max subtraction, computed in the input's dtype."""
    valid = target != ignore_index
    z = np.where(valid[:, None], logits, np.zeros_like(logits))
    m = z.max(1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0)
    logp = (z - m) - np.log(np.exp(z - m).sum(1, keepdims=True))
    nll = -np.take_along_axis(logp, np.where(valid, target, 0)[:, None], 1)[:, 0]
    per_row = np.where(valid, nll, 0).astype(logits.dtype)
    if reduction == "none":
        return per_row
    total = per_row.sum(dtype=np.float64)
    return np.asarray(total if reduction == "sum" else total / valid.sum(), dtype=logits.dtype)


def numpy_cross_entropy_grad(logits, target, upstream, reduction="mean", ignore_index=IGNORE):
    """d loss / d logits for numpy_cross_entropy, given the upstream gradient."""
    valid = target != ignore_index
    z = np.where(valid[:, None], logits, np.zeros_like(logits)).astype(np.float64)
    m = z.max(1, keepdims=True)
    p = np.exp(z - m)
    p /= p.sum(1, keepdims=True)
    p[np.arange(len(target)), np.where(valid, target, 0)] -= 1.0
    scale = np.asarray(upstream, dtype=np.float64)
    if reduction == "none":
        scale = scale[:, None]
    elif reduction == "mean":
        scale = scale / valid.sum()
    return (np.where(valid[:, None], p, 0.0) * scale).astype(logits.dtype)


NAIVE = {
    "naive_softmax_cross_entropy": "cross_entropy",
    "log_of_softmax_cross_entropy": "cross_entropy",
    "bce_without_clamp": "binary_cross_entropy",
    "bce_with_logits_via_sigmoid": "binary_cross_entropy_with_logits",
    "log_softmax_without_max": "log_softmax",
    "naive_softmax": "softmax",
    "cross_entropy_none_backward_uses_first_upstream": "cross_entropy",
    "cross_entropy_masks_after_lse": "cross_entropy",
    "naive_logsumexp": "logsumexp",
    "naive_softplus": "softplus",
    "log_of_sigmoid": "log_sigmoid",
    "naive_kl_div": "kl_div",
    "nll_loss_via_exp_log": "nll_loss",
    "rms_norm_without_eps": "rms_norm",
    "layer_norm_without_eps": "layer_norm",
    "layer_norm_one_pass_variance": "layer_norm",
}
STABLE = {
    "torch_cross_entropy": "cross_entropy",
    "torch_binary_cross_entropy_with_logits": "binary_cross_entropy_with_logits",
    "torch_log_softmax": "log_softmax",
    "torch_softmax": "softmax",
    "stable_logsumexp": "logsumexp",
    "max_subtracted_softmax": "softmax",
    "max_subtracted_log_softmax": "log_softmax",
    "torch_softplus": "softplus",
    "torch_log_sigmoid": "log_sigmoid",
    "torch_nll_loss": "nll_loss",
    "torch_rms_norm": "rms_norm",
    "stable_kl_div": "kl_div",
    "upcast_layer_norm": "layer_norm",
}


def max_subtracted_softmax(x, dim=-1):
    """The textbook stable softmax, in the input's own dtype: exp(x - max) / sum, the max
    detached (softmax does not depend on it; left attached, its gradient is a sum of 32768
    float16 terms that cancel to zero only in exact arithmetic, 387 ulp off on many_classes).
    Correct; in float16 and bfloat16 it is up to 3.3 ulp off, over twice torch.softmax's
    error (which computes in float32): "imprecise" on those cases, never failed."""
    e = torch.exp(x - x.amax(dim, keepdim=True).detach())
    return e / e.sum(dim, keepdim=True)


def max_subtracted_log_softmax(x, dim=-1):
    """The textbook stable log_softmax, in the input's own dtype: (x - max) - log(sum(exp(x - max)))."""
    z = x - x.amax(dim, keepdim=True).detach()
    return z - torch.log(torch.exp(z).sum(dim, keepdim=True))

