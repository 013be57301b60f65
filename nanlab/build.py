"""Turn config values into torch objects: device, dtype, optimizer, init, clipping."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from nanlab.errors import ConfigError
from nanlab.sentinel import total_norm

DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", "cuda", "CUDA is not available on this machine "
                          "(torch.cuda.is_available() is False); use device=cpu or device=auto")
    return torch.device(name)


@dataclass
class Context:
    """What a scenario's make_data/make_model see: the resolved config and placement."""

    cfg: object
    device: torch.device
    dtype: torch.dtype

    @property
    def seed(self) -> int:
        return int(self.cfg.seed)

    @property
    def knobs(self):
        """The scenario's data settings: sizes, scales (``scenario.data`` in its YAML)."""
        return self.cfg.scenario.data

    def generator(self, offset: int = 0) -> torch.Generator:
        """A CPU generator seeded from the config: data is drawn in float64 on the CPU
        and only then cast and moved, so every dtype and device sees the same numbers."""
        return torch.Generator().manual_seed(self.seed * 1000 + offset)


def make_optimizer(opt_cfg, params) -> torch.optim.Optimizer:
    name, lr, wd = opt_cfg.name, float(opt_cfg.lr), float(opt_cfg.weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=float(opt_cfg.momentum), weight_decay=wd)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, eps=float(opt_cfg.eps), weight_decay=wd)
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, eps=float(opt_cfg.eps), momentum=float(opt_cfg.momentum), weight_decay=wd)
    raise ConfigError("optimizer.name", name, "one of sgd, adam, rmsprop")


def apply_init(model: nn.Module, init_cfg) -> None:
    """Re-initialize every Linear/Conv weight; 'default' keeps torch's own init.
    Biases are zeroed for the non-default inits, as Keras does."""
    name = init_cfg.name
    if name == "default":
        return
    with torch.no_grad():
        for module in model.modules():
            if not isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)):
                continue
            if name == "xavier_uniform":
                nn.init.xavier_uniform_(module.weight)
            elif name == "he_normal":
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            elif name == "normal":
                nn.init.normal_(module.weight, std=float(init_cfg.std))
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
