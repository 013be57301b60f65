"""What the guard checks, restores and refuses (issue "Verdicts you can trust on real
code", items 9, 11 and 13 to 16): buffers, rebound state, several optimizers,
schedulers, accumulated gradients, a step's own exceptions, replays that differ, and
steps that return the wrong thing."""
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nanlab

NAN = float("nan")


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def _same(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


# -- 9 and 11: what the guard sees --------------------------------------------------

def test_guard_names_the_op_that_turns_a_mask_into_an_infinite_loss_and_refuses_its_update():
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    allowed = torch.tensor([[True, False, True]])
    x = torch.randn(1, 4)

    def step(label):
        opt.zero_grad()
        loss = F.cross_entropy(model(x).masked_fill(~allowed, float("-inf")), label)
        loss.backward()  # finite gradients: the masked class gets none
        opt.step()
        return loss

    guarded = nanlab.guard(step, model, opt)
    guarded(torch.tensor([2]))  # an allowed class: a finite loss
    params = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(nanlab.NonFiniteError) as info:
        guarded(torch.tensor([1]))  # the masked class: +inf
    assert info.value.quantity == "loss"
    # Refused before the update, with nothing copied: the parameters never moved.
    assert not guarded.copied and all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
    assert info.value.event.op == "aten.nll_loss_forward" and info.value.event.kind == "inf"


def _batch_norm_guard():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    step = _linear_step(model, opt)

    return model, nanlab.guard(step, model, opt)


def test_guard_catches_a_running_variance_that_overflows_while_the_loss_stays_finite():
    model, guarded = _batch_norm_guard()
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(2))
        model[0].bias.zero_()
    guarded(torch.tensor([[1.0, 2.0], [-1.0, 0.0], [0.5, 1.0]]))
    running_var = model[1].running_var.clone()
    with pytest.raises(nanlab.NonFiniteError) as info:
        guarded(torch.tensor([[1e20, 1.0], [-1e20, 2.0], [3e19, 0.0]]))
    assert info.value.quantity == "buffers"
    assert info.value.event.op == "aten.native_batch_norm" and info.value.event.module == "1 (BatchNorm1d)"
    assert torch.equal(model[1].running_var, running_var)  # restored


def test_after_a_bad_batch_is_caught_the_next_good_batch_passes():
    # The sentinel's flags only ever get set by its fused check: a failure that left
    # them set would fail every later batch, good ones too, as "buffers".
    model, guarded = _batch_norm_guard()
    guarded(torch.tensor([[1.0, 2.0], [-1.0, 0.0], [0.5, 1.0]]))
    with pytest.raises(nanlab.NonFiniteError) as info:
        guarded(torch.tensor([[1e20, 1.0], [-1e20, 2.0], [3e19, 0.0]]))
    assert info.value.quantity == "buffers"
    guarded(torch.tensor([[1.0, 2.0], [-1.0, 0.0], [0.5, 1.0]]))
    assert guarded.last.bad is None


def test_the_sentinel_clears_its_flags_after_a_failure():
    from nanlab.debug.sentinel import Sentinel

    weight = nn.Parameter(torch.ones(2))
    weight.grad = torch.zeros(2)
    running = torch.tensor([1.0, float("inf")])
    sentinel = Sentinel([weight])
    assert sentinel.check(torch.tensor(1.0), buffers=[running]).bad == "buffers"
    running[1] = 1.0
    assert sentinel.check(torch.tensor(1.0), buffers=[running]).bad is None
    weight.grad[0] = float("nan")
    assert sentinel.check(torch.tensor(1.0), buffers=[running]).bad == "gradients"
    weight.grad[0] = 0.0
    assert sentinel.check(torch.tensor(1.0), buffers=[running]).bad is None


def test_guard_lets_a_batch_with_a_finite_running_variance_through():
    model, guarded = _batch_norm_guard()
    guarded(torch.tensor([[1.0, 2.0], [-1.0, 0.0], [0.5, 1.0]]))
    guarded(torch.tensor([[1e3, 1.0], [-1e3, 2.0], [3e2, 0.0]]))
    assert guarded.last.bad is None and torch.isfinite(model[1].running_var).all()


# -- 13: the snapshot follows what the step touches ---------------------------------

class RunningCentre(nn.Module):
    """Centres its input on a running mean that it rebinds every call (self.centre = ...)."""

    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(2, 1)
        self.register_buffer("centre", torch.zeros(2))

    def forward(self, x):
        self.centre = 0.9 * self.centre + 0.1 * x.mean(0).detach()
        return self.layer(x - self.centre)


