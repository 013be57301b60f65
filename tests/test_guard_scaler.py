"""The guard and torch.amp.GradScaler: a restored step leaves the scaler ready for
the next one, and a step the scaler skips (inf gradients) is skipped, not fatal."""
import pytest
import torch

import nanlab


def _setup(scale):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=scale)
    return model, opt, scaler


def _step(model, opt, scaler, boom=False, grad_scale=1.0):
    def step(x, y):
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        scaler.scale(loss * grad_scale).backward()
        scaler.unscale_(opt)
        if boom:
            raise RuntimeError("the step failed after unscale_")
        scaler.step(opt)
        scaler.update()
        return loss
    return step


def test_a_step_that_raises_after_unscale_leaves_the_scaler_ready():
    model, opt, scaler = _setup(2.0 ** 8)
    x, y = torch.ones(4, 3), torch.zeros(4, 1)
    with pytest.raises(RuntimeError, match="after unscale_"):
        nanlab.guard(_step(model, opt, scaler, boom=True), model, opt, schedulers=[scaler])(x, y)
    nanlab.guard(_step(model, opt, scaler), model, opt, schedulers=[scaler])(x, y)  # no "already been called"


def test_a_step_the_scaler_skips_is_skipped_as_unguarded():
    x, y = torch.ones(4, 3), torch.zeros(4, 1)
    # 2**100 * 1e10 * the loss overflows float32: the scaler finds inf gradients.
    runs = []
    for guarded in (False, True):
        model, opt, scaler = _setup(2.0 ** 100)
        step = _step(model, opt, scaler, grad_scale=1e10)
        if guarded:
            step = nanlab.guard(step, model, opt, schedulers=[scaler])
        before = [p.detach().clone() for p in model.parameters()]
        step(x, y)
        runs.append((scaler.get_scale(), [p.detach().clone() for p in model.parameters()], before))
    (scale_plain, params_plain, before_plain), (scale_guarded, params_guarded, _) = runs
    assert scale_plain == scale_guarded == 2.0 ** 99  # halved: the update was skipped
    assert all(torch.equal(a, b) for a, b in zip(params_plain, before_plain))
    assert all(torch.equal(a, b) for a, b in zip(params_plain, params_guarded))


def test_infinite_gradients_without_a_scaler_still_stop_the_guard():
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def step(x):
        opt.zero_grad()
        loss = model(x).sum()
        loss.backward()
        model.weight.grad.fill_(float("inf"))
        return loss

    with pytest.raises(nanlab.NonFiniteError) as caught:
        nanlab.guard(step, model, opt)(torch.ones(2, 3))
    assert caught.value.quantity == "gradients"
