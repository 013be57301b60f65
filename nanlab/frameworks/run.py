"""The parent side: run scenarios in other frameworks' worker processes and turn what
they measured into the same ScenarioResult a torch run gives.

Data is drawn here, by the scenario's own ``make_data`` (torch, float64), prepared
here by each variant's ``prepare``, and its overrides resolved here, so every
framework trains on the same numbers at the same settings. The workers run at once,
one per framework, while torch runs in this process. Each worker's outputs are
scored here by the scenario's float64 ``exact_loss``.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from nanlab.lab import registry
from nanlab.lab import verdicts
from nanlab.lab.build import DTYPES
from nanlab.config.compose import changed_settings
from nanlab.errors import ConfigError
from nanlab.frameworks import chosen, declared
from nanlab.lab.loop import overrides_of, variant_config
from nanlab.config.options import FRAMEWORKS
from nanlab.lab.result import ClaimResult, Event, FirstNonFinite, ScenarioResult, VariantResult, Verdict
from nanlab.lab.runner import chosen_variants, decide_claims, run_scenario
from nanlab.lab.scenario import Context

# dtypes a worker trains in. The low-precision ones need autocast and loss scaling,
# which are nanlab's torch loop's own; float64 would need JAX's x64 mode and Keras'
# floatx set per process, and without them both quietly train in float32.
WORKER_DTYPES = ("float32",)


class FrameworkError(RuntimeError):
    """A worker that could not run: its import failed, or a builder raised. One line."""


@dataclass
class Job:
    """One scenario for the workers: its config, the module, and the data each variant trains on."""

    cfg: object
    scenario: object
    chosen: list
    raw: object = None
    specs: list = field(default_factory=list)
    shared_probes: dict = field(default_factory=dict)


def _numpy(t) -> np.ndarray:
    return t.detach().cpu().numpy()


def _settings(vcfg) -> dict:
    return {"optimizer": OmegaConf.to_container(vcfg.optimizer), "clip": OmegaConf.to_container(vcfg.clip),
            "steps": int(vcfg.steps), "seed": int(vcfg.seed), "dtype": str(vcfg.dtype)}


def check_settings(cfg, framework: str) -> None:
    """What a worker cannot honour is a config error, before anything runs."""
    if cfg.dtype not in WORKER_DTYPES:
        why = {"float64": "float64 would need JAX's x64 mode and Keras' floatx set per process, without which "
                          "both quietly train in float32",
               "float16": "float16 needs autocast and loss scaling, which are nanlab's torch loop's own",
               "bfloat16": "bfloat16 needs autocast, which is nanlab's torch loop's own"}.get(str(cfg.dtype), "")
        raise ConfigError("dtype", cfg.dtype, f"framework={framework} trains in {' or '.join(WORKER_DTYPES)} only"
                          + (f": {why}" if why else "") + "; use dtype=float32, or framework=torch for float64, "
                          "float16 and bfloat16")
    if cfg.init.name != "default":
        raise ConfigError("init", cfg.init.name, f"framework={framework} uses that framework's own initialization; "
                          "init= applies to framework=torch")
    if cfg.device == "cuda":
        raise ConfigError("device", cfg.device, f"framework={framework} runs on the CPU here; device=cuda is "
                          "framework=torch only")
    family = FRAMEWORKS[framework].family
    if family == "keras" and cfg.optimizer.get("weight_decay"):
        raise ConfigError("optimizer.weight_decay", cfg.optimizer.weight_decay, f"framework={framework}: Keras "
                          "decays weights apart from the gradient (AdamW-style), torch.optim adds it to the "
                          "gradient, so the runs would not compare; use weight_decay=0 or framework=torch")
    if family == "jax" and cfg.optimizer.name == "rmsprop" and cfg.optimizer.get("momentum"):
        raise ConfigError("optimizer.momentum", cfg.optimizer.momentum, f"framework={framework}: the JAX worker's "
                          "RMSprop has no momentum; use momentum=0 or framework=torch")


def supported(name: str, framework: str) -> bool:
    return FRAMEWORKS[framework].family == "torch" or FRAMEWORKS[framework].family in declared(name)


def require_builder(name: str, framework: str) -> None:
    if not supported(name, framework):
        family = FRAMEWORKS[framework].family
        having = [n for n in registry.names() if family in declared(n)]
        raise ConfigError("framework", framework, f"scenario {name} has no {family} builder; scenarios with one: "
                          + ", ".join(having))


def prepare_job(cfg) -> Job:
    scenario = registry.load(cfg.scenario.name)
    job = Job(cfg, scenario, chosen_variants(scenario, cfg.get("variant")))
    ctx = Context(cfg, torch.device("cpu"), DTYPES[cfg.dtype])
    job.raw = scenario.make_data(ctx)
    # A scenario's shared_probes(ctx) measure nanlab's own tools on the data (a label
    # check before training, say): the same whatever trains, so every framework has them.
    module = importlib.import_module(registry.declaration(scenario.name).module)
    if callable(getattr(module, "shared_probes", None)):
        job.shared_probes = dict(module.shared_probes(ctx))
    for variant in scenario.variants:
        prepared = variant.prepare(job.raw) if variant.prepare else job.raw
        overrides = overrides_of(variant, prepared, cfg)
        job.specs.append((variant, prepared, overrides, _settings(variant_config(cfg, overrides))))
    return job


def _request(jobs: list[Job], folder: Path) -> dict:
    arrays, entries = {}, []
    for job in jobs:
        name = job.scenario.name
        arrays[f"{name}/raw/x"], arrays[f"{name}/raw/y"] = _numpy(job.raw.x), _numpy(job.raw.y)
        variants = []
        for variant, prepared, overrides, settings in job.specs:
            x, y = f"{name}/raw/x", f"{name}/raw/y"
            if prepared is not job.raw:
                x, y = f"{name}/{variant.name}/x", f"{name}/{variant.name}/y"
                arrays[x], arrays[y] = _numpy(prepared.x), _numpy(prepared.y)
            variants.append({"name": variant.name, "role": variant.role, "summary": variant.summary,
                             "lossy": variant.lossy, "overrides": overrides, "settings": settings, "x": x, "y": y})
        all_chosen = len(job.chosen) == len(job.scenario.variants)
        # The raw data's extra tensors (a padding mask, say) go along as data.extra.
        extra = {}
        for key, value in (job.raw.extra or {}).items():
            extra[key] = f"{name}/raw/extra/{key}"
            arrays[extra[key]] = _numpy(value)
        entries.append({"scenario": name, "knobs": OmegaConf.to_container(job.cfg.scenario.data),
                        "raw": {"x": f"{name}/raw/x", "y": f"{name}/raw/y", "extra": extra},
                        "settings": _settings(job.cfg),
                        "variants": variants, "only": None if all_chosen else [v.name for v in job.chosen]})
    np.savez(folder / "arrays.npz", **arrays)
    return {"arrays": str(folder / "arrays.npz"), "jobs": entries}


def worker_env(framework: str) -> dict:
    """One thread per worker: the models are tiny, the workers run side by side on
    few cores, and single-threaded reductions keep each framework deterministic."""
    env = dict(os.environ)
    backend = FRAMEWORKS[framework].keras_backend
    if backend:
        env["KERAS_BACKEND"] = backend
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TF_NUM_INTRAOP_THREADS": "1",
                "TF_NUM_INTEROP_THREADS": "1", "TF_CPP_MIN_LOG_LEVEL": "3", "TF_ENABLE_ONEDNN_OPTS": "0",
                "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false",
                "PYTHONWARNINGS": "ignore"})
    return env


def start_worker(framework: str, request: dict, folder: Path) -> subprocess.Popen:
    out = folder / framework
    out.mkdir()
    path = out / "request.json"
    path.write_text(json.dumps({"framework": framework, **request}), encoding="utf-8")
    return subprocess.Popen([sys.executable, "-m", "nanlab.frameworks.worker", str(path), str(out)],
                            env=worker_env(framework), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish_worker(framework: str, proc: subprocess.Popen, folder: Path) -> tuple[dict, dict]:
    _, err = proc.communicate()
    response = folder / framework / "response.json"
    if proc.returncode != 0 or not response.exists():
        lines = [line for line in err.strip().splitlines() if line.strip()]
        last = lines[-1] if lines else f"exit status {proc.returncode}"
        raise FrameworkError(f"the {framework} worker failed: {last}")
    with np.load(folder / framework / "outputs.npz", allow_pickle=False) as outputs:
        arrays = {k: outputs[k] for k in outputs.files}
    return json.loads(response.read_text(encoding="utf-8")), arrays


def _score(scenario, output: np.ndarray, target) -> tuple[float, float | None]:
    out = torch.from_numpy(output).double()
    y = target.double() if target.is_floating_point() else target
    with torch.no_grad():
        exact = float(scenario.exact_loss(out, y))
        acc = float(scenario.accuracy(out, y)) if scenario.accuracy else None
    return exact, acc


def _variant_result(job: Job, measured: dict, outputs: dict) -> VariantResult:
    targets = {f"{job.scenario.name}/raw/y": job.raw.y}
    for variant, prepared, _, _ in job.specs:
        targets[f"{job.scenario.name}/{variant.name}/y"] = prepared.y
    target = targets[measured["target"]]
    exact_start, acc_start = _score(job.scenario, outputs[measured["output"] + "/start"], target)
    exact_end, acc_end = _score(job.scenario, outputs[measured["output"] + "/end"], target)
    first = measured["first_nonfinite"]
    if first is not None:
        event = Event.from_dict(first["event"]) if first.get("event") else None
        first = FirstNonFinite(int(first["step"]), first["quantity"], float(first["loss"]), event)
    losses = [float(x) for x in measured["losses"]]
    return VariantResult(
        name=measured["name"], role=measured["role"], summary=measured["summary"], lossy=measured["lossy"],
        overrides=measured["overrides"], finite=first is None, first_nonfinite=first, losses=losses,
        grad_norms=[], param_norms=[], final_loss=next((x for x in reversed(losses) if math.isfinite(x)), None),
        exact_loss_start=exact_start, exact_loss_end=exact_end, accuracy_start=acc_start, accuracy_end=acc_end,
        loss_gap=losses[0] - exact_start if losses else None, seconds=float(measured["seconds"]),
        metrics={"fit_seconds": float(measured["fit_seconds"])},
    )


def decide_framework_claims(scenario, result, all_run: bool, framework: str) -> list[ClaimResult]:
    """The scenario's claims on a framework's result. A claim that reads a variant or a
    probe this framework's recipe does not have is not decided, and says which."""
    claims = []
    for claim in scenario.claims:
        try:
            (row,) = decide_claims(dataclasses.replace(scenario, claims=[claim]), result, all_run)
        except KeyError as err:
            row = ClaimResult(scenario.name, claim.text, Verdict.not_decided,
                              f"not measured on {framework}: the claim reads {err.args[0] if err.args else err}, "
                              f"which the {FRAMEWORKS[framework].family} recipe does not measure", claim.source,
                              framework)
        claims.append(row)
    return claims


