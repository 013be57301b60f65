"""Compose and check a nanlab config; turn every way it can be wrong into one line.

Shared by the CLI and the Python API (``nanlab.run``), so both reject the same
inputs with the same words.
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Optional, Sequence

from nanlab.config import options
from nanlab.lab import registry
from nanlab.config import schema
from nanlab.errors import ConfigError, install_hint

CONFIG_MODULE = "nanlab.conf"
_ready = False


def setup() -> None:
    """Register the schema, the option groups and every scenario with Hydra (once)."""
    global _ready
    if _ready:
        return
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    schema.register()
    store = ConfigStore.instance()
    for name, option in options.OPTIMIZERS.items():
        lr = f"${{oc.select:scenario.lr.{name},{option.lr}}}"  # the scenario's lr for this optimizer
        settings = {key: options.OPTIMIZER_DEFAULTS[key] for key in option.settings}
        store.store(group="optimizer", name=name, node={"name": name, "lr": lr, **settings})
    for name, option in options.INITS.items():
        store.store(group="init", name=name, node={"name": name})
    for name in options.CLIPS:
        store.store(group="clip", name=name, node={"name": name})
    for decl in registry.declarations().values():
        store.store(group="scenario", name=decl.name, package="_global_", node=scenario_node(decl))
    if not OmegaConf.has_resolver("nanlab.run_name"):
        OmegaConf.register_new_resolver("nanlab.run_name", run_name)
    _ready = True


def run_name(mode, scenario_name) -> str:
    """The folder a run writes under: the scenario's name for a scenario run, the
    mode's name (claims, check, ...) for modes that are not about one scenario."""
    mode = getattr(mode, "value", mode)
    return str(scenario_name) if mode == "run" else str(mode)


def scenario_node(decl) -> dict:
    """A scenario's declaration as a config node: its group choices go into the
    defaults list, its lr under ``scenario.lr.<optimizer>``, the rest on top."""
    defaults, node = [], {"scenario": {"name": decl.name, "lr": {}, "data": dict(decl.data)}}
    optimizer = "sgd"
    for key, value in decl.defaults.items():
        if key in options.CONFIG_GROUPS:
            settings = dict(value) if isinstance(value, dict) else {"name": value}
            choice = settings.pop("name")
            defaults.append({f"override /{key}": choice})
            if settings:
                node[key] = settings
            if key == "optimizer":
                optimizer = choice
        elif key != "lr":
            node[key] = value
    if "lr" in decl.defaults:
        node["scenario"]["lr"][optimizer] = decl.defaults["lr"]
    return {"defaults": defaults, **node} if defaults else node


def finalize(cfg):
    """Range-check a composed config and return it as plain data (enums as strings)."""
    from omegaconf import OmegaConf

    schema.validate(cfg)
    check_knobs(cfg)
    plain = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    plain.pop("hydra", None)
    unknown = schema.unknown_keys(plain)
    if unknown:
        raise ConfigError(unknown[0], OmegaConf.select(cfg, unknown[0]), schema.allowed(unknown[0]))
    return OmegaConf.create(plain)


def _knob_list(decl) -> str:
    if not decl.data:
        return f"{decl.name} has no data knobs"
    return f"{decl.name}'s data knobs: " + ", ".join(f"{k} ({decl.knob_type(k).__name__})" for k in decl.data)


def check_knobs(cfg) -> None:
    """Each ``scenario.data`` value has the type of the default its scenario declares
    (an int knob also rejects 2.5; a float knob accepts 3) and is finite."""
    decl = registry.declaration(cfg.scenario.name)
    for key, value in cfg.scenario.data.items():
        if key not in decl.data:
            raise ConfigError(f"scenario.data.{key}", value, "not a data knob; " + _knob_list(decl))
        want = decl.knob_type(key)
        ok = isinstance(value, want) and (want is bool or not isinstance(value, bool))
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            ok = True
        if ok and want is float:
            ok = math.isfinite(value)
        if ok and want is int:
            ok = value >= 0  # knobs are sizes, counts and indices
        if not ok:
            names = {bool: "true or false", int: "an integer >= 0", float: "a finite number", str: "a string"}
            raise ConfigError(f"scenario.data.{key}", value, f"must be {names[want]}; " + _knob_list(decl))


