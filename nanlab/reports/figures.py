"""The figures a person looks at: per step, each variant's exact loss and gradient norm.

Every variant is drawn with its own colour, line style and marker, so that lines
that coincide stay distinguishable, also in greyscale. A variant that went
non-finite gets a cross at the step it did, even at step 0, where there is no line
to see. Values that are NaN, infinite or not positive are gaps in the lines. Matplotlib is imported here
only, and only when a figure is drawn.
"""
from __future__ import annotations

import io
import math
from pathlib import Path

from nanlab import jsonio

# Colour-blind-safe colours of different lightness, each with its own dash and
# marker: any two variants differ in at least two of the three.
STYLES = [
    ("#000000", "-", "o"),
    ("#E69F00", "--", "s"),
    ("#0072B2", ":", "^"),
    ("#009E73", "-.", "D"),
    ("#D55E00", (0, (5, 1, 1, 1)), "v"),
    ("#56B4E9", (0, (1, 1)), "P"),
    ("#CC79A7", (0, (3, 1, 3, 1, 1, 1)), "X"),
]


def log10_or_gap(values) -> list:
    """log10 of each positive finite value; NaN (a gap in the line) for anything else.

    The axes plot log10 on a linear scale rather than using matplotlib's log scale:
    its tick locator overflows on float64 values near 1e300, which a diverging
    float64 run reaches."""
    return [math.log10(y) if isinstance(y, (int, float)) and math.isfinite(y) and y > 0 else math.nan for y in values]


def power_of_ten(exponent, _position=None) -> str:
    """A tick label on a log10 axis drawn on a linear scale (a matplotlib FuncFormatter):
    10^n for a whole exponent, the plain number between them."""
    return f"$10^{{{exponent:g}}}$" if float(exponent).is_integer() else f"{10 ** exponent:.3g}"


def variant_figure(result):
    """Two panels, exact float64 loss and gradient norm per step, one line per variant,
    of a ScenarioResult (not imported here: ScenarioResult.plot calls this)."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    fig = Figure(figsize=(10, 4.2), layout="constrained")
    loss_ax, grad_ax = fig.subplots(1, 2)
    panels = ((loss_ax, "exact_losses", "exact loss (float64, log scale)"),
              (grad_ax, "grad_norms", "gradient norm (log scale)"))
    failed = [v.name for v in result.variants if v.first_nonfinite is not None]
    for index, v in enumerate(result.variants):
        colour, dash, marker = STYLES[index % len(STYLES)]
        label = f"{v.name} ({v.role})"
        for ax, field, _ in panels:
            ys = log10_or_gap(getattr(v, field))
            every = max(1, len(ys) // 8)
            # Offset each variant's markers so that coinciding lines still show every marker.
            ax.plot(range(len(ys)), ys, color=colour, linestyle=dash, marker=marker, markersize=5,
                    markevery=(index % every, every), label=label, linewidth=1.6)
            if v.first_nonfinite is not None:
                step = v.first_nonfinite.step
                # Crosses stacked down from the top edge, one row per failed variant: visible
                # even at step 0, where no line was drawn, and when two fail at one step.
                height = 0.95 - 0.07 * failed.index(v.name)
                ax.axvline(step, color=colour, linestyle=":", linewidth=1, alpha=0.8)
                ax.plot([step], [height], marker="X", markersize=10, color=colour, markeredgecolor="white",
                        transform=ax.get_xaxis_transform(), clip_on=False, linestyle="none")
                ax.annotate(f"step {step}", (step, height), xycoords=("data", "axes fraction"), xytext=(7, -3),
                            textcoords="offset points", fontsize=7, color=colour)
    for ax, _, ylabel in panels:
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="major", alpha=0.3)
        ax.yaxis.set_major_locator(MaxNLocator(nbins=6, integer=True))
        ax.yaxis.set_major_formatter(FuncFormatter(power_of_ten))
        ax.set_xlim(left=-0.5)
    loss_ax.set_title("exact loss per step (lower is better)")
    grad_ax.set_title("gradient norm per step")
    handles, labels = loss_ax.get_legend_handles_labels()
    handles.append(Line2D([], [], marker="X", color="grey", linestyle="none", markersize=9))
    labels.append("went non-finite here")
    fig.legend(handles, labels, loc="outside lower center", ncol=min(3, len(labels)), fontsize=8, frameon=False)
    fig.suptitle(f"{result.scenario}: {result.summary}", fontsize=9)
    return fig


def png_bytes(fig, dpi: int = 110) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def write_png(fig, path: Path) -> Path:
    return jsonio.write_bytes(path, png_bytes(fig))
