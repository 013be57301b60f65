"""What a person reads: the terminal report, result.json, and the optional figure.

Built from a ScenarioResult alone, so a saved result.json (``ScenarioResult.load``)
renders the same report without torch."""
from __future__ import annotations

import math
import sys
import textwrap
from pathlib import Path

from nanlab import jsonio
from nanlab.lab import verdicts


def short_number(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, str):
        return x
    if not math.isfinite(x):
        return str(x)
    return f"{x:.4g}"


def _detail(v) -> list[str]:
    lines = []
    if v.first_nonfinite and v.first_nonfinite.event:
        lines.append(v.first_nonfinite.event.describe())
    if v.role == "myth" and v.wrong:
        lines.append(f"its loss reads {short_number(v.losses[0])} where the exact loss is {short_number(v.exact_loss_start)} "
                     f"(off by {short_number(v.loss_gap)})")
    if v.role in ("fix", "myth") and v.finite:
        acc = f", accuracy {short_number(v.accuracy_end)}" if v.accuracy_end is not None else ""
        drop = v.loss_drop
        change = f"{short_number(100 * drop)}% lower" if drop >= 0 else f"{short_number(-100 * drop)}% higher"
        lines.append(f"exact loss {short_number(v.exact_loss_start)} -> {short_number(v.exact_loss_end)} ({change}){acc}")
    if v.lossy and v.cost is None and v.finite:
        lines.append("lossy: its cost is not measured (no exact fix learned, so there is nothing to compare with)")
    if v.cost:
        parts = [f"exact loss {v.cost['exact_loss']:+.4g}"]
        if "accuracy" in v.cost:
            parts.append(f"accuracy {v.cost['accuracy']:+.4g}")
        lines.append(f"lossy: costs {', '.join(parts)} against {v.cost['against']}")
    if v.metrics:
        lines.append(", ".join(f"{k} {short_number(val)}" for k, val in v.metrics.items()))
    return lines


def render(result, files: list[str] = (), brief: bool = False) -> str:
    """The CLI's report. ``brief`` (a result's str and repr) leaves out the mechanism
    and each claim's evidence, naming the attributes that hold them instead."""
    c = result.config
    out = [f"{result.scenario}: {result.summary}",
           f"config: optimizer={c['optimizer']['name']} lr={short_number(c['optimizer']['lr'])} init={c['init']['name']} "
           f"clip={c['clip']['name']} dtype={c['dtype']} device={c['device']} steps={c['steps']} seed={c['seed']}", ""]
    header = f"  {'variant':<24} {'role':<7} {'what happened':<28} {'loss start -> end':<22} verdict"
    out += [header, "  " + "-" * (len(header) - 2)]
    for v in result.variants:
        start = short_number(v.losses[0]) if v.losses else "-"
        end = short_number(v.losses[-1]) if v.losses else "-"
        role = v.role + ("*" if v.lossy else "")
        out.append(f"  {v.name:<24} {role:<7} {verdicts.what_happened(v):<28} {start + ' -> ' + end:<22} {v.verdict}")
        if v.overrides:
            out.append(f"  {'':<24} {'':<7} with " + ", ".join(f"{k}={short_number(x)}" for k, x in v.overrides.items()))
        for line in _detail(v):
            out.append(f"  {'':<24} {'':<7} {line}")
    if any(v.lossy for v in result.variants):
        out.append("  (* lossy fix: it changes what is learned; its cost is measured above)")
    out.append("")
    for key, value in result.probes.items():
        out.append(f"  probe {key}: {short_number(value) if not isinstance(value, (dict, list)) else value}")
    if result.probes:
        out.append("")
    if not brief:
        out.append("Why:")
        out += ["  " + line for line in result.explanation.splitlines()]
        out.append("")
    if result.claims:
        out.append("Claims:" + (" (evidence: .claims[i].evidence)" if brief else ""))
        for claim in result.claims:
            out.append(f"  [{claim.verdict}] {claim.claim}")
            if not brief:
                out += textwrap.wrap(claim.evidence, 100, initial_indent="      ", subsequent_indent="      ")
        out.append("")
    out += verdict_lines(result)
    for f in files:
        out.append(f"Wrote {f}")
    if brief:
        out.append("Why it fails: .explanation; every step's numbers: .variants; the full report: .show()")
    return "\n".join(out)


def verdict_text(verdict: verdicts.ScenarioVerdict) -> str:
    """``reproduced with optimizer=adam: the broken variant ...``: a verdict as one clause."""
    setting = f" with {verdict.setting}" if verdict.setting else ""
    return f"{verdict.word}{setting}{'' if verdict.holds is None else ':'} {verdict.reason}"


