"""Turn config values into torch objects: device, dtype, optimizer, init, clipping."""
from __future__ import annotations

import torch
from torch import nn

from nanlab.config import options
from nanlab.errors import ConfigError
from nanlab.debug.sentinel import total_norm

DTYPES = {name: getattr(torch, name) for name in options.DTYPES}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", "cuda", "CUDA is not available on this machine "
                          "(torch.cuda.is_available() is False); use device=cpu or device=auto")
    return torch.device(name)


def make_optimizer(opt_cfg, params) -> torch.optim.Optimizer:
    option = options.OPTIMIZERS[opt_cfg.name]
    settings = {key: float(opt_cfg[key]) for key in option.keys}
    return getattr(torch.optim, option.torch_class)(params, lr=float(opt_cfg.lr), **settings, **option.constants)


def apply_init(model: nn.Module, init_cfg) -> None:
    """Re-initialize every Linear/Conv weight; 'default' keeps torch's own init.
    Biases are zeroed for the non-default inits, as Keras does."""
    option = options.INITS[init_cfg.name]
    if option.function is None:
        return
    init = getattr(nn.init, option.function)
    keywords = {**option.keywords, **{key: float(init_cfg[key]) for key in option.settings}}
    with torch.no_grad():
        for module in model.modules():
            if not isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)):
                continue
            init(module.weight, **keywords)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


def clip_gradients(params, clip_cfg, grad_norm: torch.Tensor) -> torch.Tensor:
    """Clip in place. Return a norm that is finite exactly when the gradients the
    update will use are finite, so the sentinel can reuse it."""
    if clip_cfg.name == "norm":
        # Scaling by threshold/norm keeps finite grads finite and turns inf into NaN,
        # so the pre-clip norm already answers the sentinel's question.
        torch.nn.utils.clip_grads_with_norm_(params, float(clip_cfg.threshold), grad_norm)
        return grad_norm
    if clip_cfg.name == "value":
        torch.nn.utils.clip_grad_value_(params, float(clip_cfg.threshold))
        return total_norm([p.grad for p in params if p.grad is not None])
    return grad_norm
