"""The headline scenarios on CUDA. Skipped where torch sees no GPU; when they run,
the README's support table records the outcome."""
import pytest

torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")]

HEADLINE = ["softmax_overflow", "bce_log_zero", "unscaled_sgd", "tanh_explosion", "custom_backward_div0"]


@pytest.mark.parametrize("name", HEADLINE)
def test_scenario_on_cuda(result_of, name):
    r = result_of(name, "device=cuda")
    assert r.config["device"] == "cuda"
    assert r.reproduced and r.fixed, [(v.name, v.verdict) for v in r.variants]
