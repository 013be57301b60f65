"""What a person reads: the terminal report, result.json, and the optional figure.

Built from a ScenarioResult alone, so a saved result.json (``ScenarioResult.load``)
renders the same report without torch."""
from __future__ import annotations

import math
import textwrap
from pathlib import Path

from nanlab import jsonio
from nanlab.result import ScenarioResult, VariantResult


def _num(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, str):
        return x
    if not math.isfinite(x):
        return str(x)
    return f"{x:.4g}"


def _happened(v: VariantResult) -> str:
    first = v.first_nonfinite
    if first is None:
        return f"finite for {len(v.losses)} steps"
    return f"{first.kind_word} {first.quantity} at step {first.step}"


def _detail(v: VariantResult) -> list[str]:
    lines = []
    if v.first_nonfinite and v.first_nonfinite.event:
        lines.append(v.first_nonfinite.event.describe())
    if v.role == "myth" and v.wrong:
        lines.append(f"its loss reads {_num(v.losses[0])} where the exact loss is {_num(v.exact_loss_start)} "
                     f"(off by {_num(v.loss_gap)})")
    if v.role in ("fix", "myth") and v.finite:
        acc = f", accuracy {_num(v.accuracy_end)}" if v.accuracy_end is not None else ""
        drop = v.loss_drop
        change = f"{_num(100 * drop)}% lower" if drop >= 0 else f"{_num(-100 * drop)}% higher"
        lines.append(f"exact loss {_num(v.exact_loss_start)} -> {_num(v.exact_loss_end)} ({change}){acc}")
    if v.cost:
        parts = [f"exact loss {v.cost['exact_loss']:+.4g}"]
        if "accuracy" in v.cost:
            parts.append(f"accuracy {v.cost['accuracy']:+.4g}")
        lines.append(f"lossy: costs {', '.join(parts)} against {v.cost['against']}")
    if v.metrics:
        lines.append(", ".join(f"{k} {_num(val)}" for k, val in v.metrics.items()))
    return lines


def render(result: ScenarioResult, files: list[str] = ()) -> str:
    c = result.config
    out = [f"{result.scenario}: {result.summary}",
           f"config: optimizer={c['optimizer']['name']} lr={_num(c['optimizer']['lr'])} init={c['init']['name']} "
           f"clip={c['clip']['name']} dtype={c['dtype']} device={c['device']} steps={c['steps']} seed={c['seed']}", ""]
    header = f"  {'variant':<24} {'role':<7} {'what happened':<28} {'loss start -> end':<22} verdict"
    out += [header, "  " + "-" * (len(header) - 2)]
    for v in result.variants:
        start = _num(v.losses[0]) if v.losses else "-"
        end = _num(v.losses[-1]) if v.losses else "-"
        role = v.role + ("*" if v.lossy else "")
        out.append(f"  {v.name:<24} {role:<7} {_happened(v):<28} {start + ' -> ' + end:<22} {v.verdict}")
        if v.overrides:
            out.append(f"  {'':<24} {'':<7} with " + ", ".join(f"{k}={_num(x)}" for k, x in v.overrides.items()))
        for line in _detail(v):
            out.append(f"  {'':<24} {'':<7} {line}")
    if any(v.lossy for v in result.variants):
        out.append("  (* lossy fix: it changes what is learned; its cost is measured above)")
    out.append("")
    for key, value in result.probes.items():
        out.append(f"  probe {key}: {_num(value) if not isinstance(value, (dict, list)) else value}")
    if result.probes:
        out.append("")
    out.append("Why:")
    out += ["  " + line for line in result.explanation.splitlines()]
    out.append("")
    if result.claims:
        out.append("Claims:")
        for claim in result.claims:
            out.append(f"  [{claim.verdict}] {claim.claim}")
            out += textwrap.wrap(claim.evidence, 100, initial_indent="      ", subsequent_indent="      ")
        out.append("")
    failed = "stalled" if result.failure == "stall" else "went non-finite"
    out.append(f"Verdict: {'reproduced' if result.reproduced else 'NOT reproduced'} (the broken variant "
               f"{failed if result.reproduced else 'did not fail as described'}); "
               f"{'fixed' if result.fixed else 'NOT fixed'} (every exact fix finite and learned: {result.fixed})")
    for f in files:
        out.append(f"Wrote {f}")
    return "\n".join(out)


def write(result: ScenarioResult, run_dir: Path, plot: bool) -> list[str]:
    path = jsonio.write_text(run_dir / "result.json", result.to_json() + "\n")
    files = [str(path)]
    if plot:
        files.append(plot_losses(result, run_dir / "losses.png"))
    return files


def plot_losses(result: ScenarioResult, path: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for v in result.variants:
        ys = [y if isinstance(y, float) and math.isfinite(y) and y > 0 else float("nan") for y in v.losses]
        line, = ax.plot(range(len(ys)), ys, label=f"{v.name} ({v.role})")
        if v.first_nonfinite:
            ax.axvline(v.first_nonfinite.step, color=line.get_color(), linestyle=":", alpha=0.7)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(f"{result.scenario}: dotted lines mark the first non-finite step")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)
