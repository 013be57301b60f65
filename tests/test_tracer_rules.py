"""The tracer's rules on real code: masks, values that reach nothing, every written
argument, phases, threads and reused memory (issue "Verdicts you can trust on real
code", items 8 to 12). Every model runs both ways, checked op by op and deferred."""
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nanlab

NEG_INF = float("-inf")


def traced(fn):
    """The tracer after running ``fn`` both ways; the two must agree on the first
    event and on the transient ones."""
    seen = []
    for defer in (False, True):
        with nanlab.trace(defer=defer) as tr:
            fn()
        seen.append(((tr.first.to_dict() if tr.first else None), [e.to_dict() for e in tr.transient]))
    assert seen[0] == seen[1], seen
    return tr


# -- 8. A mask does not hide a real overflow ---------------------------------------

def _hand_softmax(x, mask):
    scores = x.masked_fill(~mask, NEG_INF)
    e = torch.exp(scores)
    return e / e.sum(-1, keepdim=True)


def test_exp_overflow_next_to_a_masked_entry_is_placed_at_exp():
    mask = torch.tensor([[True, True, False]])
    x = torch.tensor([[100.0, 1.0, 2.0]], requires_grad=True)  # exp(100) overflows float32
    ev = traced(lambda: _hand_softmax(x, mask).sum().backward()).first
    assert (ev.op, ev.phase, ev.kind, ev.origin) == ("aten.exp", "forward", "inf", "op")


def test_the_same_softmax_without_the_overflow_is_not_reported():
    mask = torch.tensor([[True, True, False]])
    x = torch.tensor([[10.0, 1.0, 2.0]], requires_grad=True)
    tr = traced(lambda: _hand_softmax(x, mask).sum().backward())
    assert tr.first is None and tr.transient == []


def _causal_half_attention(peak):
    torch.manual_seed(0)
    q, k = torch.randn(2, 4, 8).half(), torch.randn(2, 4, 8).half()
    q[:, 0], k[:, 0] = peak, peak  # the first query with the first key: 8 * peak^2
    causal = torch.full((4, 4), NEG_INF, dtype=torch.float16).triu(1)
    return lambda: torch.softmax(torch.baddbmm(causal, q, k.transpose(1, 2)), -1).float().sum()


def test_float16_attention_overflow_under_a_causal_mask_is_placed_at_baddbmm():
    ev = traced(_causal_half_attention(100.0)).first  # 80000 is past float16's 65504
    assert (ev.op, ev.kind, ev.origin) == ("aten.baddbmm", "inf", "op")


def test_float16_attention_under_a_causal_mask_without_overflow_is_not_reported():
    tr = traced(_causal_half_attention(10.0))
    assert tr.first is None and tr.transient == []


def test_a_constant_writer_passing_an_overflow_on_does_not_make_it_a_mask():
    keep = torch.tensor([True, False, True])
    x = torch.tensor([100.0, 1.0, 2.0])
    # where() copies exp's +inf through: still exp's value, still reported.
    assert traced(lambda: torch.where(keep, torch.exp(x), 0.0).sum()).first.op == "aten.exp"
    # The +inf where() writes itself (a min-style mask) is a mask.
    tr = traced(lambda: torch.where(keep, x, float("inf")).sum())
    assert tr.first is None and tr.transient == []


_TWICE = torch.tensor([0, 0])  # two writes into entry 0


@pytest.mark.parametrize("op, write", [
    ("aten.index_put_", lambda x, v: x.index_put_((_TWICE,), v, accumulate=True)),
    ("aten.index_put", lambda x, v: torch.index_put(x, (_TWICE,), v, accumulate=True)),
    ("aten.index_add_", lambda x, v: x.index_add_(0, _TWICE, v)),
    ("aten.scatter_add_", lambda x, v: x.scatter_add_(0, _TWICE, v)),
    ("aten.scatter_reduce_", lambda x, v: x.scatter_reduce_(0, _TWICE, v, reduce="sum")),
])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_an_accumulating_write_that_overflows_is_that_ops_overflow_not_a_mask(op, write, sign):
    x = torch.full((3,), sign * 2e38)
    ev = traced(lambda: write(x.clone(), torch.full((2,), sign * 2e38)).sum()).first  # 6e38: past float32
    assert (ev.op, ev.kind, ev.origin) == (op, "inf", "op")


