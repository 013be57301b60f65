"""Checks to run on data before training, each failing with one clear message.

``validate_labels`` catches the label problems that make classification losses
error out or go NaN; ``validate_data`` names the rows and columns holding NaN or Inf.
"""
from __future__ import annotations

import torch


class DataError(ValueError):
    """Raised by the validators; the message names what is wrong and where."""


def _examples(index: torch.Tensor, limit: int = 5) -> str:
    shown = ", ".join(str(int(i)) for i in index[:limit])
    return shown + (f" (+{len(index) - limit} more)" if len(index) > limit else "")


def label_problems(labels: torch.Tensor, num_classes: int, ignore_index: int = -100) -> list[str]:
    """Every problem found, as short phrases; empty when the labels are usable."""
    flat = labels.reshape(-1)
    problems = []
    if flat.is_floating_point():
        nan = torch.nonzero(~torch.isfinite(flat)).flatten()
        if len(nan):
            problems.append(f"{len(nan)} NaN/Inf label(s) at flat index {_examples(nan)}")
        finite = flat[torch.isfinite(flat)]
        fractional = torch.nonzero(torch.isfinite(flat) & (flat != flat.round())).flatten()
        if len(fractional):
            problems.append(f"{len(fractional)} non-integer label(s) at flat index {_examples(fractional)} "
                            "(casting to long would truncate them silently)")
        flat = finite[finite == finite.round()].long()  # range checks on the integer-valued ones
    valid = flat != ignore_index
    negative = torch.nonzero(valid & (flat < 0)).flatten()
    if len(negative):
        problems.append(f"{len(negative)} negative label(s) other than ignore_index={ignore_index}, "
                        f"e.g. {_examples(flat[negative].unique())}")
    too_big = torch.nonzero(valid & (flat >= num_classes)).flatten()
    if len(too_big):
        problems.append(f"{len(too_big)} label(s) >= num_classes={num_classes}, e.g. {_examples(flat[too_big].unique())}")
    if labels.dim() >= 2 and not labels.is_floating_point():
        empty = torch.nonzero((labels == ignore_index).reshape(len(labels), -1).all(1)).flatten()
        if len(empty):
            problems.append(f"{len(empty)} row(s) with every label = ignore_index (a mean over them is 0/0): "
                            f"rows {_examples(empty)}")
    return problems


def validate_labels(labels: torch.Tensor, num_classes: int, ignore_index: int = -100) -> None:
    """Raise DataError naming every label problem, or return None.

    Checks: NaN/Inf, non-integer floats, negatives other than ignore_index, values
    >= num_classes, and (for 2-D labels such as token tags) rows that are entirely
    ignore_index, which make a per-row mean 0/0.
    """
    problems = label_problems(labels, num_classes, ignore_index)
    if problems:
        raise DataError("labels are not usable: " + "; ".join(problems))


def nonfinite_cells(x: torch.Tensor) -> dict:
    """{"nan": [(row, col), ...], "inf": [...]} for a 2-D tensor."""
    x2 = x.reshape(len(x), -1)
    return {"nan": [tuple(map(int, rc)) for rc in torch.nonzero(torch.isnan(x2))],
            "inf": [tuple(map(int, rc)) for rc in torch.nonzero(torch.isinf(x2))]}


def validate_data(x: torch.Tensor, name: str = "x") -> None:
    """Raise DataError naming the rows and columns that hold NaN or Inf."""
    cells = nonfinite_cells(x)
    parts = []
    for kind, found in cells.items():
        if found:
            rows = sorted({r for r, _ in found})
            cols = sorted({c for _, c in found})
            parts.append(f"{len(found)} {kind.upper()} in rows {_examples(torch.tensor(rows))}, "
                         f"columns {_examples(torch.tensor(cols))}")
    if parts:
        raise DataError(f"{name} has non-finite values: " + "; ".join(parts))


def impute_column_mean(x: torch.Tensor) -> torch.Tensor:
    """Replace NaN/Inf by the mean of the finite values in the same column."""
    finite = torch.isfinite(x)
    means = torch.where(finite, x, torch.zeros_like(x)).sum(0) / finite.sum(0).clamp_min(1)
    return torch.where(finite, x, means.expand_as(x))


def finite_rows(x: torch.Tensor) -> torch.Tensor:
    """Boolean mask of the rows with no NaN or Inf."""
    return torch.isfinite(x.reshape(len(x), -1)).all(1)
