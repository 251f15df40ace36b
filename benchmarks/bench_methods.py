"""Pruning methods compared at the same FLOPs: accuracy, cost, and the time each takes.

For each model: one baseline per seed, then for every method and budget (fraction
of FLOPs removed) the channels the method chooses, cut by the same surgery to the
same FLOPs (each method's ranking read out by the recipe's ``readout`` section:
thresholded by bisection to the budget, then filled with the best-ranked channels
that fit), fine-tuned by the same schedule and evaluated the same way. Every stage
is the product's own (``pnp.cli.stages``, what ``pnp-pipeline`` runs) with the shipped
recipe (``configs/pipeline.yaml``); a profile (``benchmarks/methods/profiles.py``) only
overrides it. The methods are listed in ``benchmarks/methods/methods.py``; the control
among them fine-tunes the baseline by the same schedule, nothing cut, once per model and seed.

    python benchmarks/bench_methods.py --profile quick                  # CPU, about an hour on 2 cores
    python benchmarks/bench_methods.py --profile standard --models resnet20 --seeds 0  # CPU, in parts
    python benchmarks/bench_methods.py --profile full --device cuda --cifar10-root DIR
    python benchmarks/bench_methods.py --models lenet5 --methods pnp l1 --budgets 0.7 --seeds 0
    python benchmarks/bench_methods.py --set resnet20:finetune.epochs=3 --set report.latency_repeats=20

``--set`` takes an OmegaConf dotlist item of the recipe (``KEY=VALUE`` for every model,
``MODEL:KEY=VALUE`` for one), or of ``slim.*`` (Network Slimming's sparsity training).
Writes, under --out: each run's stages (``stages/``: a finished stage is reused, an
interrupted one resumes, one with other settings is refused), one record per run
(``runs/<model>-<dataset>/<method>-r<removed %>-s<seed>.json``), ``results.json`` (every
record, the machine, the commit, pnp's paired differences), ``table.md`` (mean ± std over
seeds; pnp against the best criterion, paired by seed, with a 95% interval; accuracy before
fine-tuning; times) and ``accuracy_vs_flops.png``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the methods package beside this file

from methods.methods import METHODS  # noqa: E402
from methods.profiles import PROFILES  # noqa: E402
from methods.runner import BenchmarkError, Options, resolve, run_benchmark  # noqa: E402
from methods.tables import write_reports  # noqa: E402
from pnp.training.runs import RESUME_HINT, interrupted_status, interrupts_recorded  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results" / "methods"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="quick", choices=sorted(PROFILES))
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    parser.add_argument("--models", nargs="+", help="only these models (e.g. lenet5 resnet20)")
    parser.add_argument("--methods", nargs="+", help=f"only these methods, of {list(METHODS)}")
    parser.add_argument("--budgets", nargs="+", type=float, help="fractions of FLOPs removed, e.g. 0.5 0.7")
    parser.add_argument("--seeds", nargs="+", type=int)
    parser.add_argument("--data-root", type=Path, help="Fashion-MNIST folder; default: the usual places")
    parser.add_argument("--cifar10-root", type=Path, help="CIFAR-10 python batches; without it, CIFAR-10 is skipped")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--set", action="append", default=[], metavar="[MODEL:]KEY=VALUE",
                        help="override the recipe, e.g. finetune.epochs=3 or resnet20:train.lr=0.05")
    parser.add_argument("--report-only", action="store_true", help="only rebuild results.json, table.md and the plot")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    import logging

    import torch

    for name in ("pytorch_lightning", "lightning_fabric"):  # one line per run is the benchmark's progress report
        logging.getLogger(name).setLevel(logging.WARNING)
    args = parse_args(argv)
    options = Options(args.out, args.device, {"fashion_mnist": args.data_root, "cifar10": args.cifar10_root})
    try:
        if args.device == "cuda" and not torch.cuda.is_available():
            raise BenchmarkError("--device cuda, but torch sees no CUDA device; use --device cpu")
        bench = resolve(PROFILES[args.profile], args.set, options, models=args.models, methods=args.methods,
                        budgets=args.budgets, seeds=args.seeds)
        if not args.report_only:
            interrupted: list[int] = []
            try:
                with interrupts_recorded(interrupted):  # SIGTERM too: the stage writes its resume point
                    run_benchmark(bench, options)
            except (KeyboardInterrupt, SystemExit):
                if not interrupted:
                    raise
                print(f"bench_methods: {RESUME_HINT}", file=sys.stderr, flush=True)
                sys.exit(interrupted_status(interrupted))
        return write_reports(bench.profile, args.profile, args.out, args.device)
    except BenchmarkError as exc:
        raise SystemExit(f"bench_methods: {exc}") from None


if __name__ == "__main__":
    main()
