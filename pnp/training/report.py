"""What a pruning run achieved: accuracy, cost, latency, as JSON, a text table and plots."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn

from pnp.core.cost import count_flops_params, measure_latency
from pnp.core.io import replace_atomically

STAGES = (("baseline", "baseline"), ("pruned", "pruned"), ("finetuned", "fine-tuned"))


@torch.no_grad()
def evaluate_accuracy(model: nn.Module, loader, device: str | torch.device = "cpu",
                      layout: torch.memory_format = torch.contiguous_format) -> float:
    """Top-1 accuracy of ``model`` on ``loader`` (batches of ``(inputs, labels, ...)``), in percent.

    ``layout``: the memory format image batches are given in (the one ``model``'s weights are in).
    """
    was_training = model.training
    model.eval()
    correct = total = 0
    try:
        for batch in loader:
            x, y = batch[0].to(device), batch[1].to(device)
            if x.dim() == 4:  # as pnp.training.layout.in_layout, without importing Lightning here
                x = x.contiguous(memory_format=layout)
            correct += int((model(x).argmax(-1) == y).sum())
            total += int(y.numel())
    finally:
        model.train(was_training)
    if total == 0:
        raise ValueError("the loader gave no samples; cannot measure accuracy")
    return 100.0 * correct / total


def model_summary(
    model: nn.Module,
    example_input_shape: Sequence[int],
    batch_sizes: Sequence[int] = (1, 64),
    threads: Sequence[int] = (1,),
    warmup: int = 3,
    repeats: int = 10,
) -> dict:
    """FLOPs per sample, parameters and measured CPU latency of ``model``.

    ``example_input_shape`` is one input's shape without the batch dimension,
    e.g. ``(1, 28, 28)``. Latency is the median of ``repeats`` timed runs per
    (batch size, threads) pair.
    """
    shape = [int(s) for s in example_input_shape]
    cost = count_flops_params(model, torch.zeros(1, *shape))
    latency = measure_latency(model, shape, batch_sizes=batch_sizes, threads=threads, warmup=warmup, repeats=repeats)
    return {
        "input_shape": shape,
        "flops": int(cost.flops),
        "params": int(cost.params),
        "latency": [{"batch_size": l.batch_size, "threads": l.threads, "median_ms": round(l.median_ms, 4)} for l in latency],
    }


# --------------------------------------------------------------------------- the table


def format_count(value: float | None, unit: str = "") -> str:
    """``2290000`` -> ``"2.29 M"``."""
    if value is None:
        return "-"
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= factor:
            return f"{value / factor:.2f} {prefix}{unit}"
    return f"{value:g} {unit}".rstrip()


def _ratio(before, after) -> str:
    if before is None or after is None or not after:
        return "-"
    return f"x{before / after:.2f} smaller"


def _latency_rows(stages: dict[str, dict]) -> list[tuple[int, int]]:
    keys: list[tuple[int, int]] = []
    for stage in stages.values():
        for entry in stage.get("latency", []) or []:
            key = (int(entry["batch_size"]), int(entry.get("threads", 1)))
            if key not in keys:
                keys.append(key)
    return sorted(keys)


def _latency_of(stage: dict, key: tuple[int, int]) -> float | None:
    for entry in stage.get("latency", []) or []:
        if (int(entry["batch_size"]), int(entry.get("threads", 1))) == key:
            return float(entry["median_ms"])
    return None


def format_before_after_table(report: Mapping[str, Any]) -> str:
    """A plain-text table of the run: accuracy, FLOPs, params and latency per stage, then stage durations.

    ``report`` holds ``"baseline"``, ``"pruned"`` and ``"finetuned"`` (any may be
    missing), each a dict such as :func:`model_summary` gives plus ``"accuracy"``
    (percent); and optionally ``"durations_s"``: ``{stage name: seconds}``. The
    change column compares the last stage present with the baseline: accuracy in
    points, FLOPs and params as reduction factors, latency as speed-up.
    """
    stages = {key: dict(report[key]) for key, _ in STAGES if isinstance(report.get(key), Mapping)}
    if not stages:
        raise ValueError("report has none of the stages 'baseline', 'pruned', 'finetuned'; nothing to tabulate")
    base = stages.get("baseline", {})
    last = next((stages[k] for k, _ in reversed(STAGES) if k in stages and k != "baseline"), {})

    def acc(stage):
        a = stage.get("accuracy")
        return None if a is None else float(a)

    rows: list[list[str]] = []
    a0, a1 = acc(base), acc(last)
    rows.append(
        ["accuracy (%)"]
        + [("-" if acc(stages[k]) is None else f"{acc(stages[k]):.2f}") if k in stages else "-" for k, _ in STAGES]
        + ["-" if a0 is None or a1 is None else f"{a1 - a0:+.2f} pts"]
    )
    for field in ("flops", "params"):
        rows.append(
            [field if field == "params" else "FLOPs (MACs/sample)"]
            + [format_count(stages[k].get(field)) if k in stages else "-" for k, _ in STAGES]
            + [_ratio(base.get(field), last.get(field))]
        )
    for batch, n_threads in _latency_rows(stages):
        before, after = _latency_of(base, (batch, n_threads)), _latency_of(last, (batch, n_threads))
        cells = []
        for k, _ in STAGES:
            v = _latency_of(stages[k], (batch, n_threads)) if k in stages else None
            cells.append("-" if v is None else f"{v:.3f}")
        speedup = "-" if before is None or not after else f"x{before / after:.2f} faster"
        thread_word = "thread" if n_threads == 1 else "threads"
        rows.append([f"latency ms, batch {batch} ({n_threads} {thread_word})"] + cells + [speedup])

    header = ["", *(title for _, title in STAGES), "change"]
    text = render_table([header, *rows])
    durations = report.get("durations_s") or {}
    if durations:
        total = sum(float(v) for v in durations.values())
        lines = [["stage", "seconds", "share"]]
        for name, seconds in durations.items():
            share = f"{100.0 * float(seconds) / total:.1f}%" if total > 0 else "-"
            lines.append([str(name), f"{float(seconds):.1f}", share])
        lines.append(["total", f"{total:.1f}", "100.0%" if total > 0 else "-"])
        text += "\n\n" + render_table(lines)
    return text


def render_table(rows: list[list[str]]) -> str:
    """Rows of cells as an aligned text table: first column left, the rest right, a rule under the header."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for n, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
        out.append("  ".join(cells).rstrip())
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


# --------------------------------------------------------------------------- plots


def new_figure(width: float, height: float):
    """A matplotlib figure of ``width`` x ``height`` inches on its own Agg canvas (pyplot's backend untouched)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def save_png(fig, path: str | Path) -> Path:
    """Lay ``fig`` out and write it to ``path`` as PNG, atomically."""
    fig.tight_layout()
    return replace_atomically(path, lambda tmp: fig.savefig(tmp, format="png"))


def plot_channels_per_layer(
    groups_kept: Mapping[str, int],
    group_sizes: Mapping[str, int],
    path: str | Path,
    order: Sequence[str] | None = None,
    title: str = "Channels per group: original and kept",
) -> Path:
    """Bar chart of each group's original channel count and how many were kept.

    Groups are drawn in ``order`` (e.g. ``[n for n, _ in model.named_modules()]``,
    which for most networks is the order of computation; names it lacks go last),
    else in the order of ``group_sizes``.
    """
    missing = [name for name in groups_kept if name not in group_sizes]
    if missing:
        raise KeyError(f"groups_kept names groups without a size in group_sizes: {missing}")
    names = list(group_sizes)
    if order is not None:
        rank = {name: i for i, name in enumerate(order)}
        names.sort(key=lambda n: rank.get(n, len(rank)))
    sizes = [int(group_sizes[n]) for n in names]
    kept = [int(groups_kept.get(n, group_sizes[n])) for n in names]
    n = len(names)
    fig = new_figure(max(6.0, 0.35 * n + 2.0), 4.8)
    ax = fig.add_subplot(1, 1, 1)
    xs = list(range(n))
    ax.bar(xs, sizes, width=0.8, color="#c8d3e0", label="original")
    ax.bar(xs, kept, width=0.5, color="#2b6cb0", label="kept")
    if n <= 40:
        for x, k, s in zip(xs, kept, sizes):
            ax.text(x, k, str(k), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(xs)
    ax.set_xticklabels(names, rotation=60 if n > 6 else 0, ha="right" if n > 6 else "center", fontsize=8)
    ax.set_ylabel("channels")
    total_kept, total = sum(kept), sum(sizes)
    ax.set_title(f"{title} ({total_kept}/{total} = {100.0 * total_kept / max(total, 1):.1f}% kept)")
    ax.legend(loc="upper left")
    ax.set_xlim(-0.6, n - 0.4)
    return save_png(fig, path)


def plot_accuracy_vs_flops(points: Sequence[Mapping[str, Any]], path: str | Path, title: str = "Accuracy vs FLOPs") -> Path:
    """Scatter of accuracy (%) against FLOPs, each point labelled.

    Each point is ``{"label", "flops", "accuracy"}``; points that share a
    ``"series"`` value are joined by a line in FLOPs order. The FLOPs axis is
    logarithmic when the points span more than a factor of 10.
    """
    if not points:
        raise ValueError("no points to plot")
    for i, p in enumerate(points):
        for key in ("label", "flops", "accuracy"):
            if key not in p:
                raise KeyError(f"point {i} ({dict(p)}) has no {key!r}")
    fig = new_figure(6.4, 4.8)
    ax = fig.add_subplot(1, 1, 1)
    series: dict[str, list] = {}
    for p in points:
        if p.get("series") is not None:
            series.setdefault(str(p["series"]), []).append(p)
    for name, members in series.items():
        members = sorted(members, key=lambda p: float(p["flops"]))
        ax.plot([float(p["flops"]) for p in members], [float(p["accuracy"]) for p in members], "-o", label=name)
    loose = [p for p in points if p.get("series") is None]
    if loose:
        ax.scatter([float(p["flops"]) for p in loose], [float(p["accuracy"]) for p in loose], color="black", zorder=3)
    for p in points:
        ax.annotate(str(p["label"]), (float(p["flops"]), float(p["accuracy"])), textcoords="offset points", xytext=(4, 4), fontsize=8)
    flops = [float(p["flops"]) for p in points]
    format_flops_axis(ax, log=min(flops) > 0 and max(flops) / min(flops) > 10)
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if series:
        ax.legend()
    return save_png(fig, path)


def format_flops_axis(ax, log: bool = True) -> None:
    """FLOPs per sample on ``ax``'s x axis, ticks labelled 200K, 1.5M; on a log scale (minor ticks at 2 and 5) if ``log``."""
    if log:
        from matplotlib.ticker import LogLocator

        ax.set_xscale("log")
        ax.xaxis.set_minor_locator(LogLocator(subs=(2.0, 5.0)))
        ax.xaxis.set_minor_formatter(_tick_formatter())
    ax.xaxis.set_major_formatter(_tick_formatter())
    ax.set_xlabel("FLOPs per sample (MACs)")


def _tick_formatter():
    """Short tick labels: 200K, 1.5M."""
    from matplotlib.ticker import FuncFormatter

    def short(v, _pos):
        if not v or not math.isfinite(v):
            return "0"
        for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
            if abs(v) >= factor:
                return f"{v / factor:.3g}{prefix}"
        return f"{v:.3g}"

    return FuncFormatter(short)
