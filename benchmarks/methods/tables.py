"""The benchmark's outputs from the run records on disk: ``results.json``, ``table.md``, ``accuracy_vs_flops.png``.

Besides each method's mean ± std over seeds, the table says whether pnp is ahead of
the best criterion of each row: the difference paired by seed (each seed's methods
share one baseline), with a t-interval over seeds (95% unless ``--confidence`` says otherwise)
and the worst seed.
"""

from __future__ import annotations

import functools
import math
import statistics
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from methods.environment import environment
from methods.methods import METHODS
from methods.profiles import Profile
from pnp.core.io import read_json, write_json_atomic, write_text_atomic

PNP = "pnp"
# of the paired two-sided interval, unless a reading asks for another (``--confidence``)
CONFIDENCE = 0.95
# Student's t 0.975 quantiles (a two-sided 95% interval) for 1 to 30 degrees of freedom
T_975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
    2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)


def t_975(df: int) -> float:
    """Student's t 0.975 quantile for ``df`` degrees of freedom (beyond 30, its Cornish-Fisher expansion: within 1e-4)."""
    if df < 1:
        raise ValueError(f"df={df}: a t-interval needs at least 1 degree of freedom (2 paired seeds)")
    if df <= len(T_975):
        return T_975[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


@functools.lru_cache(maxsize=None)  # an interval is read several times per row; each root costs ~50k densities
def t_quantile(p: float, df: int) -> float:
    """Student's t ``p`` quantile (0.5 < p < 1) for ``df`` degrees of freedom: the table's for 0.975,
    otherwise the root of the t distribution's CDF (Simpson's rule on its density, then bisection; within 1e-4)."""
    if not 0.5 < p < 1:
        raise ValueError(f"p={p}: a two-sided interval needs a quantile between 0.5 and 1")
    if abs(p - 0.975) < 1e-12:
        return t_975(df)
    if df < 1:
        raise ValueError(f"df={df}: a t-interval needs at least 1 degree of freedom (2 paired seeds)")
    scale = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)

    def density(x: float) -> float:
        return scale * (1 + x * x / df) ** (-(df + 1) / 2)

    def cdf(x: float, steps: int = 2000) -> float:  # P(T <= x) for x >= 0
        h = x / steps
        total = density(0.0) + density(x) + sum(density(i * h) * (4 if i % 2 else 2) for i in range(1, steps))
        return 0.5 + total * h / 3

    low, high = 0.0, 1.0
    while cdf(high) < p:
        low, high = high, high * 2
    while high - low > 1e-6:
        mid = (low + high) / 2
        low, high = (mid, high) if cdf(mid) < p else (low, mid)
    return (low + high) / 2


def t_interval(values, confidence: float = CONFIDENCE) -> tuple[float, float] | None:
    """The mean of ``values`` ± t((1 + confidence) / 2, n-1) * sd / sqrt(n); None with fewer than two."""
    n = len(values)
    if n < 2:
        return None
    mean = statistics.fmean(values)
    half = t_quantile((1 + confidence) / 2, n - 1) * statistics.stdev(values) / math.sqrt(n)
    return mean - half, mean + half


@dataclass(frozen=True)
class PairedDifference:
    """``method`` minus ``rival`` in test accuracy, seed by seed: their mean, t-interval and the worst seed."""

    method: str
    rival: str
    seeds: tuple[int, ...]
    diffs: tuple[float, ...]  # percentage points, one per seed
    confidence: float = CONFIDENCE  # of the two-sided interval

    @property
    def n(self) -> int:
        return len(self.diffs)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.diffs)

    @property
    def interval(self) -> tuple[float, float] | None:
        """mean ± t((1 + confidence) / 2, n-1) * sd / sqrt(n); None with one seed."""
        return t_interval(self.diffs, self.confidence)

    @property
    def worst(self) -> float:
        return min(self.diffs)

    @property
    def verdict(self) -> str:
        """"ahead" when the whole interval is above 0, "behind" when below, "level" otherwise."""
        if self.interval is None:
            return "one seed"
        low, high = self.interval
        return "ahead" if low > 0 else "behind" if high < 0 else "level"

    def to_dict(self) -> dict:
        low, high = self.interval or (None, None)
        return {**asdict(self), "n": self.n, "mean": self.mean, "low": low, "high": high, "worst": self.worst,
                "verdict": self.verdict}