def _train(make, batches, bad_at=None, spoil=lambda x: torch.full_like(x, NAN)):
    """Losses of a guarded run over ``batches``; at ``bad_at`` a spoiled batch comes in
    first, is refused, and the run goes on as if it had never come."""
    torch.manual_seed(0)
    model, opt, step = make()
    guarded = nanlab.guard(step, model, opt)
    losses = []
    for i, x in enumerate(batches):
        if i == bad_at:
            with pytest.raises(nanlab.NonFiniteError):
                guarded(spoil(x))
        losses.append(guarded(x).item())
    return losses, _params(model), model


def _centre_model():
    model = RunningCentre()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    step = _linear_step(model, opt)

    return model, opt, step


def test_a_rebound_buffer_is_restored_and_later_steps_run_as_if_the_bad_batch_never_came():
    torch.manual_seed(1)
    batches = [torch.randn(8, 2) + 3 for _ in range(4)]
    clean, clean_params, clean_model = _train(_centre_model, batches)
    restored, restored_params, model = _train(_centre_model, batches, bad_at=2)
    assert clean == restored and _same(clean_params, restored_params)
    assert torch.equal(clean_model.centre, model.centre)


def _lbfgs_model():
    model = nn.Linear(3, 1)
    opt = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=3, history_size=4)

    def step(x):
        y = x.sum(1, keepdim=True)

        def closure():
            opt.zero_grad()
            loss = F.mse_loss(model(x), y)
            loss.backward()
            return loss

        return opt.step(closure)

    return model, opt, step


def test_lbfgs_state_that_the_step_rebinds_is_restored():
    torch.manual_seed(2)
    batches = [torch.randn(16, 3) for _ in range(5)]
    clean, clean_params, _ = _train(_lbfgs_model, batches)
    # A batch whose finite loss sends LBFGS's iterations past float32: the step rebinds
    # its search direction and last gradient before the parameters overflow.
    restored, restored_params, _ = _train(_lbfgs_model, batches, bad_at=2, spoil=lambda x: x * 1e10)
    assert clean == restored and _same(clean_params, restored_params)


def _two_optimizer_model():
    model = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 1))
    adam = torch.optim.Adam(model[0].parameters(), lr=0.01)
    sgd = torch.optim.SGD(model[2].parameters(), lr=0.05, momentum=0.9)

    def step(x):
        adam.zero_grad()
        sgd.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        adam.step()
        sgd.step()
        return loss

    return model, [adam, sgd], step


def test_guard_restores_every_optimizer_it_is_given():
    torch.manual_seed(3)
    batches = [torch.randn(8, 2) for _ in range(4)]
    clean, clean_params, _ = _train(_two_optimizer_model, batches)
    restored, restored_params, _ = _train(_two_optimizer_model, batches, bad_at=2)
    assert clean == restored and _same(clean_params, restored_params)


def test_guard_restores_the_schedulers_it_is_given_and_the_learning_rate():
    torch.manual_seed(4)
    model = nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)

    def step(x):
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        opt.step()
        scheduler.step()
        return loss

    guarded = nanlab.guard(step, model, opt, schedulers=[scheduler])
    guarded(torch.randn(4, 2))
    epoch, lr = scheduler.last_epoch, opt.param_groups[0]["lr"]
    with pytest.raises(nanlab.NonFiniteError):
        guarded(torch.full((4, 2), NAN))
    assert (scheduler.last_epoch, opt.param_groups[0]["lr"], scheduler.get_last_lr()) == (epoch, lr, [lr])
    guarded(torch.randn(4, 2))
    assert (scheduler.last_epoch, opt.param_groups[0]["lr"]) == (epoch + 1, lr / 2)


def _accumulating_guard():
    """Two backward passes per optimizer step: the odd calls only accumulate."""
    torch.manual_seed(5)
    model = nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    calls = {"n": 0}

    def step(x):
        loss = model(x).pow(2).mean()
        loss.backward()
        calls["n"] += 1
        if calls["n"] % 2 == 0:
            opt.step()
            opt.zero_grad()
        return loss

    return model, calls, nanlab.guard(step, model, opt)


def test_gradients_a_step_accumulates_into_are_restored():
    model, calls, guarded = _accumulating_guard()
    guarded(torch.randn(4, 2))  # first half of the accumulation: gradients, no update yet
    accumulated = [p.grad.clone() for p in model.parameters()]
    with pytest.raises(nanlab.NonFiniteError):
        guarded(torch.full((4, 2), NAN))  # would add NaN to them
    assert _same(accumulated, [p.grad for p in model.parameters()])


def test_gradients_an_optimizer_step_already_applied_come_back_cleared():
    torch.manual_seed(5)
    model = nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    step = _linear_step(model, opt)

    guarded = nanlab.guard(step, model, opt)
    guarded(torch.randn(4, 2))
    assert all(p.grad is not None for p in model.parameters())  # applied, and kept until the next zero_grad
    with pytest.raises(nanlab.NonFiniteError):
        guarded(torch.full((4, 2), NAN))
    assert all(p.grad is None for p in model.parameters())