def build_result(job: Job, framework: str, measured: dict, outputs: dict, versions: dict) -> ScenarioResult:
    scenario = job.scenario
    if "error" in measured:
        raise FrameworkError(f"{scenario.name} on {framework}: {measured['error']}")
    variants = [_variant_result(job, v, outputs) for v in measured["variants"]]
    all_run = len(job.chosen) == len(scenario.variants)
    reproduced, fixed = verdicts.judge(variants, scenario.failure, scenario.learn, all_run)
    config = OmegaConf.to_container(job.cfg)
    config["framework"] = framework
    config["framework_versions"] = versions
    result = ScenarioResult(
        scenario=scenario.name, summary=scenario.summary, explanation=scenario.explanation, failure=scenario.failure,
        config=config, reproduced=reproduced, fixed=fixed, variants=variants, probes={**job.shared_probes, **measured["probes"]},
        changed=changed_settings(job.cfg),
    )
    result.claims = decide_framework_claims(scenario, result, all_run, framework)
    return result


@contextmanager
def workers(cfgs: list, frameworks: list[str], on_error=None):
    """Start one worker per non-torch framework in ``frameworks``, each with every
    scenario of ``cfgs`` that has its builder; yield a function that waits for them and
    returns {framework: {scenario: ScenarioResult}}. The caller runs its torch work
    inside the block, meanwhile. ``on_error(framework, scenario, error)`` takes a
    scenario that failed in a worker (the default raises FrameworkError)."""
    others = [f for f in frameworks if FRAMEWORKS[f].family != "torch"]
    for f in others:
        for cfg in cfgs:
            check_settings(cfg, f)
    jobs = {cfg.scenario.name: prepare_job(cfg) for cfg in cfgs if any(supported(cfg.scenario.name, f) for f in others)}
    with tempfile.TemporaryDirectory(prefix="nanlab-frameworks-") as tmp:
        folder = Path(tmp)
        procs = {}
        for f in others:
            wanted = [jobs[c.scenario.name] for c in cfgs if c.scenario.name in jobs and supported(c.scenario.name, f)]
            if wanted:
                sub = folder / f"request-{f}"
                sub.mkdir()
                procs[f] = (start_worker(f, _request(wanted, sub), folder), wanted)

        def collect() -> dict:
            results: dict = {f: {} for f in others}
            for f, (proc, wanted) in procs.items():
                response, outputs = finish_worker(f, proc, folder)
                by_name = {j["scenario"]: j for j in response["jobs"]}
                for job in wanted:
                    try:
                        report = build_result(job, f, by_name[job.scenario.name], outputs, response["versions"])
                    except FrameworkError as err:
                        if on_error is None:
                            raise
                        on_error(f, job.scenario.name, err)
                        continue
                    report.seconds = by_name[job.scenario.name]["seconds"]  # its own share of the worker
                    results[f][job.scenario.name] = report
            return results

        try:
            yield collect
        finally:
            for proc, _ in procs.values():
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()


