"""Data builders and transforms that more than one scenario uses."""
from __future__ import annotations

import torch

from nanlab.lab.scenario import Data


def sine_regression(ctx) -> Data:
    """x ~ N(0, 1) of shape [n, features] and y = sin(x . w / 4): a smooth target of
    variance about 0.4, so that fitting only its mean leaves a loss near 0.4.
    Knobs: ``n``, ``features``."""
    rng, knobs = ctx.rng(), ctx.knobs
    x = rng.randn(int(knobs.n), int(knobs.features))
    w = rng.randn(int(knobs.features))
    return Data(x, torch.sin(x @ w / 4)[:, None])


def standardize(data: Data) -> Data:
    """Each feature column to mean 0 and standard deviation 1."""
    x = data.x
    return Data((x - x.mean(0)) / x.std(0), data.y, data.extra)
