"""Issue 4: small models with known NaN bugs; the tracer must place each one."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nanlab
from nanlab.lab.build import resolve_device
from nanlab.lab.scenario import Context
from nanlab.config.compose import compose
from nanlab.lab import registry

NEG_INF = float("-inf")


class MaskedAttention(nn.Module):
    def __init__(self, d=4):
        super().__init__()
        self.q, self.k = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x, mask):
        scores = self.q(x) @ self.k(x).T
        return torch.softmax(scores.masked_fill(~mask, NEG_INF), -1)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = MaskedAttention()
        self.head = nn.Linear(4, 1)

    def forward(self, x, mask):
        return self.head(self.attn(x, mask) @ x)


def traced(fn):
    """The first event, found both ways: checked op by op, and deferred (no host
    sync per op, as on CUDA). The two must agree exactly."""
    events = []
    for defer in (False, True):
        with nanlab.trace(defer=defer) as tr:
            fn()
        events.append(tr.first.to_dict() if tr.first else None)
    assert events[0] == events[1], events
    return tr.first


def test_fully_masked_row_is_placed_at_softmax():
    torch.manual_seed(0)
    model, x = Block(), torch.randn(3, 4)
    mask = torch.tensor([[True, True, False], [False, False, False], [True, False, True]])
    ev = traced(lambda: model(x, mask).sum().backward())
    assert (ev.op, ev.phase, ev.module, ev.kind, ev.origin) == ("aten._softmax", "forward", "attn (MaskedAttention)", "nan", "op")
    assert ev.source.startswith("test_tracer.py:")
    assert "NaN first in forward: aten._softmax in attn (MaskedAttention) (test_tracer.py:" in ev.describe()


def test_partly_masked_rows_are_not_reported():
    torch.manual_seed(0)
    model, x = Block(), torch.randn(3, 4)
    mask = torch.tensor([[True, True, False], [True, False, False], [True, False, True]])
    assert traced(lambda: model(x, mask).sum().backward()) is None


def test_causal_mask_from_full_is_not_reported():
    x = torch.randn(4, 4, requires_grad=True)

    def run():
        causal = torch.full((4, 4), NEG_INF).triu(1)
        torch.softmax(x @ x.T + causal, -1).sum().backward()

    assert traced(run) is None


class Standardize(nn.Module):
    def forward(self, x):
        return (x - x.mean(0)) / x.std(0)


def test_zero_variance_standardization_is_placed_at_div():
    model = nn.Sequential(Standardize(), nn.Linear(2, 1))
    x = torch.stack([torch.randn(8), torch.full((8,), 3.0)], 1)  # second column is constant
    ev = traced(lambda: model(x).sum().backward())
    assert (ev.op, ev.phase, ev.module, ev.kind, ev.origin) == ("aten.div", "forward", "0 (Standardize)", "nan", "op")


class Norm(nn.Module):
    def forward(self, x):
        return torch.sqrt((x * x).sum(-1))


def test_sqrt_at_zero_is_placed_in_backward():
    model = nn.Sequential(nn.Linear(3, 3, bias=False), Norm())
    with torch.no_grad():
        model[0].weight.zero_()  # the layer's output, and so its norm, is exactly 0
    x = torch.randn(2, 3)
    ev = traced(lambda: model(x).sum().backward())
    assert ev.phase == "backward" and ev.node == "SqrtBackward0" and ev.forward_op == "aten.sqrt"
    assert ev.kind in {"inf", "nan"} and ev.origin == "op" and ev.module == "1 (Norm)"


class ReciprocalNoGuard(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * 0 + 1.0  # a constant whose hand-written "derivative" divides by x

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad / x


def test_custom_function_backward_is_named():
    x = torch.tensor([1.0, 0.0, 2.0], requires_grad=True)
    ev = traced(lambda: ReciprocalNoGuard.apply(x).sum().backward())
    assert ev.phase == "backward" and ev.node == "ReciprocalNoGuardBackward"
    assert ev.forward_op == "ReciprocalNoGuard" and ev.op == "aten.div" and ev.kind == "inf"
    assert ev.source.startswith("test_tracer.py:")  # the line inside the custom backward


def test_log_of_relu_output_is_reported():
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    x = torch.tensor([[-100.0, -100.0]])
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        model[0].bias.zero_()
    ev = traced(lambda: torch.log(model(x)).sum())
    assert (ev.op, ev.phase, ev.kind, ev.origin) == ("aten.log", "forward", "inf", "op")


def test_division_by_zero_is_reported():
    ev = traced(lambda: torch.ones(3) / torch.tensor([1.0, 0.0, 1.0]))
    assert (ev.op, ev.kind, ev.origin) == ("aten.div", "inf", "op")
    assert ev.input_absmax == 1.0


def test_nan_in_input_data_has_origin_input():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    x = torch.randn(5, 3)
    x[2, 1] = float("nan")
    ev = traced(lambda: model(x).sum().backward())
    assert ev.origin == "input" and ev.phase == "forward" and ev.module == "0 (Linear)" and ev.kind == "nan"
    assert ev.input_absmax is not None


def test_healthy_model_is_not_reported():
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def run():
        opt.zero_grad()
        F.cross_entropy(model(torch.randn(6, 3)), torch.randint(0, 2, (6,))).backward()
        opt.step()

    assert traced(run) is None


def test_trace_never_raises_and_the_block_runs_to_the_end():
    done = []
    with nanlab.trace() as tr:
        y = torch.log(torch.zeros(2))
        done.append(float(y.sum()))
    assert tr.first is not None and done == [NEG_INF]


def _scenario_step(name, make_step):
    cfg = compose([f"scenario={name}"])
    scenario = registry.load(name)
    ctx = Context(cfg, resolve_device("cpu"), torch.float32)
    data = scenario.make_data(ctx)
    data.x = data.x.float()
    torch.manual_seed(0)
    model = scenario.make_model(ctx, data)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.optimizer.lr)
    return model, opt, make_step(opt, lambda: scenario.broken.loss(model(data.x), data.y))


@pytest.mark.parametrize("name", ["softmax_overflow", "custom_backward_div0"])
def test_guard_raises_the_event_the_scenario_reports(result_of, make_step, name):
    model, opt, step = _scenario_step(name, make_step)
    guarded = nanlab.guard(step, model, opt)
    with pytest.raises(nanlab.NonFiniteError) as info:
        for _ in range(200):
            guarded()
    reported = result_of(name).broken.first_nonfinite
    assert info.value.step == reported.step
    assert info.value.event == reported.event


def test_guard_restores_exactly_the_pre_step_state(make_step):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    x = torch.randn(16, 2)
    poison = {"on": False}

    def poisoned_loss():
        out = model(x)
        return F.mse_loss(out, torch.zeros_like(out)) * (float("nan") if poison["on"] else 1.0)

    guarded = nanlab.guard(make_step(opt, poisoned_loss), model, opt)
    for _ in range(5):
        guarded()
    params = [p.detach().clone() for p in model.parameters()]
    state = {k: v.clone() for s in opt.state.values() for k, v in s.items() if torch.is_tensor(v)}
    steps = [s["step"].clone() for s in opt.state.values()]
    poison["on"] = True
    with pytest.raises(nanlab.NonFiniteError) as info:
        guarded()
    assert info.value.step == 5 and info.value.quantity == "loss"
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
    after = {k: v for s in opt.state.values() for k, v in s.items() if torch.is_tensor(v)}
    assert all(torch.equal(state[k], after[k]) for k in state)
    assert all(torch.equal(a, s["step"]) for a, s in zip(steps, opt.state.values()))
    # The last step's gradients, which its optimizer step applied, come back cleared.
    assert all(p.grad is None for p in model.parameters())


def test_guard_places_a_parameter_overflow_in_the_optimizer_step(make_step):
    torch.manual_seed(0)
    model = nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=1e37)
    x, y = torch.randn(8, 2) * 100, torch.randn(8, 1)

    guarded = nanlab.guard(make_step(opt, lambda: F.mse_loss(model(x), y)), model, opt)
    with pytest.raises(nanlab.NonFiniteError) as info:
        for _ in range(5):
            guarded()
    err = info.value
    assert err.quantity == "parameters" and err.step == 0
    assert err.event.phase == "optimizer" and err.event.kind == "inf"
    assert all(torch.isfinite(p).all() for p in model.parameters())  # restored to before step 0


def test_guard_catches_a_bad_gradient_the_optimizer_never_applies(make_step):
    # The frozen weight is outside the optimizer, so only the gradient check can see it.
    torch.manual_seed(0)
    model = nn.Linear(2, 1)
    opt = torch.optim.SGD([model.bias], lr=0.1)
    x = torch.randn(8, 2)
    poison = {"on": False}

    def poisoned_loss():
        weight = model.weight * (torch.full_like(model.weight, float("inf")) if poison["on"] else 1.0)
        return (F.linear(x, weight.clamp(-1, 1), model.bias) ** 2).mean()

    guarded = nanlab.guard(make_step(opt, poisoned_loss), model, opt)
    guarded()
    assert guarded.last.bad is None and math.isnan(guarded.last.grad_norm)  # not measured, still checked
    poison["on"] = True
    with pytest.raises(nanlab.NonFiniteError) as info:
        guarded()
    assert info.value.step == 1 and info.value.quantity == "gradients"
    assert info.value.event.phase == "backward"


def test_sentinel_flags_bad_values_and_leaves_every_value_as_it_was():
    from nanlab.debug.sentinel import Sentinel

    weight = nn.Parameter(torch.tensor([1.0, -0.0, 1e-45, -3e38]))
    grads = torch.tensor([float("nan"), 2.0, -0.0, 1e-40])
    weight.grad = grads.clone()
    sentinel = Sentinel([weight])
    check = sentinel.check(torch.tensor(0.5))
    assert check.loss == 0.5 and math.isnan(check.grad_norm) and math.isnan(check.param_norm)
    assert check.bad == "gradients"
    # Bit for bit, signed zeros and subnormals included.
    assert torch.equal(weight.detach().view(torch.int32),
                       torch.tensor([1.0, -0.0, 1e-45, -3e38]).view(torch.int32))
    assert torch.equal(weight.grad[1:].view(torch.int32), grads[1:].view(torch.int32))
    weight.grad = torch.zeros(4)
    assert sentinel.check(torch.tensor(0.5)).bad is None  # the parameters were never flagged
    with torch.no_grad():
        weight[0] = float("inf")
    assert sentinel.check(torch.tensor(0.5)).bad == "parameters"


def test_sentinel_reads_a_float64_loss_without_rounding_or_overflow():
    from nanlab.debug.sentinel import Sentinel

    weight = nn.Parameter(torch.ones(2, dtype=torch.float64))
    sentinel = Sentinel([weight])
    assert sentinel.check(torch.tensor(1e300, dtype=torch.float64)).loss == 1e300
    assert sentinel.check(torch.tensor(0.1, dtype=torch.float64)).loss == 0.1


def test_sentinel_checks_sparse_gradients_one_by_one():
    from nanlab.debug.sentinel import Sentinel

    emb = nn.Embedding(5, 3, sparse=True)
    sentinel = Sentinel(list(emb.parameters()))
    emb(torch.tensor([1, 2])).sum().backward()
    assert emb.weight.grad.is_sparse and sentinel.check(torch.tensor(1.0)).bad is None
    emb.zero_grad()
    (emb(torch.tensor([1])) * float("nan")).sum().backward()
    assert sentinel.check(torch.tensor(1.0)).bad == "gradients"


def test_sentinel_checks_complex_parameters_one_by_one():
    from nanlab.debug.sentinel import Sentinel

    weight = nn.Parameter(torch.ones(3, dtype=torch.complex64))
    sentinel = Sentinel([weight])
    weight.grad = torch.zeros(3, dtype=torch.complex64)
    assert sentinel.check(torch.tensor(1.0)).bad is None
    weight.grad[1] = complex(float("inf"), 0.0)
    assert sentinel.check(torch.tensor(1.0)).bad == "gradients"


def test_result_json_carries_the_origin_and_the_report_prints_it(result_of):
    from nanlab.reports.scenario_report import render

    r = result_of("custom_backward_div0")
    origin = r.to_dict()["variants"][0]["first_nonfinite"]["origin"]
    assert origin["node"] == "SqrtDivByZeroBackward" and origin["phase"] == "backward"
    assert "Inf first in backward: SqrtDivByZeroBackward (backward of SqrtDivByZero)" in render(r)


def test_total_norm_of_large_finite_float16_gradients_is_finite():
    from nanlab.debug.sentinel import total_norm

    norm = total_norm([torch.full((4,), 60000.0, dtype=torch.float16)])
    assert norm.dtype == torch.float32 and norm.item() == 120000.0
    assert total_norm([torch.full((2,), 0.1, dtype=torch.float64)]).dtype == torch.float64


class Deep(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(*[nn.Linear(2, 2) for _ in range(7)])

    def forward(self, x):
        return self.layers(x)


def test_a_module_is_named_by_its_path_in_the_model_and_its_class():
    model = Deep()
    with torch.no_grad():
        model.layers[6].bias.fill_(float("inf"))  # +inf already in a parameter: bad input
    ev = traced(lambda: model(torch.ones(1, 2)).sum())
    assert ev.module == "layers.6 (Linear)"
    assert "aten.addmm in layers.6 (Linear) (test_tracer.py:" in ev.describe()
