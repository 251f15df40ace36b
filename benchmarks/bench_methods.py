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
    python benchmarks/bench_methods.py --profile standard --models resnet20 --seeds 0 1 --jobs 2  # a process a seed
    python benchmarks/bench_methods.py --profile full --device cuda --cifar10-root DIR
    python benchmarks/bench_methods.py --models lenet5 --methods pnp l1 --budgets 0.7 --seeds 0
    python benchmarks/bench_methods.py --set resnet20:finetune.epochs=3 --set report.latency_repeats=20
    python benchmarks/bench_methods.py --profile standard --report-only --out DIR --confidence 0.975  # a second look

``--set`` takes an OmegaConf dotlist item of the recipe (``KEY=VALUE`` for every model,
``MODEL:KEY=VALUE`` for one), or of ``slim.*`` (Network Slimming's sparsity training).
Writes, under --out: each run's stages (``stages/``: a finished stage is reused, an
interrupted one resumes, one with other settings is refused), one record per run
(``runs/<model>-<dataset>/<method>-r<removed %>-s<seed>.json``), ``results.json`` (every
record, the machine, the commit, pnp's paired differences), ``table.md`` (mean ± std over
seeds; pnp against the best criterion, paired by seed, with a 95% interval, or
``--confidence``'s; accuracy before fine-tuning; times) and ``accuracy_vs_flops.png``.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the methods package beside this file

from methods.methods import METHODS  # noqa: E402
from methods.profiles import PROFILES  # noqa: E402
from methods.runner import BenchmarkError, Options, resolve, run_benchmark  # noqa: E402
from methods.tables import CONFIDENCE, write_reports  # noqa: E402
from pnp.training.runs import RESUME_HINT, interrupted_status, interrupts_recorded, script_main  # noqa: E402

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
    parser.add_argument("--confidence", type=float, default=CONFIDENCE,
                        help="of pnp's paired interval against the best criterion (0.95; e.g. 0.975 for a second "
                             "look at seeds already read)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="run the seeds in this many processes side by side, each with its share of the CPU "
                             "threads unless OMP_NUM_THREADS is set; the reports are written once all have ended")
    parser.add_argument("--no-reports", action="store_true", help=argparse.SUPPRESS)  # a --jobs worker: its parent reports
    return parser.parse_args(argv)


def worker_commands(args: argparse.Namespace, seeds: list[int]) -> list[list[str]]:
    """One command per process of ``--jobs``: this command for its share of ``seeds``, dealt in turn."""
    common = [sys.executable, str(Path(__file__).resolve()), "--profile", args.profile, "--out", str(args.out),
              "--device", args.device, "--no-reports"]
    for flag, values in (("--models", args.models), ("--methods", args.methods), ("--budgets", args.budgets)):
        if values:
            common += [flag, *map(str, values)]
    for flag, path in (("--data-root", args.data_root), ("--cifar10-root", args.cifar10_root)):
        if path is not None:
            common += [flag, str(path)]
    common += [a for item in args.set for a in ("--set", item)]
    shares = [seeds[i::args.jobs] for i in range(min(args.jobs, len(seeds)))]
    return [common + ["--seeds", *map(str, share)] for share in shares]


def run_here(bench, options: Options) -> int:
    """Run the benchmark in this process; 0, or 130/143 when a signal stopped it (its stage wrote its resume point)."""
    interrupted: list[int] = []
    try:
        with interrupts_recorded(interrupted):  # SIGTERM too: the stage writes its resume point
            run_benchmark(bench, options)
    except (KeyboardInterrupt, SystemExit):
        if not interrupted:
            raise
        return interrupted_status(interrupted)
    return 0


def run_in_processes(commands: list[list[str]]) -> int:
    """Run ``commands`` side by side; the worst exit status, or 130/143 when interrupted.

    Each worker has a session of its own, so a Ctrl-C reaches it once, forwarded from here
    (a second would cut short the resume point its stage is writing).
    """
    env = dict(os.environ)
    if "OMP_NUM_THREADS" not in env:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        env["OMP_NUM_THREADS"] = str(max(1, cores // len(commands)))
    workers: list[subprocess.Popen] = []
    interrupted: list[int] = []
    told: set[int] = set()  # workers already sent the signal

    def forward(signum=None, frame=None):
        if signum is not None:
            interrupted.append(signum)
        for worker in workers:
            if interrupted and worker.pid not in told and worker.poll() is None:
                told.add(worker.pid)
                worker.send_signal(interrupted[0])

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        for command in commands:
            workers.append(subprocess.Popen(command, env=env, start_new_session=True))
            forward()  # a signal that came while the workers started
        statuses = [w.wait() for w in workers]
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if interrupted:
        return interrupted_status(interrupted)
    return max(statuses, key=lambda status: (status != 0, abs(status)))


def main(argv=None) -> dict:
    import logging

    import torch

    for name in ("pytorch_lightning", "lightning_fabric"):  # one line per run is the benchmark's progress report
        logging.getLogger(name).setLevel(logging.WARNING)
    args = parse_args(argv)
    options = Options(args.out, args.device, {"fashion_mnist": args.data_root, "cifar10": args.cifar10_root})
    try:
        if args.jobs < 1:
            raise BenchmarkError(f"--jobs {args.jobs}: must be at least 1 (the number of processes side by side)")
        if not 0 < args.confidence < 1:
            raise BenchmarkError(f"--confidence {args.confidence}: must be between 0 and 1, "
                                 "e.g. 0.95 for a 95% interval")
        if args.device == "cuda" and not torch.cuda.is_available():
            raise BenchmarkError("--device cuda, but torch sees no CUDA device; use --device cpu")
        bench = resolve(PROFILES[args.profile], args.set, options, models=args.models, methods=args.methods,
                        budgets=args.budgets, seeds=args.seeds)
        status = 0
        if not args.report_only:
            status = run_in_processes(worker_commands(args, list(bench.profile.seeds))) if args.jobs > 1 \
                else run_here(bench, options)
            if status in (130, 143):
                print(f"bench_methods: {RESUME_HINT}", file=sys.stderr, flush=True)
                sys.exit(status)
        if args.no_reports:
            return {}
        results = write_reports(bench.profile, args.profile, args.out, args.device, args.confidence)
        if status:
            print(f"bench_methods: a worker process failed (exit status {status}); its output is above. "
                  "The reports hold the runs that finished", file=sys.stderr, flush=True)
            sys.exit(1)
        return results
    except BenchmarkError as exc:
        raise SystemExit(f"bench_methods: {exc}") from None


if __name__ == "__main__":
    script_main(main)  # bad input: its message, status 2
