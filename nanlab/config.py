"""Compose and check a nanlab config; turn every way it can be wrong into one line.

Shared by the CLI and the Python API (``nanlab.run``), so both reject the same
inputs with the same words.
"""
from __future__ import annotations

from typing import Optional, Sequence

from nanlab import registry, schema
from nanlab.errors import ConfigError

CONFIG_MODULE = "nanlab.conf"
_ready = False


def setup() -> None:
    """Register the schema and any third-party scenarios with Hydra (once)."""
    global _ready
    if _ready:
        return
    from hydra.core.config_store import ConfigStore

    schema.register()
    store = ConfigStore.instance()
    for name in registry.plugin_entry_points():
        # A plugin scenario has no YAML of ours: it starts from the global defaults.
        store.store(group="scenario", name=name, package="_global_", node={"scenario": {"name": name}})
    _ready = True


def finalize(cfg):
    """Range-check a composed config and return it as plain data (enums as strings)."""
    from omegaconf import OmegaConf

    schema.validate(cfg)
    plain = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    plain.pop("hydra", None)
    return OmegaConf.create(plain)


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


def _override_value(key: str, overrides: Sequence[str]) -> Optional[str]:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    for ov in OverridesParser.create().parse_overrides(list(overrides)):
        if ov.key_or_group == key:
            return ov.get_value_string()
    return None


def explain(exc: BaseException, overrides: Sequence[str]) -> Optional[ConfigError]:
    """A ConfigError for a config problem Hydra or OmegaConf raised; None for anything else."""
    from hydra.errors import HydraException, MissingConfigException, OverrideParseException
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(exc, ConfigError):
        return exc
    if isinstance(exc, MissingConfigException) and exc.missing_cfg_file and "/" in exc.missing_cfg_file:
        group, _, value = exc.missing_cfg_file.partition("/")
        options = registry.names() if group == "scenario" else sorted(exc.options or [])
        what = "not a scenario" if group == "scenario" else "not an option"
        return ConfigError(group, value, f"{what}; choose one of {', '.join(options)}")
    if isinstance(exc, OverrideParseException):
        return ConfigError("override", " ".join(overrides), str(exc).splitlines()[0])
    cause = exc.__cause__ if isinstance(exc.__cause__, OmegaConfBaseException) else exc
    if isinstance(cause, OmegaConfBaseException) and getattr(cause, "full_key", None):
        key = cause.full_key
        value = _override_value(key, overrides)
        return ConfigError(key, value if value is not None else "?", schema.allowed(key))
    if isinstance(exc, (HydraException, OmegaConfBaseException)):
        return ConfigError("config", " ".join(overrides), str(exc).splitlines()[0])
    return None
