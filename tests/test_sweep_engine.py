"""The batched engine against torch.optim and against single runs, in process."""
import math

import pytest
import torch
from omegaconf import OmegaConf

import nanlab
from nanlab.lab import registry
from nanlab.sweeps.engine import BatchedOptimizer, Engine, Run, clip, norms
from nanlab.config.compose import compose
from nanlab.sweeps.grid import sweep

SHAPES = [(5, 3), (5,), (1, 5), (1,)]  # a weight, its bias, an output row, a lone bias


def _torch_optimizer(name, params, lr, momentum, eps, weight_decay):
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, eps=eps, weight_decay=weight_decay)
    return torch.optim.RMSprop(params, lr=lr, eps=eps, momentum=momentum, weight_decay=weight_decay)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("name", ["sgd", "adam", "rmsprop"])
def test_batched_optimizer_is_torch_optim_copy_by_copy(name, dtype):
    """Per-copy lr, momentum (0 and not), eps and weight decay, over several steps:
    every copy's parameters are torch.optim's, bit for bit; a copy whose gradient is
    NaN does not change any other copy."""
    gen = torch.Generator().manual_seed(1)
    settings = [(0.1, 0.0, 1e-8, 0.0), (0.03, 0.9, 1e-3, 0.01), (0.5, 0.5, 1e-6, 0.0), (0.2, 0.0, 1e-8, 0.1)]
    copies = len(settings)
    start = [torch.randn(copies, *shape, generator=gen).to(dtype) for shape in SHAPES]
    hyper = {key: torch.tensor([s[i] for s in settings], dtype=torch.float64)
             for i, key in enumerate(("lr", "momentum", "eps", "weight_decay"))}
    batched = BatchedOptimizer(name, hyper, dtype)
    singles = []
    for c, (lr, momentum, eps, weight_decay) in enumerate(settings):
        params = [torch.nn.Parameter(t[c].clone()) for t in start]
        singles.append((params, _torch_optimizer(name, params, lr, momentum, eps, weight_decay)))
    params = start
    for step in range(4):
        grads = [torch.randn(copies, *shape, generator=gen).to(dtype) for shape in SHAPES]
        if step == 2:
            grads[0][1, 0, 0] = float("nan")  # copy 1 goes NaN; the batched step must keep it to itself
        params = batched.step(params, grads)
        for c, (single, optimizer) in enumerate(singles):
            for p, g in zip(single, grads):
                p.grad = g[c].clone()
            optimizer.step()
            for p, q in zip(single, params):
                assert torch.equal(p.detach(), q[c]) or (c == 1 and step >= 2), (name, step, c)
    assert torch.isnan(params[0][1]).any()
    assert all(torch.isfinite(p[[0, 2, 3]]).all() for p in params)


def test_clipping_per_copy_is_torchs():
    gen = torch.Generator().manual_seed(2)
    grads = [torch.randn(3, *shape, generator=gen) * 10 for shape in SHAPES]
    thresholds = torch.tensor([0.5, 1.0, 1e6], dtype=torch.float64)
    norm = norms(grads, torch.float32)
    clipped, checked = clip("norm", grads, thresholds, norm, lambda t: norms(t, torch.float32))
    for c, threshold in enumerate(thresholds.tolist()):
        single = [torch.nn.Parameter(torch.zeros_like(g[c])) for g in grads]
        for p, g in zip(single, grads):
            p.grad = g[c].clone()
        total = torch.nn.utils.get_total_norm([p.grad for p in single])
        torch.nn.utils.clip_grads_with_norm_(single, threshold, total)
        assert all(torch.equal(p.grad, q[c]) for p, q in zip(single, clipped))
    valued, _ = clip("value", grads, thresholds, norm, lambda t: norms(t, torch.float32))
    assert float(valued[0][0].abs().max()) == 0.5 and torch.equal(valued[0][2], grads[0][2])


def _points(base, **grid):
    """A finalized config per combination of the given values (dotted keys)."""
    import itertools

    keys = list(grid)
    out = []
    for values in itertools.product(*grid.values()):
        cfg = OmegaConf.create(OmegaConf.to_container(base))
        for key, value in zip(keys, values):
            OmegaConf.update(cfg, key, value)
        out.append(cfg)
    return out