def compose(overrides: Sequence[str]):
    """Compose the config for these overrides, as ``python -m nanlab`` would."""
    import hydra
    from hydra.core.global_hydra import GlobalHydra

    setup()
    overrides = list(overrides)
    try:
        if GlobalHydra.instance().is_initialized():  # called from inside the Hydra app
            return finalize(hydra.compose("config", overrides=overrides))
        with hydra.initialize_config_module(CONFIG_MODULE, version_base="1.3"):
            return finalize(hydra.compose("config", overrides=overrides))
    except ConfigError:
        raise
    except Exception as exc:
        err = explain(exc, overrides)
        if err is None:
            raise
        raise err from exc


# Hydra launchers that nanlab ships an extra for (pyproject.toml).
LAUNCHER_EXTRAS = {"joblib": "parallel", "submitit_local": "cluster", "submitit_slurm": "cluster", "slurm": "cluster"}


def _leaves(node, prefix: str) -> dict:
    if isinstance(node, dict):
        return {k: v for key, value in node.items() for k, v in _leaves(value, f"{prefix}.{key}").items()}
    return {prefix: node}


@lru_cache(maxsize=None)
def _own_settings(name: str) -> tuple:
    from omegaconf import OmegaConf

    own = OmegaConf.to_container(compose([f"scenario={name}"]))
    return tuple(_lesson_leaves(own).items())


def _lesson_leaves(plain: dict) -> dict:
    out = {}
    for key in options.LESSON_SETTINGS:
        node = plain
        for part in key.split("."):
            node = node.get(part, {}) if isinstance(node, dict) else {}
        out.update(_leaves(node, key))
    return out


def touches_lesson(overrides: Sequence[str]) -> bool:
    """Whether any override may change a lesson setting (``optimizer=adam``,
    ``scenario.data.n=10``); ``scenario=...``, ``seed=`` or ``device=`` cannot."""
    keys = [o.lstrip("+~").split("=", 1)[0].replace("/", ".") for o in overrides]
    return any(key == prefix or key.startswith(prefix + ".") for key in keys for prefix in options.LESSON_SETTINGS)


def changed_settings(cfg, overrides: Optional[Sequence[str]] = None) -> dict:
    """The lesson's settings this run changed from the scenario's own:
    ``{"optimizer.name": ["sgd", "adam"], ...}``, in config order. Given the run's
    overrides, a run that cannot have changed any skips composing the scenario's own
    config (about 60 ms, most of a default run's own start-up cost)."""
    from omegaconf import OmegaConf

    if overrides is not None and not touches_lesson(overrides):
        return {}

    own = dict(_own_settings(str(cfg.scenario.name)))
    run = _lesson_leaves(OmegaConf.to_container(cfg))
    return {key: [own.get(key), value] for key, value in run.items() if own.get(key) != value}


def _override_value(key: str, overrides: Sequence[str]) -> Optional[str]:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    for ov in OverridesParser.create().parse_overrides(list(overrides)):
        if ov.key_or_group == key:
            return ov.get_value_string()
    return None