def test_the_same_index_put_writing_minus_inf_without_accumulating_is_a_mask():
    x = torch.tensor([1.0, 2.0, 3.0])
    masked = lambda: torch.exp(x.clone().index_put_((_TWICE,), torch.full((2,), NEG_INF))).sum()  # noqa: E731
    tr = traced(masked)
    assert tr.first is None and tr.transient == []
    # Accumulating the same -inf into it is a sum that holds a mask, not an overflow.
    tr = traced(lambda: torch.exp(x.clone().index_put_((_TWICE,), torch.full((2,), NEG_INF), accumulate=True)).sum())
    assert tr.first is None and tr.transient == []


# -- 9. An op that turns a mask into +inf is reported ------------------------------

def _masked_cross_entropy(label):
    logits = torch.tensor([[0.5, -1.0, 2.0], [1.0, 0.0, -1.0]], requires_grad=True)
    allowed = torch.tensor([[True, False, True], [True, True, True]])
    return lambda: F.cross_entropy(logits.masked_fill(~allowed, NEG_INF), torch.tensor([label, 0])).backward()


def test_cross_entropy_with_the_label_on_a_masked_class_is_reported():
    ev = traced(_masked_cross_entropy(1)).first  # class 1 of row 0 is masked: loss = +inf
    assert (ev.op, ev.kind, ev.origin) == ("aten.nll_loss_forward", "inf", "op")


def test_cross_entropy_with_the_label_on_an_allowed_class_is_not_reported():
    tr = traced(_masked_cross_entropy(2))
    assert tr.first is None and tr.transient == []


def test_negating_a_mask_is_reported_and_keeping_its_sign_is_not():
    scores = torch.tensor([[1.0, 2.0, 3.0]])
    masked = scores.masked_fill(torch.tensor([[False, True, False]]), NEG_INF)
    assert traced(lambda: (-masked).exp().sum()).first.op == "aten.neg"
    assert traced(lambda: (masked * 2).exp().sum()).first is None


# -- 10. Infinities that never reach anything are transient ------------------------

def test_atan2_backward_at_the_origin_is_transient():
    def run():
        y, x = torch.zeros(3, requires_grad=True), torch.zeros(3, requires_grad=True)
        torch.atan2(y, x).sum().backward()
        assert torch.isfinite(y.grad).all() and torch.isfinite(x.grad).all()

    tr = traced(run)
    assert tr.first is None
    assert [e.op for e in tr.transient] == ["aten.reciprocal"] and tr.transient[0].phase == "backward"


def test_atan2_backward_away_from_the_origin_makes_nothing_transient():
    def run():
        y, x = torch.ones(3, requires_grad=True), torch.zeros(3, requires_grad=True)
        torch.atan2(y, x).sum().backward()

    tr = traced(run)
    assert tr.first is None and tr.transient == []


def test_std_backward_on_a_constant_input_is_transient_and_on_a_varied_one_there_is_nothing():
    def run(values):
        def block():
            a = torch.tensor(values, requires_grad=True)
            a.std().backward()
            assert torch.isfinite(a.grad).all()
        return block

    constant = traced(run([3.0, 3.0, 3.0, 3.0]))
    assert constant.first is None and [e.op for e in constant.transient] == ["aten.div"]
    varied = traced(run([1.0, 2.0, 3.0, 5.0]))
    assert varied.first is None and varied.transient == []


def test_a_transient_inf_before_a_real_one_does_not_become_first():
    def run():
        y, x = torch.zeros(3, requires_grad=True), torch.zeros(3, requires_grad=True)
        torch.atan2(y, x).sum().backward()  # transient: its inf is masked away
        r = torch.zeros(2, requires_grad=True)
        torch.sqrt(r).sum().backward()  # d sqrt(r)/dr at 0 is +inf, and it lands in r.grad

    tr = traced(run)
    assert tr.first.node == "SqrtBackward0" and tr.first.kind == "inf"
    assert [e.op for e in tr.transient] == ["aten.reciprocal"]