def paired_difference(records: list[dict], method: str, rival: str,
                      confidence: float = CONFIDENCE) -> PairedDifference | None:
    """``method`` minus ``rival`` over the seeds both have a record of (``records``: one model, dataset and budget)."""
    accuracy = {m: {r["seed"]: r["accuracy"] for r in records if r["method"] == m} for m in (method, rival)}
    seeds = tuple(sorted(set(accuracy[method]) & set(accuracy[rival])))
    if not seeds:
        return None
    return PairedDifference(method, rival, seeds, tuple(accuracy[method][s] - accuracy[rival][s] for s in seeds),
                            confidence)


def against_best(records: list[dict], method: str = PNP, confidence: float = CONFIDENCE) -> PairedDifference | None:
    """``method`` against the best criterion (highest mean accuracy) in ``records`` of one model, dataset and budget.

    The rivals are the criteria (``Method.criterion``): not pnp's other form, nor the control, which cuts nothing.
    """
    by_method: dict[str, list[float]] = {}
    for r in records:
        if METHODS[r["method"]].criterion is not None:
            by_method.setdefault(r["method"], []).append(r["accuracy"])
    if not by_method:
        return None
    best = max(by_method, key=lambda m: statistics.fmean(by_method[m]))
    return paired_difference(records, method, best, confidence)


def collect_records(out: Path, profile: Profile) -> tuple[list[dict], list[dict]]:
    """The run records under ``out`` of ``profile``'s models, methods, budgets and seeds: ``(done, not applicable)``.

    The control, which cuts nothing, has budget 0 and is kept whatever the budgets.
    """
    wanted = {(e.model, e.dataset) for e in profile.entries}
    records = [
        r for r in (read_json(p) for p in sorted((out / "runs").glob("*/*.json")))
        if (r["model"], r["dataset"]) in wanted and r["method"] in profile.methods
        and (not METHODS[r["method"]].prunes or any(abs(r["budget"] - b) < 1e-9 for b in profile.budgets))
        and r["seed"] in profile.seeds
    ]
    return [r for r in records if "not_applicable" not in r], [r for r in records if "not_applicable" in r]


def cells_of(records: list[dict]) -> dict[tuple, list[dict]]:
    """The records by (model, dataset, budget, method)."""
    cells: dict[tuple, list[dict]] = {}
    for r in records:
        cells.setdefault((r["model"], r["dataset"], round(r["budget"], 6), r["method"]), []).append(r)
    return cells


def summarize(records: list[dict]) -> dict[tuple, dict]:
    """Per (model, dataset, budget, method): mean and std over seeds of accuracy, FLOPs kept and time."""
    out = {}
    for key, rs in cells_of(records).items():
        acc = [r["accuracy"] for r in rs]
        out[key] = {
            "n": len(rs),
            "accuracy": statistics.fmean(acc),
            "accuracy_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
            "accuracy_pruned": statistics.fmean(r["accuracy_pruned"] for r in rs),
            "flops": statistics.fmean(r["flops"] for r in rs),
            "flops_kept": statistics.fmean(r["flops_kept"] for r in rs),
            "select_s": statistics.fmean(r["select_s"] for r in rs),
            "wall_s": statistics.fmean(r["wall_s"] for r in rs),
            "baseline_accuracy": statistics.fmean(r["baseline_accuracy"] for r in rs),
            "baseline_flops": rs[0]["baseline_flops"],
        }
    return out


def comparisons(records: list[dict], confidence: float = CONFIDENCE) -> dict[tuple, PairedDifference]:
    """pnp against the best criterion, per (model, dataset, budget) where both have records."""
    out = {}
    for row, rs in sorted(pruning_rows(records).items()):
        paired = against_best(rs, confidence=confidence) if any(r["method"] == PNP for r in rs) else None
        if paired is not None:
            out[row] = paired
    return out