def explain(exc: BaseException, overrides: Sequence[str]) -> Optional[Exception]:
    """A one-line error (ConfigError, or the ContractError of a broken scenario module)
    for a config problem Hydra or OmegaConf raised; None for anything else."""
    from hydra.errors import HydraException, MissingConfigException, OverrideParseException
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(exc, ConfigError):
        return exc
    if isinstance(exc, MissingConfigException) and exc.missing_cfg_file and "/" in exc.missing_cfg_file:
        group, _, value = exc.missing_cfg_file.rpartition("/")
        if group == "hydra/launcher" and value in LAUNCHER_EXTRAS:
            return ConfigError(group, value, f"Hydra's {value} launcher is not installed; install the "
                               f"{LAUNCHER_EXTRAS[value]} extra: {install_hint(LAUNCHER_EXTRAS[value])}")
        if group == "scenario":
            broken = registry.contract_error(value)
            if broken is not None:
                return broken
        choices = registry.names() if group == "scenario" else sorted(exc.options or [])
        what = "not a scenario" if group == "scenario" else "not an option"
        return ConfigError(group, value, f"{what}; choose one of {', '.join(choices)}")
    if isinstance(exc, HydraException) and str(exc).startswith("Could not override '"):
        key = str(exc).split("'")[1]
        value = _override_value(key, overrides)
        if key.startswith("scenario.data."):
            scenario = _override_value("scenario", overrides) or options.DEFAULT_SCENARIO
            if scenario in registry.names():
                return ConfigError(key, value, "not a data knob; " + _knob_list(registry.declaration(scenario)))
        return ConfigError(key, value, schema.allowed(key))
    if isinstance(exc, OverrideParseException):
        return ConfigError("override", " ".join(overrides), str(exc).splitlines()[0])
    cause = exc.__cause__ if isinstance(exc.__cause__, OmegaConfBaseException) else exc
    if isinstance(cause, OmegaConfBaseException) and getattr(cause, "full_key", None):
        key = cause.full_key
        value = _override_value(key, overrides)
        if value is None and "[" in key:  # an element of a list: name the list as it was given
            value = _override_value(key.split("[")[0], overrides)
            return ConfigError(key.split("[")[0], value, "each entry " + schema.allowed(key))
        return ConfigError(key, value if value is not None else "?", schema.allowed(key))
    if isinstance(exc, (HydraException, OmegaConfBaseException)):
        return ConfigError("config", " ".join(overrides), str(exc).splitlines()[0])
    return None


# Config groups a user picks by name on the command line.
NAMED_GROUPS = ("scenario", *options.CONFIG_GROUPS)


def _group_choices(group: str) -> list:
    return {"scenario": registry.names, "optimizer": lambda: list(options.OPTIMIZERS),
            "init": lambda: list(options.INITS), "clip": lambda: list(options.CLIPS)}[group]()


def command_overrides(argv: Sequence[str]) -> list:
    """The overrides among the command line's arguments: Hydra's own flags (-m,
    --multirun, --cfg job, ...) left out, so that they are never parsed as overrides."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg.startswith("-"):
            skip = arg in ("-c", "--cfg", "-cn", "--config-name", "-cp", "--config-path", "-cd", "--config-dir",
                           "-p", "--package", "--info", "-i")
        else:
            out.append(arg)
    return out


def check_command_line(argv: Sequence[str]) -> None:
    """What Hydra would accept but misread, or fail on with a traceback, refused up
    front in one line: a config group given something other than one name
    (``scenario=1``, ``scenario=null``, ``clip=[norm,value]``, ``scenario=../x``), and
    a multirun of more jobs than ``sweep.max_points`` allows."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    overrides = command_overrides(argv)
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except OverrideParseException:
        for text in overrides:  # name the one override that does not parse
            try:
                OverridesParser.create().parse_overrides([text])
            except OverrideParseException:
                raise ConfigError("override", text, "cannot be parsed: unquoted values take ASCII letters, digits "
                                  "and ._-/:+@; quote anything else (key='value'), lists are [a,b]") from None
        raise
    multirun = any(a in ("-m", "--multirun") for a in argv)
    jobs, max_points = 1, None
    for ov in parsed:
        if ov.is_sweep_override():
            # A sweep's choices reach each job as strings; Hydra names a wrong one there.
            jobs *= max(1, len(list(ov.sweep_string_iterator())))
            continue
        if ov.key_or_group == "sweep.max_points":
            max_points = ov.value()
        value = ov.value()
        if ov.key_or_group in NAMED_GROUPS and not ov.is_delete() and (
                not isinstance(value, str) or not value or "/" in value or value.startswith(".")):
            how = f"; to try several, use -m {ov.key_or_group}=a,b or mode=sweep" if isinstance(value, list) else ""
            raise ConfigError(ov.key_or_group, ov.get_value_element_as_str(),
                              f"takes one name: {', '.join(_group_choices(ov.key_or_group))}{how}")
    limit = max_points if isinstance(max_points, int) and max_points >= 1 else options.SWEEP_DEFAULT_MAX_POINTS
    if multirun and jobs > limit:
        raise ConfigError("multirun", f"{jobs} jobs", f"a multirun of more than {limit} jobs is refused; narrow the grid, "
                          f"or allow it with sweep.max_points={jobs}")