@pytest.mark.parametrize("optimizer,lrs", [("sgd", [0.05, 0.2, 0.5, 1.0]), ("adam", [0.003, 0.1, 3.0])])
def test_sweep_rows_are_single_run_numbers(optimizer, lrs, tmp_path):
    """mode=sweep's rows, from the batched engine, against a separate
    ``nanlab.run(scenario, optimizer.lr=...)`` per point: the same first non-finite
    step and, within float tolerance, the same final loss, with and without norm clipping."""
    steps = 40
    overrides = ["scenario=tanh_explosion", "mode=sweep", f"optimizer={optimizer}", f"steps={steps}",
                 "variant=sgd_large_lr", f"sweep.lr=[{','.join(map(str, lrs))}]", "sweep.clip=[none,norm]"]
    lines = []
    summary, failed = sweep(compose(overrides), tmp_path, overrides, out=lines.append)
    assert failed == 0 and any(line.startswith("batched engine:") for line in lines), lines
    assert not any("in-process loop" in line for line in lines)
    assert len(summary.rows) == 2 * len(lrs)
    diverged = 0
    for row in summary.rows:
        single = nanlab.run("tanh_explosion", f"optimizer={optimizer}", f"optimizer.lr={row['optimizer.lr']}",
                            f"clip={row['clip']}", f"steps={steps}", "variant=sgd_large_lr").variant("sgd_large_lr")
        step = row["sgd_large_lr.first_nonfinite_step"]
        assert step == ("" if single.nonfinite_step is None else str(single.nonfinite_step)), row
        assert float(row["sgd_large_lr.final_loss"]) == pytest.approx(single.final_loss, rel=1e-6, abs=1e-12), row
        assert row["sgd_large_lr.learned"] == ("true" if single.learned else "false")
        diverged += step != ""
    if optimizer == "sgd":
        assert diverged >= 3  # the grid crosses the boundary: copies retire while others train on


def test_every_variant_matches_its_single_run_and_retired_copies_stop_costing_work():
    """All five variants of tanh_explosion at three lrs: each batched run equals the
    loop's run of that variant at that config (whole VariantResult, bar timing and the
    tracer's account). A copy that went non-finite trains no further."""
    scenario = registry.load("tanh_explosion")
    base = compose(["scenario=tanh_explosion", "steps=40"])
    points = _points(base, **{"optimizer.lr": [0.05, 0.3, 2.0]})
    engine = Engine(scenario)
    runs = [Run(v, p) for p in points for v in scenario.variants]
    schedule = engine.schedule(runs)
    outcomes = engine.train(schedule)
    assert {o.engine for o in outcomes} == {"batched"}
    # adam_1e-3 pins its own lr: one run answers all three points
    assert len(schedule.distinct) < len(runs)
    from nanlab.lab.loop import train
    from nanlab.lab.result import strip_timing
    from nanlab.lab.verdicts import judge_learning

    expected_work = 0
    for run, outcome in zip(runs, outcomes):
        ctx, raw = engine._raw_data(run.cfg)[1]
        single = judge_learning(train(scenario, run.variant, run.cfg, raw, ctx), scenario.learn)
        a, b = strip_timing(outcome.result.to_dict()), strip_timing(single.to_dict())
        if b["first_nonfinite"]:
            b["first_nonfinite"]["origin"] = None  # the engine leaves the op-level account to a single run
        assert a == b, (run.variant.name, run.cfg.optimizer.lr)
    for key in schedule.distinct:
        result = next(o.result for o, k in zip(outcomes, schedule.order) if k == key)
        expected_work += len(result.losses)
    assert engine.copy_steps == expected_work < len(schedule.distinct) * 40


def test_a_model_the_engine_cannot_batch_runs_in_the_loop_and_says_why():
    scenario = registry.load("bce_log_zero")
    cfg = compose(["scenario=bce_log_zero", "steps=3"])
    engine = Engine(scenario)
    schedule = engine.schedule([Run(scenario.broken, cfg)])
    (line,) = schedule.describe()
    assert line.startswith("in-process loop: 1 runs of hand_bce, because its model, LogisticRegression, is not")
    (outcome,) = engine.train(schedule)
    assert outcome.engine == "loop" and outcome.reason in line
    assert outcome.result.first_nonfinite is not None or math.isfinite(outcome.result.final_loss)


def test_thread_count_does_not_change_the_numbers():
    """A batch trained on one thread or on two (threads=N) gives the same bits."""
    scenario = registry.load("tanh_explosion")
    points = _points(compose(["scenario=tanh_explosion", "steps=12", "clip=norm"]),
                     **{"optimizer.lr": [0.1, 0.5, 2.0]})
    results = {}
    for threads in (1, 2):
        engine = Engine(scenario, threads=threads)
        outcomes = engine.train(engine.schedule([Run(scenario.broken, p) for p in points]))
        results[threads] = [(o.result.losses, o.result.grad_norms, o.result.exact_loss_end) for o in outcomes]
    assert results[1] == results[2]