@dataclass(frozen=True)
class CostRatio:
    """pnp's total time (choosing and fine-tuning) against the criteria's, in one model, dataset and budget.

    ``ratio`` is pnp's mean total over the criteria's mean total (the figure the cost bar reads);
    ``per_seed`` holds, for every seed with a pnp record and a criterion's, pnp's total over the
    mean of the criteria's totals on that seed, and ``interval`` their mean's t-interval: how
    far the timing noise of these machines leaves the ratio open.
    """

    ratio: float
    seeds: tuple[int, ...]
    per_seed: tuple[float, ...]
    confidence: float = CONFIDENCE

    @property
    def interval(self) -> tuple[float, float] | None:
        return t_interval(self.per_seed, self.confidence)

    def text(self) -> str:
        low_high = self.interval
        return f"×{self.ratio:.2f}" + (f" [{low_high[0]:.2f}, {low_high[1]:.2f}]" if low_high else "")

    def to_dict(self) -> dict:
        low, high = self.interval or (None, None)
        return {**asdict(self), "low": low, "high": high}


def cost_ratio(records: list[dict], confidence: float = CONFIDENCE) -> CostRatio | None:
    """pnp's cost against the criteria (``records``: one model, dataset and budget); None without both."""
    ours = {r["seed"]: r["wall_s"] for r in records if r["method"] == PNP}
    theirs: dict[int, list[float]] = {}
    for r in records:
        if METHODS[r["method"]].criterion is not None:
            theirs.setdefault(r["seed"], []).append(r["wall_s"])
    if not ours or not theirs:
        return None
    ratio = statistics.fmean(ours.values()) / statistics.fmean(t for ts in theirs.values() for t in ts)
    seeds = tuple(sorted(set(ours) & set(theirs)))
    return CostRatio(ratio, seeds, tuple(ours[s] / statistics.fmean(theirs[s]) for s in seeds), confidence)


def costs(records: list[dict], confidence: float = CONFIDENCE) -> dict[tuple, CostRatio]:
    """pnp's cost against the criteria, per (model, dataset, budget) where both have records."""
    out = {}
    for row, rs in sorted(pruning_rows(records).items()):
        cost = cost_ratio(rs, confidence)
        if cost is not None:
            out[row] = cost
    return out


def pruning_rows(records: list[dict]) -> dict[tuple, list[dict]]:
    """The records of methods that cut, per (model, dataset, budget)."""
    rows: dict[tuple, list[dict]] = {}
    for (model, dataset, budget, method), rs in cells_of(records).items():
        if METHODS[method].prunes:
            rows.setdefault((model, dataset, budget), []).extend(rs)
    return rows


def made_at(records: list[dict]) -> str:
    """The commits the runs were made at, from their records (``code``, which older records lack)."""
    codes = [r.get("code") or {} for r in records]
    commits = Counter(c["commit"][:12] for c in codes if c.get("commit"))
    dirty = sum(bool(c.get("uncommitted_changes")) for c in codes if c.get("commit"))
    unnamed = len(codes) - sum(commits.values())
    parts = []
    if commits:
        parts.append("Runs made at commit " + ", ".join(f"{c} ({_runs(n)})" for c, n in commits.most_common())
                     + (f", {dirty} of them with uncommitted changes" if dirty else ""))
    if unnamed:
        parts.append(f"{_runs(unnamed)} with no commit recorded")
    return "; ".join(parts) + "." if parts else ""


def _runs(n: int) -> str:
    return f"{n} run" + ("s" if n != 1 else "")


