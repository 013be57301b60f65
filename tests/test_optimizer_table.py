"""One optimizer table (nanlab.config.options.OPTIMIZERS) for every backend: torch's
build, the batched engine, the Keras worker and the JAX worker. For every key of the
table (an optimizer's settings and torch's constants), each backend either trains with
the table's value or refuses it with one config error line; a key added to the table
that some backend drops fails here.

The Keras and JAX parts skip where the extra is missing, unless NANLAB_REQUIRE_FRAMEWORKS=1."""
import dataclasses
import json
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

from conftest import need_framework
from nanlab.config import options
from nanlab.errors import ConfigError

# A value for every key of the table that no optimizer defaults to, so that a backend
# which ignores the key trains differently from torch. A new key needs one here.
TEST_VALUES = {"momentum": 0.5, "eps": 1e-3, "weight_decay": 0.1, "betas": (0.8, 0.99), "alpha": 0.9}
STEPS = 3
START = [0.5, -1.0, 2.0, 0.25]
GRADS = [[0.1, -0.2, 0.3, 0.05], [0.2, 0.1, -0.4, 0.02], [-0.3, 0.25, 0.1, -0.01]]


def table_keys():
    """(optimizer, key) for every key of the table: what a backend must handle."""
    return [(name, key) for name, option in options.OPTIMIZERS.items() for key in (*option.keys, *option.constants)]


def test_every_key_of_the_table_has_a_test_value():
    assert {key for _, key in table_keys()} <= set(TEST_VALUES), "give the new key a test value above"
    assert set(options.OPTIMIZER_DEFAULTS) == {key for option in options.OPTIMIZERS.values() for key in option.keys}


def settings_with(name: str, key: str) -> dict:
    """The optimizer config at its defaults, ``key`` set to its test value (a setting)."""
    opt = {"name": name, "lr": 0.05, **options.OPTIMIZER_DEFAULTS}
    if key in opt:
        opt[key] = TEST_VALUES[key]
    return opt


@pytest.fixture
def table_with(monkeypatch):
    """Set ``key`` of optimizer ``name`` to its test value where it is one of the table's
    constants; every backend reads the same dict, so each sees the change."""
    def apply(name: str, key: str) -> None:
        option = options.OPTIMIZERS[name]
        if key in option.constants:
            changed = dataclasses.replace(option, constants={**option.constants, key: TEST_VALUES[key]})
            monkeypatch.setitem(options.OPTIMIZERS, name, changed)

    return apply


def torch_steps(opt: dict) -> list:
    """nanlab's own optimizer build (nanlab.lab.build.make_optimizer), stepped on fixed gradients."""
    from nanlab.lab.build import make_optimizer

    param = torch.nn.Parameter(torch.tensor(START))
    optimizer = make_optimizer(OmegaConf.create(opt), [param])
    for grad in GRADS[:STEPS]:
        param.grad = torch.tensor(grad)
        optimizer.step()
    return param.detach().tolist()


@pytest.mark.parametrize("name,key", table_keys())
def test_torch_build_reads_every_key(table_with, name, key):
    from nanlab.lab.build import make_optimizer

    at_defaults = torch_steps(settings_with(name, ""))
    table_with(name, key)
    optimizer = make_optimizer(OmegaConf.create(settings_with(name, key)), [torch.nn.Parameter(torch.ones(2))])
    assert optimizer.defaults[key] == pytest.approx(TEST_VALUES[key])
    # Else a backend that ignored the key would pass the tests below.
    assert torch_steps(settings_with(name, key)) != at_defaults, "the test value changes nothing"


@pytest.mark.parametrize("name,key", table_keys())
def test_batched_engine_reads_every_key(table_with, name, key):
    from nanlab.sweeps.engine import BatchedOptimizer

    table_with(name, key)
    opt = settings_with(name, key)
    hyper = {k: torch.tensor([float(opt[k])], dtype=torch.float64) for k in ("lr", *options.OPTIMIZER_DEFAULTS)}
    batched = BatchedOptimizer(name, hyper, torch.float32)
    params = [torch.tensor([START])]
    for grad in GRADS[:STEPS]:
        params = batched.step(params, [torch.tensor([grad])])
    assert params[0][0].tolist() == torch_steps(opt)  # bit for bit, as the engine promises


