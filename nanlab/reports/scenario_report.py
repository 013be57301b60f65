"""What a person reads: the terminal report, result.json, and the optional figure.

Built from a ScenarioResult alone, so a saved result.json (``ScenarioResult.load``)
renders the same report without torch."""
from __future__ import annotations

import math
import sys
import textwrap
from pathlib import Path

from nanlab import jsonio
from nanlab.lab.result import ScenarioResult, VariantResult


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
    if v.lossy and v.cost is None and v.finite:
        lines.append("lossy: its cost is not measured (no exact fix learned, so there is nothing to compare with)")
    if v.cost:
        parts = [f"exact loss {v.cost['exact_loss']:+.4g}"]
        if "accuracy" in v.cost:
            parts.append(f"accuracy {v.cost['accuracy']:+.4g}")
        lines.append(f"lossy: costs {', '.join(parts)} against {v.cost['against']}")
    if v.metrics:
        lines.append(", ".join(f"{k} {_num(val)}" for k, val in v.metrics.items()))
    return lines


def render(result: ScenarioResult, files: list[str] = (), brief: bool = False) -> str:
    """The CLI's report. ``brief`` (a result's str and repr) leaves out the mechanism
    and each claim's evidence, naming the attributes that hold them instead."""
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


def verdict_lines(result: ScenarioResult) -> list[str]:
    """The scenario's verdict in plain words. When the run changed the scenario's own
    settings, the words say with what, because a failure that does not happen then
    is a finding, not a broken lab."""
    at = f" with {result.settings_text(1)}" if result.changed else ""
    own = f" (the scenario is set up at {result.settings_text(0)})" if result.changed else ""
    broken = result.broken
    failed = "stalled: it stayed finite and did not learn" if result.failure == "stall" else "went non-finite"
    if result.reproduced is None:
        first = "reproduced? not measured (the broken variant was not run: variant= left it out)"
    elif result.reproduced:
        when = f" at step {broken.nonfinite_step}" if broken.first_nonfinite else ""
        first = f"reproduced{at}: the broken variant {failed}{when}"
    elif not broken.finite:
        first = f"NOT reproduced{at}: the broken variant went non-finite at step {broken.nonfinite_step}, not a stall{own}"
    elif result.failure == "stall":
        first = f"NOT reproduced{at}: the broken variant learned{own}"
    else:
        first = f"NOT reproduced{at}: the broken variant stayed finite for {len(broken.losses)} steps{own}"
    exact = [v for v in result.variants if v.role == "fix" and not v.lossy]
    if result.fixed is None:
        second = "fixed? not measured (no exact fix was run: variant= left them out)"
    elif result.fixed:
        second = f"fixed{at}: every exact fix stayed finite and learned"
    else:
        failing = [f"{v.name} {v.verdict}" for v in exact if not (v.finite and v.learned)]
        second = f"NOT fixed{at}: " + ("; ".join(failing) if failing else "the scenario has no exact fix")
    return [f"Verdict: {first}.", f"         {second}."]


def one_line(result: ScenarioResult) -> str:
    """The run in one line: each variant's outcome, then the scenario's verdict."""
    parts = []
    for v in result.variants:
        what = f"non-finite at step {v.nonfinite_step}" if v.first_nonfinite else f"final loss {_num(v.final_loss)}"
        parts.append(f"{v.name} {what}")
    words = {True: "", False: "NOT ", None: "unmeasured: "}
    verdict = f"{words[result.reproduced]}reproduced, {words[result.fixed]}fixed"
    return f"{verdict} | " + "; ".join(parts)


def write(result: ScenarioResult, run_dir: Path, plot: bool) -> list[str]:
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


def html_section(result: ScenarioResult, figure: bool = True) -> str:
    """One scenario as HTML: mechanism, variant table, figure, claims. Numbers carry
    their exact value in ``data-value`` so that a reader (or a test) can check them."""
    from html import escape

    def number(x) -> str:
        raw = "" if x is None else (x if isinstance(x, str) else repr(x))
        return f'<td class="num" data-value="{escape(raw)}">{escape(_num(x))}</td>'

    rows = []
    for v in result.variants:
        event = v.first_nonfinite.event if v.first_nonfinite and v.first_nonfinite.event else None
        step = v.nonfinite_step
        rows.append(
            f'<tr class="role-{v.role}" data-variant="{escape(v.name)}"><td>{escape(v.name)}</td>'
            f"<td>{escape(v.role)}{' (lossy)' if v.lossy else ''}</td><td>{escape(v.summary)}</td>"
            f'<td class="num" data-value="{"" if step is None else step}">{"finite" if step is None else step}</td>'
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


class ScenarioReport(ScenarioResult):
    """What ``nanlab.run`` returns: a ScenarioResult (whose str and repr are the CLI's
    report, ``plot(path=None)`` the figure, ``save(path)`` result.json) that Jupyter
    also renders as HTML (``_repr_html_``)."""

    def _repr_html_(self) -> str:
        return html_section(self)