def format_table(records: list[dict], methods: tuple[str, ...], skipped: list[dict], env: dict, profile_name: str,
                 confidence: float = CONFIDENCE) -> str:
    """Markdown: accuracy (mean ± std over seeds), pnp's paired difference to the best criterion,
    accuracy before fine-tuning, and each method's time."""
    summary = summarize(records)
    present = [m for m in methods if any(k[3] == m for k in summary)] or list(methods)
    pruning = [m for m in present if METHODS[m].prunes]
    controls = [m for m in present if not METHODS[m].prunes]
    rows = sorted({k[:3] for k in summary if METHODS[k[3]].prunes})
    panels = {r[:2] for r in rows}
    rows += sorted({k[:3] for k in summary if k[:2] not in panels})  # models with only a control
    not_applicable = {(s["model"], s["dataset"], s["method"]) for s in skipped}

    def cell(model, dataset, budget, method) -> dict | None:
        return summary.get((model, dataset, budget if METHODS[method].prunes else 0.0, method))

    def missing(model, dataset, method) -> str:
        return "n/a" if (model, dataset, method) in not_applicable else "-"

    def table(header: list[str], body: list[list[str]]) -> list[str]:
        return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in body)]

    def labels(ms) -> list[str]:
        return [METHODS[m].label for m in ms]

    runs_made_at = made_at(records)
    lines = [
        f"# Pruning methods at equal FLOPs ({profile_name} profile)",
        "",
        f"torch {env.get('torch')}, torch-pruning {env.get('torch_pruning')}, {env.get('device')}, "
        f"reported at commit {str(env.get('commit'))[:12]}" + (" (with uncommitted changes)." if env.get("uncommitted_changes") else ".")
        + (f" {runs_made_at}" if runs_made_at else ""),
        "Test accuracy (%) after the same fine-tuning, mean ± std over seeds (n = seeds); best of each row in bold."
        + (" The control is the baseline fine-tuned by the same schedule, nothing cut." if controls else ""),
        "",
    ]
    body = []
    for model, dataset, budget in rows:
        cells = {m: cell(model, dataset, budget, m) for m in present}
        best = max((cells[m]["accuracy"] for m in pruning if cells[m]), default=None)
        any_cell = next(c for c in cells.values() if c)
        row = [model, dataset, f"{budget:.0%}", f"{any_cell['baseline_accuracy']:.2f}"]
        for m in controls + pruning:
            c = cells[m]
            if c is None:
                row.append(missing(model, dataset, m))
                continue
            text = f"{c['accuracy']:.2f} ± {c['accuracy_std']:.2f} (n={c['n']})"
            row.append(f"**{text}**" if METHODS[m].prunes and c["accuracy"] == best else text)
        kept = [cells[m]["flops_kept"] for m in pruning if cells[m]]
        row.append(f"{min(kept):.1%}–{max(kept):.1%}" if kept else "100%")
        body.append(row)
    lines += table(["model", "data", "FLOPs removed", "baseline", *labels(controls + pruning), "FLOPs kept (measured)"],
                   body)

    paired = comparisons(records, confidence)
    level = f"{100 * confidence:g}%"
    if paired:
        lines += [
            "",
            "pnp against the best criterion of each row (highest mean; pnp's other form and the control left out), "
            f"paired by seed: the mean of pnp − best over seeds with its {level} t-interval "
            f"(mean ± t({(1 + confidence) / 2:g}, n−1)·sd/√n), "
            "the worst seed's difference (points), and **ahead** only when the whole interval is above 0, "
            "**behind** when below it, level otherwise.",
            "",
        ]
        body = []
        for (model, dataset, budget), p in paired.items():
            interval = "[{}, {}]".format(*map(_bound, p.interval)) if p.interval else "(one seed)"
            verdict = p.verdict if p.verdict in ("level", "one seed") else f"**{p.verdict}**"
            body.append([model, dataset, f"{budget:.0%}", METHODS[p.rival].label, str(p.n), f"{p.mean:+.2f} {interval}",
                         f"{p.worst:+.2f}", verdict])
        lines += table(["model", "data", "FLOPs removed", "best criterion", "n", f"pnp − best, mean [{level} CI]",
                        "worst seed", "verdict"], body)

    lines += ["", "Test accuracy (%) before fine-tuning (the model as surgery cut it), mean over seeds; best of each "
              "row in bold.", ""]
    body = []
    for model, dataset, budget in rows:
        if budget == 0.0 and (model, dataset) not in panels:
            continue
        cells = {m: cell(model, dataset, budget, m) for m in pruning}
        best = max((c["accuracy_pruned"] for c in cells.values() if c), default=None)
        row = [model, dataset, f"{budget:.0%}"]
        for m, c in cells.items():
            text = f"{c['accuracy_pruned']:.2f}" if c else missing(model, dataset, m)
            row.append(f"**{text}**" if c and c["accuracy_pruned"] == best else text)
        body.append(row)
    lines += table(["model", "data", "FLOPs removed", *labels(pruning)], body)

    criteria = [m for m in pruning if METHODS[m].criterion is not None]
    ratio = PNP in pruning and bool(criteria)
    row_costs = costs(records, confidence)
    lines += [
        "",
        "Seconds each method spent, mean over seeds: choosing channels (pruner or sparsity training, gradient passes, "
        "look-ahead, surgery) / in all, with fine-tuning" + ("; the control only fine-tunes" if controls else "")
        + (f"; pnp's total as a multiple of the criteria's mean total, with the {confidence:.1%} t-interval of "
           "that multiple taken seed by seed (pnp's total over the criteria's on the same seed): the timing noise."
           if ratio else "."),
        "",
    ]
    body = []
    for model, dataset, budget in rows:
        row = [model, dataset, f"{budget:.0%}"]
        for m in controls + pruning:
            c = cell(model, dataset, budget, m)
            row.append(f"{_seconds(c['select_s'])} / {_seconds(c['wall_s'])}" if c else missing(model, dataset, m))
        if ratio:
            cost = row_costs.get((model, dataset, budget))
            row.append(cost.text() if cost else "-")
        body.append(row)
    lines += table(["model", "data", "FLOPs removed", *labels(controls + pruning), *(["pnp ÷ criteria"] if ratio else [])],
                   body)
    reasons = sorted({(s["model"], s["method"], s["not_applicable"]) for s in skipped})
    if reasons:
        lines += ["", "n/a: " + "; ".join(f"{m} on {model}: {why}" for model, m, why in reasons)]
    return "\n".join(lines) + "\n"


