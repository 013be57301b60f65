"""Stability maps: where in the grid the broken variant went non-finite, and when.

- stability.png (:func:`stability_map`): one row per combination of the swept keys
  other than the lr, one column per lr; the colour is the step at which the broken
  variant first went non-finite, "stayed finite" has its own colour, and each row
  marks its critical lr (between its largest finite lr and the next lr up).
- boundary.png (:func:`boundary_map`): mode=boundary's critical lr per init and
  clip, with the bracket [lo, hi] it was measured to.

Built from the summary rows and boundary entries alone (strings and floats), so a
saved summary draws the same map. The lr axis is log10 on a linear scale, as in
nanlab.reports.figures. NaN, inf, empty cells and failed rows are drawn as "no result"
rather than passed to matplotlib. Matplotlib is imported here only, when drawing.
"""
from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Optional

from nanlab import jsonio
from nanlab.reports.figures import power_of_ten

FINITE_COLOUR = "#4daf4a"
MISSING_COLOUR = "#d9d9d9"
STEP_COLOURMAP = "magma"
LR_KEY = "optimizer.lr"


def _float(text) -> Optional[float]:
    """A finite float from a cell or entry; None for empty, NaN, inf or junk."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _edges(xs: list) -> list:
    """Cell edges around sorted log10 positions: midway between neighbours."""
    if len(xs) == 1:
        return [xs[0] - 0.25, xs[0] + 0.25]
    mids = [(a + b) / 2 for a, b in zip(xs, xs[1:])]
    return [xs[0] - (mids[0] - xs[0]), *mids, xs[-1] + (xs[-1] - mids[-1])]


def critical_between(lrs_and_steps: list) -> Optional[float]:
    """The grid's estimate of a row's critical lr: the geometric midpoint between the
    largest lr that stayed finite below the smallest lr that did not, and that lr.
    None when the row has no such pair."""
    bad = [lr for lr, step in lrs_and_steps if step is not None]
    if not bad:
        return None
    first_bad = min(bad)
    good = [lr for lr, step in lrs_and_steps if step is None and lr < first_bad]
    return math.sqrt(max(good) * first_bad) if good else None


# Up to this many lrs, each cell shows its step and each lr its tick label.
MAX_LABELLED_CELLS = 24


def stability_map(summary, path: Path) -> str:
    """Draw stability.png from a nanlab.sweeps.summary.Summary that swept the lr."""
    return _save(stability_figure(summary), Path(path))


def stability_figure(summary):
    """The stability map as a matplotlib figure (the caller closes or saves it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import Normalize
    from matplotlib.patches import Patch

    broken = summary.broken
    step_column = f"{broken}.first_nonfinite_step"
    others = [k for k in summary.keys if k != LR_KEY]
    cells: dict = {}  # (row label, lr) -> step (int), None for finite, "missing"
    labels: list = []
    for row in summary.rows:
        lr = _float(row.get(LR_KEY))
        if lr is None or lr <= 0:
            continue
        label = ", ".join(f"{k}={row[k]}" for k in others) if others else summary.scenario or "all"
        if label not in labels:
            labels.append(label)
        text = str(row.get(step_column, "")).strip()
        step = _float(text)
        if row.get("status") != "ok" or (text and (step is None or step < 0)):
            cells[(label, lr)] = "missing"  # a failed job, or a step that is not a step
        else:
            cells[(label, lr)] = None if not text else int(step)  # empty: it stayed finite
    lrs = sorted({lr for _, lr in cells})
    failed_at = [s for s in cells.values() if isinstance(s, int)]
    steps = summary.steps or max(failed_at, default=0) + 1

    fig, ax = plt.subplots(figsize=(max(7.0, min(14, 2.5 + 0.18 * len(lrs))), 2.2 + 0.55 * max(1, len(labels))))
    xs = [math.log10(lr) for lr in lrs]
    x_edges = _edges(xs)
    # The colours span the steps seen, so that early and late blow-ups stay apart.
    norm = Normalize(vmin=0, vmax=max(1, max(failed_at, default=1)))
    cmap = plt.get_cmap(STEP_COLOURMAP)
    critical_drawn = False
    for row_index, label in enumerate(labels):
        y = len(labels) - 1 - row_index  # the first row on top, as in the summary
        row_points = []
        for i, lr in enumerate(lrs):
            if (label, lr) not in cells:
                continue
            value = cells[(label, lr)]
            colour = (MISSING_COLOUR if value == "missing" else FINITE_COLOUR if value is None
                      else cmap(norm(value)))
            ax.add_patch(plt.Rectangle((x_edges[i], y - 0.5), x_edges[i + 1] - x_edges[i], 1.0, facecolor=colour,
                                       edgecolor="white", linewidth=0.5, hatch="//" if value == "missing" else None))
            if value != "missing":
                row_points.append((lr, value))
            if isinstance(value, int) and len(lrs) <= MAX_LABELLED_CELLS:  # each cell shows its step
                shade = cmap(norm(value))
                dark = 0.299 * shade[0] + 0.587 * shade[1] + 0.114 * shade[2] < 0.5
                ax.text(xs[i], y, str(value), ha="center", va="center", fontsize=7,
                        color="white" if dark else "black")
        critical = critical_between(row_points)
        if critical is not None:
            ax.plot([math.log10(critical)] * 2, [y - 0.5, y + 0.5], color="#00bfff", linewidth=3,
                    label=None if critical_drawn else "critical lr (grid estimate)")
            critical_drawn = True
    ax.set_xlim(x_edges[0], x_edges[-1])
    ax.set_ylim(-0.5, len(labels) - 0.5)
    ax.set_yticks(range(len(labels)))
    ax.set_yticklabels(labels[::-1])
    # The ticks are the lrs tried, at their cells (every k-th when there are many).
    every = max(1, math.ceil(len(lrs) / MAX_LABELLED_CELLS))
    ax.set_xticks(xs[::every])
    ax.set_xticklabels([f"{lr:.3g}" for lr in lrs[::every]], rotation=45 if len(lrs) > 8 else 0,
                       ha="right" if len(lrs) > 8 else "center", fontsize=8)
    ax.set_xlabel(f"learning rate ({LR_KEY}, log scale)")
    ax.set_ylabel(", ".join(others) if others else "scenario")
    ax.set_title(f"{summary.scenario}: first non-finite step of {broken}", fontsize=11)
    mappable = plt.cm.ScalarMappable(norm=norm, cmap=cmap)
    bar = fig.colorbar(mappable, ax=ax, pad=0.01)
    bar.set_label(f"first non-finite step (of {steps})")
    handles = [Patch(facecolor=FINITE_COLOUR, label=f"stayed finite for all {steps} steps")]
    if any(v == "missing" for v in cells.values()):
        handles.append(Patch(facecolor=MISSING_COLOUR, hatch="//", label="no result"))
    line_handles, _ = ax.get_legend_handles_labels()
    fig.legend(handles=handles + line_handles, loc="lower center", ncol=len(handles) + len(line_handles), fontsize=8,
               frameon=False)
    fig.tight_layout(rect=(0, 0.09, 1, 1))
    return fig


def boundary_map(entries: list, path: Path, scenario: str = "") -> str:
    """Draw boundary.png from mode=boundary's entries ({init, clip, critical_lr, lo, hi})."""
    return _save(boundary_figure(entries, scenario), Path(path))


def boundary_figure(entries: list, scenario: str = ""):
    """The boundary chart as a matplotlib figure (the caller closes or saves it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    inits = list(dict.fromkeys(str(e["init"]) for e in entries))
    clips = list(dict.fromkeys(str(e["clip"]) for e in entries))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.8 * len(inits) + 2), 4.2))
    markers, colours = "osD^v", ("#000000", "#E69F00", "#0072B2", "#009E73", "#D55E00")
    width = 0.6 / max(1, len(clips))
    drawn_any, labelled, unbounded = False, set(), set()
    for j, clip in enumerate(clips):
        for i, init in enumerate(inits):
            entry = next((e for e in entries if str(e["init"]) == init and str(e["clip"]) == clip), None)
            if entry is None:
                continue
            x = i + (j - (len(clips) - 1) / 2) * width
            crit, lo, hi = (_float(entry.get(k)) for k in ("critical_lr", "lo", "hi"))
            label = None if clip in labelled else f"clip={clip}"
            labelled.add(clip)
            style = dict(color=colours[j % len(colours)], marker=markers[j % len(markers)])
            if crit is not None and crit > 0:
                y = math.log10(crit)
                low = math.log10(lo) if lo is not None and lo > 0 else y
                high = math.log10(hi) if hi is not None and hi > 0 else y
                ax.plot([x, x], [low, high], color=style["color"], linewidth=1.5)
                ax.plot([x], [y], linestyle="none", label=label, **style)
                ax.annotate(f"{crit:.3g}", (x, y), textcoords="offset points", xytext=(7, 3), fontsize=8)
                drawn_any = True
            elif lo is not None and lo > 0:  # finite at every lr tried, up to lr_max
                ax.plot([x], [math.log10(lo)], linestyle="none", fillstyle="none", markersize=9, label=label,
                        **{**style, "marker": "^"})
                unbounded.add(("^", f"finite at every lr tried (up to {lo:.3g})"))
                drawn_any = True
            elif hi is not None and hi > 0:  # non-finite already at lr_min
                ax.plot([x], [math.log10(hi)], linestyle="none", fillstyle="none", markersize=9, label=label,
                        **{**style, "marker": "v"})
                unbounded.add(("v", f"non-finite at every lr tried (down to {hi:.3g})"))
                drawn_any = True
    if not drawn_any:
        ax.text(0.5, 0.5, "no finite boundary to draw", transform=ax.transAxes, ha="center", va="center")
    ax.set_xticks(range(len(inits)))
    ax.set_xticklabels(inits)
    ax.set_xlim(-0.6, len(inits) - 0.4)
    ax.margins(y=0.12)
    ax.yaxis.set_major_formatter(FuncFormatter(power_of_ten))
    ax.set_xlabel("initializer (init)")
    ax.set_ylabel("critical learning rate (log scale)")
    where = f"{scenario}: " if scenario else ""
    ax.set_title(f"{where}largest lr at which the broken variant stays finite", fontsize=11)
    ax.grid(axis="y", alpha=0.3)
    if drawn_any:
        from matplotlib.lines import Line2D

        handles, names = ax.get_legend_handles_labels()
        for marker, text in sorted(unbounded):
            handles.append(Line2D([], [], color="#555555", marker=marker, fillstyle="none", linestyle="none"))
            names.append(text)
        ax.legend(handles, names, fontsize=8, title="gradient clipping", title_fontsize=8, loc="best")
    fig.tight_layout()
    return fig


def _save(fig, path: Path) -> str:
    """Render into memory, then write atomically: a failed draw leaves no half file."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png", dpi=110)
    finally:
        plt.close(fig)
    return str(jsonio.write_bytes(Path(path), buffer.getvalue()))