def test_an_overflow_absorbed_in_the_forward_is_transient_until_the_backward_carries_it():
    def logistic(x):
        return 1 / (1 + torch.exp(-x))  # exp(100) = inf, then 1 / inf = 0: the output is right

    x = torch.tensor([-100.0, 0.0], requires_grad=True)
    forward_only = traced(lambda: logistic(x).sum())
    assert forward_only.first is None and [e.op for e in forward_only.transient] == ["aten.exp"]
    # Its backward divides inf by inf: the NaN reaches x.grad, and the exp is first.
    with_backward = traced(lambda: logistic(x).sum().backward())
    assert with_backward.first.op == "aten.exp" and with_backward.transient == []


# -- 11. Every written argument is watched -----------------------------------------

def _huge_batch():
    return torch.tensor([[1e20, 1.0], [-1e20, 2.0], [3e19, 0.0]])  # its variance overflows float32


def test_batch_norm_running_var_overflow_is_reported_though_its_output_is_finite():
    bn = nn.BatchNorm1d(2)

    def run():
        bn.reset_running_stats()
        assert torch.isfinite(bn(_huge_batch())).all()

    ev = traced(run).first
    assert (ev.op, ev.kind, ev.origin, ev.module) == ("aten.native_batch_norm", "inf", "op", "BatchNorm1d")
    assert not torch.isfinite(bn.running_var).all()


def test_batch_norm_on_an_ordinary_batch_is_not_reported():
    bn = nn.BatchNorm1d(2)
    tr = traced(lambda: bn(torch.tensor([[1.0, 1.0], [-1.0, 2.0], [3.0, 0.0]])))
    assert tr.first is None and tr.transient == []


def test_a_write_the_schema_declares_on_a_later_argument_is_checked():
    # _batch_norm_with_update declares running_mean and running_var Tensor(a!), Tensor(b!).
    def run(batch):
        return lambda: torch.ops.aten._batch_norm_with_update(batch, None, None, torch.zeros(2), torch.ones(2),
                                                               0.1, 1e-5)

    assert traced(run(_huge_batch())).first.op == "aten._batch_norm_with_update"
    assert traced(run(torch.tensor([[1.0, 1.0], [-1.0, 2.0]]))).first is None


# -- 12. Phase, module and tensor identity ----------------------------------------

def _overflowing_update(how: str):
    layer = nn.Linear(2, 1, bias=False)
    opt = torch.optim.SGD(layer.parameters(), lr=3e38)

    def run():
        with torch.no_grad():
            layer.weight.fill_(3e38)
        layer(torch.zeros(1, 2))  # a forward, so that the tracer meets the module
        layer.weight.grad = torch.full((1, 2), -1.0)  # 3e38 + 3e38 overflows float32
        if how == "optimizer":
            opt.step()
        elif how == "no_grad":
            with torch.no_grad():
                for p in layer.parameters():
                    p -= 3e38 * p.grad
        else:
            layer.weight.data.sub_(layer.weight.grad, alpha=3e38)
    return run


@pytest.mark.parametrize("how, op", [("no_grad", "aten.sub_"), ("data", "aten.sub_")])
def test_a_hand_written_parameter_update_is_the_update_phase(how, op):
    ev = traced(_overflowing_update(how)).first
    assert (ev.op, ev.phase, ev.kind) == (op, "update", "inf")


def test_the_same_update_by_an_optimizer_is_the_optimizer_phase():
    assert traced(_overflowing_update("optimizer")).first.phase == "optimizer"


def test_an_in_place_write_to_a_tensor_that_is_no_parameter_stays_forward():
    def run():
        buffer = torch.full((2,), 3e38)
        with torch.no_grad():
            buffer += 3e38
    assert traced(run).first.phase == "forward"


class _Holds(nn.Module):
    """A module whose forward waits until told to finish, so that another thread's
    trace runs while it is on the hooks' stack."""

    def __init__(self, entered: threading.Event, release: threading.Event):
        super().__init__()
        self.entered, self.release = entered, release

    def forward(self, x):
        self.entered.set()
        self.release.wait(10)
        return x


