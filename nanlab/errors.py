"""Exceptions nanlab raises on purpose. Kept free of torch so the CLI can import them cheaply."""
from __future__ import annotations


def install_hint(extras: str) -> str:
    """The pip command that adds these extras (``"keras,jax"``) to the nanlab this
    process runs. Installed editable (a clone, as the README sets it up): from its
    source folder. Installed any other way (a wheel, a git URL): the extras' own
    requirements, from its metadata, since nanlab is not on the package index. The
    command names this interpreter unless ``python`` already is it (an activated
    venv): a bare ``pip`` could install into another."""
    try:
        return _install_hint(extras)
    except Exception:  # the hint is part of an error message: it must not raise one of its own
        return f"pip install 'nanlab[{extras}]'"


def _install_hint(extras: str) -> str:
    import json
    import os
    import shlex
    import shutil
    import sys
    from importlib import metadata
    from urllib.parse import urlparse
    from urllib.request import url2pathname

    on_path = shutil.which("python")
    same = on_path is not None and os.path.normcase(os.path.abspath(on_path)) == os.path.normcase(
        os.path.abspath(sys.executable))
    pip = "python -m pip" if same else f"{shlex.quote(sys.executable)} -m pip"
    # Every copy on the path: a build's nanlab.egg-info in the source folder comes
    # first from there, and only the installed one records how it was installed.
    installed = list(metadata.distributions(name="nanlab"))
    record = next((r for r in (d.read_text("direct_url.json") for d in installed) if r), None)
    direct = (json.loads(record) if record else None) or {}
    url = urlparse(direct.get("url") or "")
    if (direct.get("dir_info") or {}).get("editable") and url.scheme == "file":
        folder = url2pathname(url.path)
        where = "." if os.path.realpath(folder) == os.path.realpath(os.getcwd()) else folder
        return f"{pip} install -e {shlex.quote(f'{where}[{extras}]')}"
    wanted = extras.split(",")
    for dist in installed:
        requirements = _requirements_of(dist.requires or [], wanted)
        if requirements:
            return f"{pip} install " + " ".join(shlex.quote(r) for r in requirements)
    return f"{pip} install {shlex.quote(f'nanlab[{extras}]')}"


def _requirements_of(lines: list, extras: list) -> list:
    """The requirements (markers dropped) that these extras add, from Requires-Dist lines."""
    from packaging.requirements import Requirement

    found = []
    for line in lines:
        requirement = Requirement(line)
        if requirement.marker is not None and any(requirement.marker.evaluate({"extra": e}) for e in extras):
            requirement.marker = None
            found.append(str(requirement))
    return found


class ConfigError(ValueError):
    """A config value a user gave that nanlab cannot run with.

    The CLI prints it as one line and exits with status 2, so the message must name
    the key, the value, and what is allowed.
    """

    def __init__(self, key: str, value: object, allowed: str):
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"{key}={value}: {allowed}")


class NonFiniteError(RuntimeError):
    """Raised by ``nanlab.guard`` at the first training step that went non-finite.

    ``step`` counts calls of the guarded function from 0, ``quantity`` is what the
    sentinel saw first (loss, gradients, parameters or buffers), and ``event`` is the
    tracer's account of the first op whose NaN or Inf reached something that matters
    (None if the replay found none). By the time it is raised, the guard has put the
    model, its gradients, the optimizers and the schedulers back as they were before
    the step.
    """

    def __init__(self, step: int, quantity: str, event=None):
        self.step, self.quantity, self.event = step, quantity, event
        where = f": {event.describe()}" if event is not None else ""
        super().__init__(f"non-finite {quantity} at step {step}{where}")