def refused(framework: str, opt: dict, key: str) -> bool:
    """Whether the framework's worker refuses this setting up front, as one config
    error line naming it (nanlab.frameworks.run.check_settings)."""
    from nanlab.frameworks.run import check_settings

    cfg = OmegaConf.create({"dtype": "float32", "init": {"name": "default"}, "device": "cpu", "optimizer": opt})
    try:
        check_settings(cfg, framework)
    except ConfigError as err:
        assert f"optimizer.{key}" in str(err) and "\n" not in str(err)
        return True
    return False


@pytest.mark.parametrize("name,key", table_keys())
def test_jax_worker_reads_every_key(table_with, name, key):
    need_framework("jax")
    from nanlab.frameworks.worker import JaxTrainer

    table_with(name, key)
    opt = settings_with(name, key)
    if refused("jax", opt, key):
        return
    trainer = JaxTrainer("jax")
    jnp = trainer.jax.numpy
    init, update = trainer._optimizer({"optimizer": opt, "clip": {"name": "none"}})
    params = {"w": jnp.asarray(START, jnp.float32)}
    state = init(params)
    for grad in GRADS[:STEPS]:
        params, state = update(params, {"w": jnp.asarray(grad, jnp.float32)}, state)
    assert [float(v) for v in params["w"]] == pytest.approx(torch_steps(opt), rel=1e-5)


# Builds the Keras optimizer for each case in a worker's environment (its backend is
# fixed once keras is imported) and prints what Keras holds for each table key.
KERAS_PROBE = """
import dataclasses, json, sys
from nanlab.config import options
from nanlab.frameworks.worker import KERAS_ARGUMENTS, worker_trainer
trainer, out = worker_trainer("keras-torch"), []
for name, key, opt, constants in json.loads(sys.argv[1]):
    options.OPTIMIZERS[name] = dataclasses.replace(options.OPTIMIZERS[name], constants=constants)
    built = trainer.optimizer({"optimizer": opt, "clip": {"name": "none"}})
    names = KERAS_ARGUMENTS[key]
    held = [float(getattr(built, n)) for n in (names if isinstance(names, tuple) else (names,))]
    out.append([type(built).__name__, held])
print(json.dumps(out))
"""


def test_keras_worker_reads_every_key():
    need_framework("keras-torch")
    from nanlab.frameworks.run import worker_env

    cases, expected = [], []
    for name, key in table_keys():
        opt, option = settings_with(name, key), options.OPTIMIZERS[name]
        if refused("keras-torch", opt, key):
            continue
        constants = {**option.constants, **({key: TEST_VALUES[key]} if key in option.constants else {})}
        cases.append([name, key, opt, constants])
        value = TEST_VALUES[key]
        expected.append([option.torch_class, list(value) if isinstance(value, tuple) else [value]])
    done = subprocess.run([sys.executable, "-c", KERAS_PROBE, json.dumps(cases)], capture_output=True, text=True,
                          timeout=300, env=worker_env("keras-torch"))
    assert done.returncode == 0, done.stderr
    held = json.loads(done.stdout.strip().splitlines()[-1])
    for case, (cls, values), (want_cls, want) in zip(cases, held, expected):
        assert cls == want_cls and values == pytest.approx(want), case


def test_clip_norm_eps_is_torchs():
    """CLIP_NORM_EPS is what torch's clip_grads_with_norm_ adds to the norm: at a norm
    equal to it and the same threshold, the gradient is halved."""
    grad = torch.nn.Parameter(torch.zeros(1))
    grad.grad = torch.ones(1)
    eps = options.CLIP_NORM_EPS
    torch.nn.utils.clip_grads_with_norm_([grad], eps, torch.tensor(eps))
    assert grad.grad.item() == pytest.approx(0.5)