def _bound(value: float) -> str:
    """An interval's end in points, to 2 decimals; a nonzero end that would print as ±0.00 gets the
    decimals its first digit needs (at most 4), so the sign that decides the verdict shows."""
    for decimals in (2, 3, 4):
        text = f"{value:+.{decimals}f}"
        if value == 0 or text.strip("+-0."):  # a digit other than 0 shows
            break
    return text


def _seconds(value: float) -> str:
    return f"{value:.0f}" if value >= 10 else f"{value:.1f}"


def plot_methods(records: list[dict], methods: tuple[str, ...], path: Path) -> Path:
    """Accuracy against FLOPs, one panel per model and dataset, one line per method, baseline as a star."""
    from pnp.training.report import format_flops_axis, new_figure, save_png

    summary = summarize(records)
    panels = sorted({(m, d) for (m, d, _, _) in summary})
    fig = new_figure(5.2 * len(panels), 4.2)
    for i, (model, dataset) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        base = None
        for m in methods:
            cells = [c for k, c in summary.items() if k[:2] == (model, dataset) and k[3] == m]
            if not cells:
                continue
            cells.sort(key=lambda c: c["flops"])
            base = cells[0]
            ax.errorbar([c["flops"] for c in cells], [c["accuracy"] for c in cells],
                        yerr=[c["accuracy_std"] for c in cells], marker="o", capsize=3, label=METHODS[m].label)
        if base is not None:
            ax.plot([base["baseline_flops"]], [base["baseline_accuracy"]], marker="*", markersize=12, color="black",
                    linestyle="none", label="baseline")
        format_flops_axis(ax)
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{model} on {dataset}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    return save_png(fig, path)


def write_reports(profile: Profile, profile_name: str, out: Path, device: str, confidence: float = CONFIDENCE) -> dict:
    """``results.json``, and with records ``table.md`` and ``accuracy_vs_flops.png``, from the run records under ``out``.

    ``confidence``: of the paired intervals (0.95; e.g. 0.975 for a second look at a question already read).
    """
    records, skipped = collect_records(out, profile)
    env = environment(device)
    paired = [{"model": m, "dataset": d, "budget": b, **p.to_dict()}
              for (m, d, b), p in comparisons(records, confidence).items()]
    cost = [{"model": m, "dataset": d, "budget": b, **c.to_dict()} for (m, d, b), c in costs(records, confidence).items()]
    results = {
        "profile": profile_name, "settings": asdict(profile), "environment": env,
        "records": records, "not_applicable": skipped, "pnp_against_best": paired, "pnp_cost": cost,
    }
    write_json_atomic(out / "results.json", results)
    if records:
        table = format_table(records, profile.methods, skipped, env, profile_name, confidence)
        write_text_atomic(out / "table.md", table)
        plot_methods(records, profile.methods, out / "accuracy_vs_flops.png")
        print(table)
    print(f"wrote {out / 'results.json'}" + (", table.md and accuracy_vs_flops.png" if records else " (no runs yet)"))
    return results