# -- 14: a step's own exception -----------------------------------------------------

def _failing_step_guard(fail, snapshot="auto", before_update=False):
    torch.manual_seed(6)
    model = nn.Linear(2, 1)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)

    def step(x):
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        if fail and before_update:
            raise ValueError("the data loader's next batch is malformed")
        opt.step()  # the update lands before the step fails
        if fail:
            raise ValueError("the data loader's next batch is malformed")
        return loss

    return model, opt, nanlab.guard(step, model, opt, snapshot=snapshot)


@pytest.mark.parametrize("snapshot, before_update", [("always", False), ("auto", False), ("auto", True)])
def test_a_step_that_raises_is_restored_and_its_exception_re_raised(snapshot, before_update):
    model, opt, guarded = _failing_step_guard(fail=True, snapshot=snapshot, before_update=before_update)
    before = _params(model)
    with pytest.raises(ValueError, match="malformed") as info:
        guarded(torch.randn(4, 2))
    assert _same(before, _params(model)) and len(opt.state) == 0
    assert not getattr(info.value, "__notes__", None)


def test_a_step_that_raises_after_an_update_the_guard_proved_and_did_not_copy_keeps_it_and_says_so(monkeypatch):
    from nanlab.debug import sentinel

    monkeypatch.setattr(sentinel, "COPY_BELOW_BYTES", 0)  # prove even this small model's updates
    model, opt, guarded = _failing_step_guard(fail=True)
    kept, _, plain = _failing_step_guard(fail=False)
    x = torch.randn(4, 2)
    with pytest.raises(ValueError, match="malformed") as info:
        guarded(x)
    assert "the update is kept" in info.value.__notes__[0]
    plain.step_fn(x)  # the same step, unguarded
    assert _same(_params(kept), _params(model)) and len(opt.state) == 2


def test_a_step_that_returns_keeps_its_update():
    model, opt, guarded = _failing_step_guard(fail=False)
    before = _params(model)
    guarded(torch.randn(4, 2))
    assert not _same(before, _params(model)) and len(opt.state) == 2


# -- 15: the replay's side effects ---------------------------------------------------

def _batches():
    torch.manual_seed(7)
    good = [torch.randn(4, 2) for _ in range(3)]
    return [good[0], torch.full((4, 2), NAN), good[1], good[2]]


def _linear_step(model, opt):
    def step(x):
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        opt.step()
        return loss
    return step


def test_a_step_that_pulls_its_batch_from_an_iterator_is_warned_about():
    model = nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = iter(_batches())
    step = _linear_step(model, opt)
    guarded = nanlab.guard(lambda: step(next(batches)), model, opt)
    guarded()
    with pytest.warns(RuntimeWarning, match="its replay returned loss"), pytest.raises(nanlab.NonFiniteError):
        guarded()  # fails on the NaN batch; its replay draws the next, good one


def test_a_step_that_takes_its_batch_as_an_argument_replays_it_without_a_warning():
    model = nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = iter(_batches())
    guarded = nanlab.guard(_linear_step(model, opt), model, opt)
    guarded(next(batches))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(nanlab.NonFiniteError) as info:
            guarded(next(batches))
    assert info.value.event is not None and info.value.event.origin == "input"


# -- 16: what a step must return -------------------------------------------------------

@pytest.mark.parametrize("returned, says", [
    (lambda loss: loss.item(), "it returned a float (return the tensor, not loss.item())"),
    (lambda loss: loss.expand(4), "it returned a tensor of shape (4,) (reduce it first"),
    (lambda loss: {"loss": loss}, "it returned a dict (return the loss entry"),
])
@pytest.mark.parametrize("snapshot", ["always", "auto"])
def test_a_step_that_returns_something_else_than_a_loss_tensor_is_told_what_the_guard_expects(returned, says, snapshot):
    model = nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    step = _linear_step(model, opt)
    before = _params(model)
    guarded = nanlab.guard(lambda x: returned(step(x)), model, opt, snapshot=snapshot)
    with pytest.raises(TypeError) as info:
        guarded(torch.randn(4, 2))
    message = str(info.value)
    assert "\n" not in message and "one-element tensor" in message and says in message
    assert _same(before, _params(model))  # the step it could not check is undone


@pytest.mark.parametrize("returned", [lambda loss: loss, lambda loss: loss.reshape(1),
                                      lambda loss: (loss, None), lambda loss: (loss.reshape(1, 1), None, None)])
def test_a_one_element_loss_alone_or_in_a_tuple_is_accepted(returned):
    model = nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    step = _linear_step(model, opt)
    guarded = nanlab.guard(lambda x: returned(step(x)), model, opt)
    guarded(torch.randn(4, 2))
    assert guarded.last.bad is None and math.isfinite(guarded.last.loss)