def verdict_lines(result) -> list[str]:
    """The scenario's verdicts in plain words (nanlab.lab.verdicts.explain), two lines."""
    reproduced, fixed = verdicts.explain(result)
    return [f"Verdict: {verdict_text(reproduced)}.", f"         {verdict_text(fixed)}."]


def one_line(result) -> str:
    """The run in one line: the scenario's verdict, then each variant's outcome. A fix
    that stayed finite but did not learn is told apart from one that went non-finite."""
    parts = []
    for v in result.variants:
        if v.first_nonfinite:
            what = f"non-finite at step {v.nonfinite_step}"
        else:
            what = f"final loss {short_number(v.final_loss)}" + ("" if v.learned or v.role == "broken" else ", did not learn")
        parts.append(f"{v.name} {what}")
    words = {True: "", False: "NOT ", None: "unmeasured: "}
    fixed = f"{words[result.fixed]}fixed"
    if result.fixed is False:
        fixes = [v for v in result.variants if v.role == "fix" and not v.lossy]
        fixed += (" (a fix went non-finite)" if any(v.first_nonfinite for v in fixes)
                  else " (every fix stayed finite; one did not learn)")
    return f"{words[result.reproduced]}reproduced, {fixed} | " + "; ".join(parts)


def write(result, run_dir: Path, plot: bool) -> list[str]:
    """result.json, and with ``plot`` the figure. A figure that cannot be drawn is
    reported in one line and never costs the run its result or its report."""
    path = jsonio.write_text(run_dir / "result.json", result.to_json() + "\n")
    files = [str(path)]
    if plot:
        from nanlab.reports import figures

        try:
            files.append(str(figures.write_png(figures.variant_figure(result), run_dir / "losses.png")))
        except Exception as err:  # matplotlib can fail in many ways; the run's numbers must survive it
            print(f"nanlab: warning: losses.png not written ({type(err).__name__}: {err})", file=sys.stderr)
    return files


def html_section(result, figure: bool = True) -> str:
    """One scenario as HTML: mechanism, variant table, figure, claims. Numbers carry
    their exact value in ``data-value`` so that a reader (or a test) can check them."""
    from html import escape

    def number(x) -> str:
        raw = "" if x is None else (x if isinstance(x, str) else repr(x))
        return f'<td class="num" data-value="{escape(raw)}">{escape(short_number(x))}</td>'

    rows = []
    for v in result.variants:
        event = v.first_nonfinite.event if v.first_nonfinite and v.first_nonfinite.event else None
        step = v.nonfinite_step
        rows.append(
            f'<tr class="role-{escape(str(v.role))}" data-variant="{escape(v.name)}"><td>{escape(v.name)}</td>'
            f"<td>{escape(v.role)}{' (lossy)' if v.lossy else ''}</td><td>{escape(v.summary)}</td>"
            f'<td class="num" data-value="{"" if step is None else escape(str(step))}">{"finite" if step is None else escape(str(step))}</td>'
            f"<td>{escape(event.describe()) if event else '-'}</td>"
            f"{number(v.exact_loss_start)}{number(v.exact_loss_end)}<td class=\"verdict\">{escape(v.verdict)}</td></tr>")
    claims = "".join(
        f'<li><span class="verdict v-{c.verdict.name}">{escape(c.verdict.value)}</span> {escape(c.claim)}'
        f'<div class="evidence">{escape(c.evidence)}</div></li>' for c in result.claims)
    image = ""
    if figure:
        import base64

        from nanlab.reports import figures

        data = base64.b64encode(figures.png_bytes(figures.variant_figure(result))).decode("ascii")
        image = (f'<figure><img alt="{escape(result.scenario)}: exact loss and gradient norm per step" '
                 f'src="data:image/png;base64,{data}"><figcaption>Exact float64 loss and gradient norm per step; '
                 f"a cross marks the step where a variant went non-finite.</figcaption></figure>")
    verdict = " ".join(line.strip() for line in verdict_lines(result))
    return (f'<section id="{escape(result.scenario)}" data-scenario="{escape(result.scenario)}">'
            f"<h2>{escape(result.scenario)}</h2><p class=\"summary\">{escape(result.summary)}</p>"
            f"<h3>Why it fails</h3><pre class=\"mechanism\">{escape(result.explanation)}</pre>"
            "<h3>Broken, fixes and myths</h3><table class=\"variants\"><thead><tr><th>variant</th><th>role</th>"
            "<th>what it does</th><th>first non-finite step</th><th>first bad op (tracer)</th>"
            "<th>exact loss, start</th><th>exact loss, end</th><th>verdict</th></tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table><p class=\"scenario-verdict\">{escape(verdict)}</p>{image}"
            + (f"<h3>Claims, measured</h3><ul class=\"claims\">{claims}</ul>" if claims else "") + "</section>")
