"""The benchmark's outputs from the run records on disk: ``results.json``, ``table.md``, ``accuracy_vs_flops.png``."""

from __future__ import annotations

import statistics
from dataclasses import asdict
from pathlib import Path

from methods.environment import environment
from methods.methods import METHODS
from methods.profiles import Profile
from pnp.core.io import read_json, write_json_atomic, write_text_atomic


def collect_records(out: Path, profile: Profile) -> tuple[list[dict], list[dict]]:
    """The run records under ``out`` of ``profile``'s models, methods, budgets and seeds: ``(done, not applicable)``."""
    wanted = {(e.model, e.dataset) for e in profile.entries}
    records = [
        r for r in (read_json(p) for p in sorted((out / "runs").glob("*/*.json")))
        if (r["model"], r["dataset"]) in wanted and r["method"] in profile.methods
        and any(abs(r["budget"] - b) < 1e-9 for b in profile.budgets) and r["seed"] in profile.seeds
    ]
    return [r for r in records if "not_applicable" not in r], [r for r in records if "not_applicable" in r]


def summarize(records: list[dict]) -> dict[tuple, dict]:
    """Per (model, dataset, budget, method): mean and std over seeds of accuracy, FLOPs kept and time."""
    cells: dict[tuple, list[dict]] = {}
    for r in records:
        cells.setdefault((r["model"], r["dataset"], round(r["budget"], 6), r["method"]), []).append(r)
    out = {}
    for key, rs in cells.items():
        acc = [r["accuracy"] for r in rs]
        out[key] = {
            "n": len(rs),
            "accuracy": statistics.fmean(acc),
            "accuracy_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
            "flops": statistics.fmean(r["flops"] for r in rs),
            "flops_kept": statistics.fmean(r["flops_kept"] for r in rs),
            "wall_s": statistics.fmean(r["wall_s"] for r in rs),
            "baseline_accuracy": statistics.fmean(r["baseline_accuracy"] for r in rs),
            "baseline_flops": rs[0]["baseline_flops"],
        }
    return out


def format_table(records: list[dict], methods: tuple[str, ...], skipped: list[dict], env: dict, profile_name: str) -> str:
    """Markdown: accuracy (mean ± std over seeds, best in bold) per model and budget, then each method's time."""
    summary = summarize(records)
    rows = sorted({(m, d, b) for (m, d, b, _) in summary})
    methods = [m for m in methods if any(k[3] == m for k in summary)] or list(methods)
    not_applicable = {(s["model"], s["dataset"], s["method"]) for s in skipped}
    lines = [
        f"# Pruning methods at equal FLOPs ({profile_name} profile)",
        "",
        f"torch {env.get('torch')}, torch-pruning {env.get('torch_pruning')}, {env.get('device')}, "
        f"commit {str(env.get('commit'))[:12]}" + (" (with uncommitted changes)." if env.get("uncommitted_changes") else "."),
        "Test accuracy (%) after the same fine-tuning, mean ± std over seeds (n = seeds); best of each row in bold.",
        "",
    ]
    labels = [METHODS[m].label for m in methods]
    header = ["model", "data", "FLOPs removed", "baseline", *labels, "FLOPs kept (measured)"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for model, dataset, budget in rows:
        cells = {m: summary.get((model, dataset, budget, m)) for m in methods}
        best = max((c["accuracy"] for c in cells.values() if c), default=None)
        any_cell = next(c for c in cells.values() if c)
        row = [model, dataset, f"{budget:.0%}", f"{any_cell['baseline_accuracy']:.2f}"]
        for m in methods:
            c = cells[m]
            if c is None:
                row.append("n/a" if (model, dataset, m) in not_applicable else "-")
                continue
            text = f"{c['accuracy']:.2f} ± {c['accuracy_std']:.2f} (n={c['n']})"
            row.append(f"**{text}**" if c["accuracy"] == best else text)
        kept = [c["flops_kept"] for c in cells.values() if c]
        row.append(f"{min(kept):.1%}–{max(kept):.1%}")
        lines.append("| " + " | ".join(row) + " |")
    lines += [
        "",
        "Seconds each method spent, mean over seeds: choosing channels (pruner or sparsity training, "
        "gradient passes) plus fine-tuning.",
        "",
    ]
    header = ["model", "data", "FLOPs removed", *labels]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for model, dataset, budget in rows:
        row = [model, dataset, f"{budget:.0%}"]
        for m in methods:
            c = summary.get((model, dataset, budget, m))
            row.append(_seconds(c["wall_s"]) if c else ("n/a" if (model, dataset, m) in not_applicable else "-"))
        lines.append("| " + " | ".join(row) + " |")
    reasons = sorted({(s["model"], s["method"], s["not_applicable"]) for s in skipped})
    if reasons:
        lines += ["", "n/a: " + "; ".join(f"{m} on {model}: {why}" for model, m, why in reasons)]
    return "\n".join(lines) + "\n"


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


def write_reports(profile: Profile, profile_name: str, out: Path, device: str) -> dict:
    """``results.json``, and with records ``table.md`` and ``accuracy_vs_flops.png``, from the run records under ``out``."""
    records, skipped = collect_records(out, profile)
    env = environment(device)
    results = {
        "profile": profile_name, "settings": asdict(profile), "environment": env,
        "records": records, "not_applicable": skipped,
    }
    write_json_atomic(out / "results.json", results)
    if records:
        table = format_table(records, profile.methods, skipped, env, profile_name)
        write_text_atomic(out / "table.md", table)
        plot_methods(records, profile.methods, out / "accuracy_vs_flops.png")
        print(table)
    print(f"wrote {out / 'results.json'}" + (", table.md and accuracy_vs_flops.png" if records else " (no runs yet)"))
    return results