def _trace_while_another_thread_runs_a_module(own_module):
    def block():
        # The other thread enters its module inside the traced block, when the
        # tracer's module hooks, which fire in every thread, are installed.
        entered, release = threading.Event(), threading.Event()
        worker = threading.Thread(target=_Holds(entered, release), args=(torch.ones(1),))
        worker.start()
        try:
            assert entered.wait(10)
            own_module(torch.zeros(2)) if own_module else torch.log(torch.zeros(2))
        finally:
            release.set()
            worker.join()

    return traced(block).first


class _Log(nn.Module):
    def forward(self, x):
        return torch.log(x)


def test_a_module_another_thread_is_running_is_not_named():
    assert _trace_while_another_thread_runs_a_module(None).module is None
    assert _trace_while_another_thread_runs_a_module(_Log()).module == "_Log"


def test_a_new_tensor_in_a_freed_masks_memory_is_not_taken_for_the_mask():
    memory = np.zeros(64, dtype=np.float32)  # one block that two tensors get in turn

    def run():
        mask = torch.from_numpy(memory)
        mask.masked_fill_(torch.ones(64, dtype=torch.bool), NEG_INF)  # a -inf mask, traced
        del mask
        reused = torch.from_numpy(memory)  # a new tensor, a new storage, the same address
        memory[:] = np.inf  # +inf that no traced op made: bad input
        (reused * 2).sum()

    ev = traced(run).first
    assert (ev.op, ev.kind, ev.origin) == ("aten.mul", "inf", "input")


# -- Issue 18: the first harmful event, not the last --------------------------------

def test_of_two_harmful_events_the_first_is_named():
    def run():
        # Both results are left unread, so both reach something; log ran first.
        torch.log(torch.zeros(2))  # -inf
        torch.sqrt(-torch.ones(2))  # NaN

    tr = traced(run)
    assert tr.first.op == "aten.log" and tr.transient == []


# -- Issue 23: complex values and other threads -------------------------------------

def test_a_complex_log_of_zero_is_placed_at_the_log_not_at_the_abs_after_it():
    z = torch.tensor([1.0 + 1.0j, 0.0 + 0.0j])
    ev = traced(lambda: torch.log(z).abs().sum()).first
    assert (ev.op, ev.kind, ev.origin) == ("aten.log", "inf", "op")


def test_a_complex_nan_that_comes_in_is_bad_input():
    z = torch.tensor([1.0 + 1.0j, complex(0.0, float("nan"))])
    ev = traced(lambda: (z * 2).real.sum()).first
    assert (ev.op, ev.kind, ev.origin) == ("aten.mul", "nan", "input")


class _Root(nn.Module):
    def forward(self, x):
        return torch.sqrt(x)  # finite at 0; its backward there is +inf


def _backward_of_a_forward_run_by_another_thread():
    x = torch.zeros(2, requires_grad=True)
    for _ in range(8):
        x * 1  # this thread's nodes now number past the few the new thread makes

    def block():
        made = {}
        worker = threading.Thread(target=lambda: made.setdefault("y", _Root()(x)))
        worker.start()
        worker.join()
        made["y"].sum().backward()

    return traced(block).first


def test_a_backward_whose_forward_ran_on_another_thread_says_so():
    ev = _backward_of_a_forward_run_by_another_thread()
    assert (ev.node, ev.phase, ev.module) == ("SqrtBackward0", "backward", None)
    assert "SqrtBackward0 (backward of ? (forward ran before the block or on a thread the tracer does not trace))" \
        in ev.describe()


def test_a_forward_op_matched_while_another_thread_ran_modules_is_marked_unsure():
    # Autograd numbers nodes per thread, from 0 in a new one: traced from a new thread,
    # the other thread's sqrt and this thread's sum both get node number 0, and the
    # sqrt's backward is matched to the sum. The tracer cannot tell; it says so.
    # (Each mode in a new thread of its own: a second trace would start past 0.)
    found = []

    def run(defer):
        x = torch.zeros(2, requires_grad=True)
        with nanlab.trace(defer=defer) as tr:
            made = {}
            worker = threading.Thread(target=lambda: made.setdefault("y", _Root()(x)))
            worker.start()
            worker.join()
            made["y"].sum().backward()
        found.append(tr.first.forward_op)

    for defer in (False, True):
        tracing = threading.Thread(target=run, args=(defer,))
        tracing.start()
        tracing.join()
    assert found == ["aten.sum (unsure: another thread ran modules during the block)"] * 2
