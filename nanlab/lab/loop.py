"""The one training loop every scenario variant runs through.

Full-batch steps on the scenario's synthetic data, guarded by :class:`nanlab.debug.sentinel.Guard`:
the loop never crashes on NaN or Inf; it records the first non-finite step, what
went non-finite, and the tracer's account of the op, then stops that variant.
"""
from __future__ import annotations

import contextlib
import sys
import time
from types import SimpleNamespace
from typing import Optional

import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from nanlab.lab.build import DTYPES, apply_init, clip_gradients, make_optimizer
from nanlab.errors import NonFiniteError
from nanlab.lab.result import FirstNonFinite, VariantResult
from nanlab.lab.scenario import Context, Data, Scenario, Variant
from nanlab.debug.sentinel import Guard, total_norm


def overrides_of(variant: Variant, data: Data, cfg) -> dict:
    return dict(variant.overrides(data, cfg) if callable(variant.overrides) else variant.overrides)


def variant_config(cfg, overrides: dict):
    """The run's config with the variant's own overrides (e.g. a lower lr) applied."""
    if not overrides:
        return cfg
    vcfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    for key, value in overrides.items():
        OmegaConf.update(vcfg, key, value, merge=False)
    return vcfg


def _to(data: Data, device: torch.device, dtype: torch.dtype) -> Data:
    def move(t):
        if isinstance(t, torch.Tensor):
            return t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device)
        return t

    return Data(move(data.x), move(data.y), {k: move(v) for k, v in data.extra.items()})


@torch.no_grad()
def evaluate(scenario: Scenario, model, data: Data) -> tuple[float, Optional[float]]:
    """Exact loss (float64) and accuracy of the model's current outputs."""
    out = model(data.x).double()
    y = data.y.double() if data.y.is_floating_point() else data.y
    exact = float(scenario.exact_loss(out, y))
    acc = float(scenario.accuracy(out, y)) if scenario.accuracy else None
    return exact, acc


def train(scenario: Scenario, variant: Variant, cfg, raw: Data, ctx: Context) -> VariantResult:
    """Train one variant and measure it. Verdicts are left to nanlab.lab.verdicts."""
    started = time.perf_counter()
    prepared = variant.prepare(raw) if variant.prepare else raw
    overrides = overrides_of(variant, prepared, cfg)
    vcfg = variant_config(cfg, overrides)
    ctx = Context(vcfg, ctx.device, DTYPES[vcfg.dtype])  # a variant may train in another dtype
    data = _to(prepared, ctx.device, ctx.dtype)

    torch.manual_seed(int(vcfg.seed))
    model = variant.model(ctx, data) if variant.model else scenario.make_model(ctx, data, **variant.swap)
    apply_init(model, vcfg.init)
    model.to(device=ctx.device, dtype=ctx.dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(vcfg.optimizer, params)
    exact_start, acc_start = evaluate(scenario, model, data)

    scaler = torch.amp.GradScaler(ctx.device.type) if variant.loss_scaling else None
    grad_norms, exact_losses, skipped = [], [], 0
    target64 = data.y.double() if data.y.is_floating_point() else data.y

    # Plain values: an OmegaConf attribute read costs ~25 us, and the step reads these every time.
    clip = SimpleNamespace(**OmegaConf.to_container(vcfg.clip))

    def step():
        nonlocal skipped
        optimizer.zero_grad(set_to_none=True)
        autocast = torch.autocast(ctx.device.type, dtype=DTYPES[variant.amp]) if variant.amp else contextlib.nullcontext()
        with autocast:
            output = model(data.x)
            loss = variant.loss(output, data.y)
        # The exact float64 loss of this step's outputs: what every variant is scored by,
        # whatever its own training loss reads. Kept on the device until the end.
        with torch.no_grad():
            exact_losses.append(scenario.exact_loss(output.detach().double(), target64))
        if scaler is None:
            loss.backward()
        else:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        grad_norm = total_norm([p.grad for p in params if p.grad is not None])
        grad_norms.append(grad_norm)
        used = clip_gradients(params, clip, grad_norm)
        if scaler is None:
            optimizer.step()
        else:
            scale = scaler.get_scale()
            scaler.step(optimizer)
            scaler.update()
            if scaler.get_scale() < scale:  # the scaler found inf/NaN and skipped this update
                skipped += 1
                used = torch.zeros((), device=ctx.device)
        return loss, used, total_norm([p.detach() for p in params])

    guard = Guard(step, model, optimizer)
    losses, param_norms, first = [], [], None
    # A bar only for runs long enough to wonder about (steps=100000000): it appears
    # after five seconds, only when stderr is a terminal (disable=None), so logs stay
    # clean, and it is cleared when the variant ends.
    progress = tqdm(total=int(vcfg.steps), desc=f"{scenario.name}: {variant.name}", unit="step", delay=5.0,
                    mininterval=1.0, leave=False, file=sys.stderr, disable=None)
    with progress:
        for _ in range(int(vcfg.steps)):
            try:
                guard()
            except NonFiniteError as err:
                first = FirstNonFinite(err.step, _quantity(err), guard.last.loss, err.event)
                losses.append(guard.last.loss)
                break
            losses.append(guard.last.loss)
            param_norms.append(guard.last.param_norm)
            progress.update()

    exact_end, acc_end = evaluate(scenario, model, data)
    finite = first is None
    metrics = dict(scenario.metrics(model, data)) if scenario.metrics else {}
    if variant.loss_scaling:
        metrics["skipped_steps"] = skipped
    gap = losses[0] - exact_start if losses else None
    return VariantResult(
        name=variant.name, role=variant.role, summary=variant.summary, lossy=variant.lossy,
        overrides=overrides, finite=finite, first_nonfinite=first, losses=losses,
        grad_norms=[float(g) for g in grad_norms[: len(losses)]], param_norms=param_norms,
        exact_losses=[float(e) for e in exact_losses[: len(losses)]],
        final_loss=next((x for x in reversed(losses) if x == x and abs(x) != float("inf")), None),
        exact_loss_start=exact_start, exact_loss_end=exact_end, accuracy_start=acc_start, accuracy_end=acc_end,
        loss_gap=gap, metrics=metrics,
        seconds=time.perf_counter() - started,
    )


def _quantity(err: NonFiniteError) -> str:
    """The earliest non-finite quantity. The sentinel sees loss, gradients and
    parameters after the step; when the loss was finite but the tracer found the
    first bad value in the forward pass, an activation went first."""
    if err.quantity == "gradients" and err.event is not None and err.event.phase == "forward":
        return "activations"
    return err.quantity
