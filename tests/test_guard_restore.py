"""What the guard restores after a failed step, and how the loop names what went first."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nanlab


def test_a_failed_first_step_leaves_no_optimizer_state_and_the_rng_as_it_was(make_step):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 8), nn.Dropout(0.5), nn.Linear(8, 1))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    x, y = torch.randn(16, 2), torch.zeros(16, 1)
    x[3, 1] = float("nan")
    guarded = nanlab.guard(make_step(opt, lambda: F.mse_loss(model(x), y)), model, opt)
    rng = torch.get_rng_state()
    with pytest.raises(nanlab.NonFiniteError) as info:
        guarded()
    assert info.value.step == 0
    assert len(opt.state) == 0  # Adam's moments, made by the failed step, are gone
    assert torch.equal(torch.get_rng_state(), rng)  # dropout drew in the step and in its replay


def test_after_a_restore_the_next_steps_match_a_run_that_never_failed(make_step):
    """Optimizer state and RNG restored: skipping the bad batch gives exactly the run
    that never saw it."""
    def run(with_bad_batch):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(2, 8), nn.Dropout(0.5), nn.Linear(8, 1))
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
        good, bad = torch.randn(16, 2), torch.full((16, 2), float("nan"))
        batch = {"x": good}
        guarded = nanlab.guard(make_step(opt, lambda: F.mse_loss(model(batch["x"]), torch.zeros(16, 1))), model, opt)
        losses = [guarded().item()]
        if with_bad_batch:
            batch["x"] = bad
            with pytest.raises(nanlab.NonFiniteError):
                guarded()
            batch["x"] = good
        losses += [guarded().item() for _ in range(3)]
        return losses, [p.detach().clone() for p in model.parameters()]

    (clean, clean_params), (restored, restored_params) = run(False), run(True)
    assert clean == restored
    assert all(torch.equal(a, b) for a, b in zip(clean_params, restored_params))


def test_loop_names_activations_when_the_loss_is_finite_but_the_forward_was_not():
    """exp overflows to inf, a clamp hides it from the loss, and the backward turns it
    into NaN gradients: the sentinel sees gradients, the tracer the forward exp."""
    from omegaconf import OmegaConf

    from nanlab.lab.loop import train
    from nanlab.lab.scenario import Context, Data, Learn, Scenario, Variant

    def hidden_overflow(out, y):
        return torch.exp(out * 1000).clamp(max=1.0).mean() + F.mse_loss(out, y)

    scenario = Scenario("hidden_overflow", "", "", "nonfinite", Learn(), make_data=None,
                        make_model=lambda ctx, data: nn.Linear(2, 1), exact_loss=F.mse_loss, variants=[])
    cfg = OmegaConf.create({"seed": 0, "steps": 3, "dtype": "float32", "optimizer": {"name": "sgd", "lr": 0.1,
                            "momentum": 0.0, "weight_decay": 0.0}, "init": {"name": "default"},
                            "clip": {"name": "none", "threshold": 1.0}})
    data = Data(torch.ones(4, 2, dtype=torch.float64), torch.zeros(4, 1, dtype=torch.float64))
    ctx = Context(cfg, torch.device("cpu"), torch.float32)
    v = train(scenario, Variant("v", "broken", "", hidden_overflow,
                                model=lambda ctx, data: _big_linear()), cfg, data, ctx)
    first = v.first_nonfinite
    assert first.quantity == "activations" and first.step == 0
    assert first.event.op == "aten.exp" and first.event.phase == "forward"
    assert v.losses[0] == v.losses[0]  # the loss itself was finite


def _big_linear():
    layer = nn.Linear(2, 1)
    with torch.no_grad():
        layer.weight.fill_(1.0)
        layer.bias.zero_()
    return layer
