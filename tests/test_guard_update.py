"""The guard's check before each update: a refused update, the bound that spares the
copy and the one that cannot, each fallback to the copy, and the optimizer state
check that catches Adam's silent freeze."""
import pytest
import torch
from torch import nn

import nanlab
from nanlab.debug import sentinel
from nanlab.debug.sentinel import next_bounds
from test_guard_state import _linear_step


@pytest.fixture(autouse=True)
def prove_small_models(monkeypatch):
    """These models are small enough to be copied before every update: prove their
    updates as the guard does a large model's."""
    monkeypatch.setattr(sentinel, "COPY_BELOW_BYTES", 0)


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def _state(opt):
    return [{k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in s.items()} for s in opt.state.values()]


def _same(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def _same_state(a, b):
    return len(a) == len(b) and all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
                                    for x, y in zip(a, b))


def _scaled_step(model, opt):
    """A step whose batch scales the gradient: the weight's gradient is x itself."""
    def step(x):
        opt.zero_grad()
        loss = model(x).sum()
        loss.backward()
        opt.step()
        return loss
    return step


def _one_weight(optimizer=torch.optim.Adam, dtype=torch.float32, **hyper):
    torch.manual_seed(0)
    model = nn.Linear(1, 1, bias=False).to(dtype)
    opt = optimizer(model.parameters(), **hyper)
    return model, opt, nanlab.guard(_scaled_step(model, opt), model, opt)


# -- the update refused before it is made -------------------------------------------

def test_non_finite_gradients_are_refused_before_the_update_with_no_copy():
    torch.manual_seed(0)
    model = nn.Linear(1, 1, bias=False)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)

    def step(x, poison):
        opt.zero_grad()
        loss = model(x).sum()
        loss.backward()
        model.weight.grad.add_(poison)  # a finite loss, and this gradient
        opt.step()
        return loss

    guarded = nanlab.guard(step, model, opt)
    guarded(torch.ones(1, 1), 0.0)
    params, state = _params(model), _state(opt)
    steps = opt.state[model.weight]["step"].item()
    with pytest.raises(nanlab.NonFiniteError) as info:
        guarded(torch.ones(1, 1), float("nan"))
    assert info.value.quantity == "gradients" and not guarded.copied
    assert opt.state[model.weight]["step"].item() == steps  # Adam's step never ran
    assert _same(params, _params(model)) and _same_state(state, _state(opt))


# -- the bound that holds, and the one that does not --------------------------------

@pytest.mark.parametrize("make", [
    lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=0.1, amsgrad=True),
    lambda p: torch.optim.AdamW(p, lr=0.01),
    lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
    lambda p: torch.optim.RMSprop(p, lr=0.01, momentum=0.5),
])
def test_a_guarded_run_that_never_fails_copies_nothing_and_matches_an_unguarded_one_bit_for_bit(make):
    torch.manual_seed(1)
    batches = [torch.randn(8, 3) for _ in range(6)]
    runs = []
    for guarded in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.2), nn.Linear(8, 1))
        opt = make(model.parameters())
        step = _linear_step(model, opt)
        run = nanlab.guard(step, model, opt) if guarded else step
        losses = [run(x).item() for x in batches]
        if guarded:
            assert run.fallback is None and not run.copied
        runs.append((losses, _params(model), _state(opt)))
    (plain_losses, plain_params, plain_state), (losses, params, state) = runs
    assert plain_losses == losses and _same(plain_params, params) and _same_state(plain_state, state)


def test_an_update_the_bound_cannot_prove_is_copied_and_kept_when_it_stays_finite():
    model, opt, guarded = _one_weight(lr=0.1)
    guarded(torch.ones(1, 1))
    assert not guarded.copied
    # g*g = 1e38 is past a quarter of float32's range, yet 0.001 * g * g is not.
    guarded(torch.full((1, 1), 1e19))
    assert guarded.copied and guarded.last.bad is None and torch.isfinite(opt.state[model.weight]["exp_avg_sq"]).all()
    guarded(torch.ones(1, 1))  # the bound is measured again, and holds
    assert not guarded.copied


def test_the_bound_for_each_rule_stops_where_its_intermediate_overflows():
    group = dict(lr=0.1, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False)
    bounds = dict(param=1.0, exp_avg=0.0, exp_avg_sq=0.0, max_exp_avg_sq=0.0)
    limit = torch.finfo(torch.float32).max / 4
    adam = torch.optim.Adam([nn.Parameter(torch.ones(1))])
    assert next_bounds(adam, group, 1e18, bounds, limit, {torch.float32}) is not None
    assert next_bounds(adam, group, 1e19, bounds, limit, {torch.float32}) is None  # g*g
    # In float16, eps=1e-8 rounds to zero: no denominator is bounded away from it.
    assert next_bounds(adam, group, 1.0, bounds, 65504 / 4, {torch.float16}) is None
    rms = torch.optim.RMSprop([nn.Parameter(torch.ones(1))], centered=True)
    assert next_bounds(rms, dict(rms.param_groups[0]), 1.0, dict(param=1.0, square_avg=0.0,
                                    momentum_buffer=0.0, grad_avg=0.0), limit, {torch.float32}) is None


