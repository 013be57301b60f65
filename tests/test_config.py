"""Every config option composes; bad input gets one line, exit 2, no traceback."""
import pytest

from nanlab.config import options
from nanlab.lab import registry
from nanlab.config.compose import compose

GROUPS = {"scenario": registry.builtin_names(), "optimizer": list(options.OPTIMIZERS), "init": list(options.INITS),
          "clip": list(options.CLIPS)}


@pytest.mark.parametrize("group,option", [(g, o) for g, opts in GROUPS.items() for o in opts])
def test_every_option_composes(group, option):
    cfg = compose([f"{group}={option}"])
    assert cfg[group]["name"] == option


@pytest.mark.parametrize("key,value", [("device", "cpu"), ("device", "auto"), ("dtype", "float32"), ("dtype", "float64"),
                                       ("dtype", "float16"), ("dtype", "bfloat16"), ("mode", "list"), ("seed", "7"),
                                       ("steps", "3"), ("init.std", "0.5"), ("clip.threshold", "0.5"),
                                       ("optimizer.momentum", "0.9")])
def test_plain_keys_compose(key, value):
    cfg = compose([f"{key}={value}"])
    assert str(cfg[key.split(".")[0]] if "." not in key else cfg[key.split(".")[0]][key.split(".")[1]]) == value


def test_a_scenario_composes_from_its_declaration():
    """DEFAULTS and DATA, declared in the module, are what the composed config holds."""
    cfg = compose(["scenario=exploding_init"])
    assert (cfg.optimizer.name, cfg.optimizer.lr, cfg.init.name, cfg.init.std, cfg.steps) == ("sgd", 1e-3, "normal", 1.0, 100)
    assert dict(cfg.scenario.data) == {"n": 256, "features": 16, "width": 256, "depth": 6}
    cfg = compose(["scenario=fp16_overflow"])
    assert (cfg.optimizer.name, cfg.optimizer.lr, cfg.dtype) == ("adam", 0.3, "float16")
    assert compose(["scenario=fp16_overflow", "scenario.data.n=10"]).scenario.data.n == 10


def test_scenario_lr_follows_the_optimizer():
    assert compose(["scenario=tanh_explosion"]).optimizer.lr == 0.2
    assert compose(["scenario=tanh_explosion", "optimizer=adam"]).optimizer.lr == 0.001
    assert compose(["scenario=tanh_explosion", "optimizer=adam", "optimizer.lr=0.01"]).optimizer.lr == 0.01


BAD = [
    (["optimizer.lr=abc"], "optimizer.lr=abc"),
    (["optimizer.lr=-1"], "optimizer.lr=-1"),
    (["steps=0"], "steps=0"),
    (["seed=abc"], "seed=abc"),
    (["init=bogus"], "choose one of default, he_normal, normal, xavier_uniform"),
    (["dtype=float8"], "must be one of float32, float64, float16, bfloat16"),
    (["clip.threshold=-1"], "clip.threshold=-1"),
    (["scenario=nope"], "choose one of bce_log_zero"),
    (["stepz=3"], "not a nanlab config key"),
    (["scenario.data.typo=1"], "scenario.data.typo=1: not a data knob; softmax_overflow's data knobs: n (int), "
                               "features (int), classes (int), input_scale (float)"),
    (["scenario=unscaled_sgd", "scenario.data.n=abc"], "scenario.data.n=abc: must be an integer"),
    (["scenario=unscaled_sgd", "scenario.data.big_scale=inf"], "scenario.data.big_scale=inf: must be a finite number"),
]


@pytest.mark.parametrize("args,expected", BAD)
def test_bad_input_is_one_clean_line(cli, tmp_path, args, expected):
    proc = cli(*args, f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nanlab: error: ") and expected in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


def test_cuda_absent_is_one_clean_line(cli, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is present here")
    proc = cli("device=cuda", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "nanlab: error: device=cuda: CUDA is not available on this machine "
        "(torch.cuda.is_available() is False); use device=cpu or device=auto")


def test_api_rejects_bad_input_with_config_error():
    import nanlab

    with pytest.raises(nanlab.ConfigError, match="optimizer.lr"):
        nanlab.run("softmax_overflow", "optimizer.lr=-1")
