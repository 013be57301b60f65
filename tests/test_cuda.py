"""The headline scenarios on CUDA. Skipped where torch sees no GPU; when they run,
docs/performance.md's support table records the outcome."""
import pytest

torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")]

HEADLINE = ["softmax_overflow", "bce_log_zero", "unscaled_sgd", "tanh_explosion", "custom_backward_div0"]


@pytest.mark.parametrize("name", HEADLINE)
def test_scenario_on_cuda(result_of, name):
    r, on_cpu = result_of(name, "device=cuda"), result_of(name)
    assert r.reproduced and r.fixed, [(v.name, v.verdict) for v in r.variants]
    # the same failure, found by the tracer at the same op as on the CPU
    assert r.broken.first_nonfinite.event.op == on_cpu.broken.first_nonfinite.event.op


def test_guard_on_cuda_finds_the_backward_division_by_zero(make_step):
    import nanlab
    from torch import nn

    torch.manual_seed(0)
    model = nn.Linear(3, 1).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(8, 3, device="cuda")

    # d/dx sqrt(x) at x = 0 is +inf
    guarded = nanlab.guard(make_step(opt, lambda: torch.sqrt(model(x) * 0.0).sum()), model, opt)
    with pytest.raises(nanlab.NonFiniteError) as info:
        for _ in range(3):
            guarded()
    assert info.value.step == 0 and info.value.quantity == "gradients"
    assert info.value.event.phase == "backward" and info.value.event.node == "SqrtBackward0"


def test_sentinel_merges_flags_from_two_devices():
    from nanlab.debug.sentinel import Sentinel

    on_cpu, on_gpu = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3, device="cuda"))
    sentinel = Sentinel([on_cpu, on_gpu])
    on_cpu.grad, on_gpu.grad = torch.zeros(3), torch.zeros(3, device="cuda")
    assert sentinel.check(torch.tensor(1.0)).bad is None
    on_gpu.grad[0] = float("nan")
    assert sentinel.check(torch.tensor(1.0)).bad == "gradients"
    on_gpu.grad[0] = 0.0
    assert sentinel.check(torch.tensor(1.0)).bad is None