def as_torch(cfg):
    """``cfg`` for nanlab's own run, whatever framework= named: the result (and the
    framework of its claims) then says torch, not ``all``."""
    if cfg.framework == "torch":
        return cfg
    cfg = cfg.copy()
    cfg.framework = "torch"
    return cfg


def measure(cfgs: list, frameworks: list[str], on_error=None) -> dict:
    """Run each config's scenario in each framework: {framework: {scenario: ScenarioResult}}.
    Torch runs here while the other frameworks' workers run; a scenario without a
    builder for a framework is left out of that framework's runs."""
    results: dict = {}
    with workers(cfgs, frameworks, on_error) as collect:
        if "torch" in frameworks:
            results["torch"] = {cfg.scenario.name: run_scenario(as_torch(cfg)) for cfg in cfgs}
        results.update(collect())
    return {f: results[f] for f in frameworks}


def run_frameworks(cfg) -> dict:
    """``framework=`` for one scenario: {framework: ScenarioResult}, in the table's order.
    A named framework without a builder is a config error; ``all`` leaves it out."""
    frameworks = chosen(str(cfg.framework))
    name = cfg.scenario.name
    if cfg.framework != "all":
        require_builder(name, frameworks[0])
    frameworks = [f for f in frameworks if supported(name, f)]
    results = measure([cfg], frameworks)
    return {f: results[f][name] for f in frameworks if name in results[f]}