# -- the optimizer's state: Adam's silent freeze -------------------------------------

@pytest.mark.parametrize("dtype, gradient", [(torch.float32, 1e21), (torch.bfloat16, 1e21), (torch.float16, 1e4)])
def test_a_finite_gradient_that_overflows_adams_second_moment_raises_and_restores(dtype, gradient):
    model, opt, guarded = _one_weight(lr=0.1, dtype=dtype)
    guarded(torch.ones(1, 1, dtype=dtype))
    params, state = _params(model), _state(opt)
    with pytest.raises(nanlab.NonFiniteError) as info:
        guarded(torch.full((1, 1), gradient, dtype=dtype))
    assert info.value.quantity == "optimizer_state" and guarded.copied
    assert (info.value.event.op, info.value.event.phase) == ("aten.addcmul_", "optimizer")
    assert _same(params, _params(model)) and _same_state(state, _state(opt))


def test_unguarded_the_same_gradient_freezes_adam_with_finite_parameters():
    torch.manual_seed(0)
    model = nn.Linear(1, 1, bias=False)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    step = _scaled_step(model, opt)
    step(torch.ones(1, 1))
    step(torch.full((1, 1), 1e21))
    frozen = _params(model)
    step(torch.ones(1, 1))
    assert torch.isinf(opt.state[model.weight]["exp_avg_sq"]).all()
    assert _same(frozen, _params(model)) and torch.isfinite(frozen[0]).all()  # never moves again


# -- the fallbacks ---------------------------------------------------------------------

def _copies(make_optimizers, step_of, steps=2):
    """Whether each of a few good steps copied, and the guard's fallback."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))
    optimizers = make_optimizers(model)
    guarded = nanlab.guard(step_of(model, optimizers), model, optimizers)
    copied = []
    for _ in range(steps):
        guarded(torch.randn(8, 2))
        copied.append(guarded.copied)
    return copied, guarded.fallback


def _plain(model, optimizers):
    def step(x):
        for opt in optimizers:
            opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        for opt in optimizers:
            opt.step()
        return loss
    return step


def test_buffers_alone_are_copied_and_the_update_still_proven():
    copied, fallback = _copies(lambda m: [torch.optim.Adam(m.parameters(), lr=0.01)], _plain)
    assert copied == [False, False] and fallback is None


def test_an_unknown_optimizer_is_copied_every_step():
    copied, fallback = _copies(lambda m: [torch.optim.Adagrad(m.parameters(), lr=0.01)], _plain)
    assert copied == [True, True] and fallback is None


def test_each_of_several_optimizers_is_copied_just_before_its_update():
    copied, _ = _copies(lambda m: [torch.optim.SGD(m[0].parameters(), lr=0.01),
                                   torch.optim.Adam(m[2].parameters(), lr=0.01)], _plain)
    assert copied == [True, True]


def test_a_closure_is_copied():
    def step_of(model, optimizers):
        (opt,) = optimizers

        def step(x):
            def closure():
                opt.zero_grad()
                loss = model(x).pow(2).mean()
                loss.backward()
                return loss
            return opt.step(closure)
        return step

    copied, _ = _copies(lambda m: [torch.optim.SGD(m.parameters(), lr=0.01)], step_of)
    assert copied == [True, True]


def test_a_write_outside_optimizer_step_turns_on_the_full_copy_from_then_on():
    def step_of(model, optimizers):
        def step(x):
            loss = _plain(model, optimizers)(x)
            with torch.no_grad():
                model[0].weight.clamp_(-0.5, 0.5)  # weight clipping, after the update
            return loss
        return step

    copied, fallback = _copies(lambda m: [torch.optim.SGD(m.parameters(), lr=0.01)], step_of)
    assert copied == [False, True] and "outside optimizer.step()" in fallback


def test_without_an_optimizer_or_with_snapshot_always_everything_is_copied():
    model = nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    assert nanlab.guard(lambda: None, model).fallback == "no optimizer to hook"
    assert nanlab.guard(lambda: None, model, opt, snapshot="always").fallback == "snapshot='always'"
    with pytest.raises(ValueError, match="snapshot='never' is not allowed; use one of 'auto', 'always'"):
        nanlab.guard(lambda: None, model, opt, snapshot="never")


def test_a_small_model_is_copied_before_each_update_and_a_step_raising_after_it_is_undone(monkeypatch):
    monkeypatch.setattr(sentinel, "COPY_BELOW_BYTES", 1 << 20)
    model, opt, guarded = _one_weight(lr=0.1)
    guarded(torch.ones(1, 1))
    assert guarded.copied and guarded.fallback is None
    params, state = _params(model), _state(opt)
    with pytest.raises(nanlab.NonFiniteError) as info:
        guarded(torch.full((1, 1), 1e21))  # the freeze, caught by the same state check
    assert info.value.quantity == "optimizer_state"
    assert _same(params, _params(model)) and _same_state(state, _state(opt))
    with pytest.raises(nanlab.NonFiniteError) as info:
        guarded(torch.full((1, 1), float("nan")))  # refused before the update by the fused flag
    assert info.value.quantity == "loss" and _same(params, _params(model))
