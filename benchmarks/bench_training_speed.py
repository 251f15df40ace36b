"""Training speed: channels-last against the usual layout, and distillation from fixed teacher outputs.

For each pnp model (random init, Fashion-MNIST-shaped batches ``[B, 1, 28, 28]``
or ``--channels 3``) this times full SGD training steps (forward, backward,
optimizer) in the usual contiguous layout and in channels-last layout, a
distilled fine-tuning step of LeNet-5 pruned to 10% of its FLOPs with the teacher
run live against its logits given, and each model's pruner step (batch-mode
decisions, budget 0.1) with the pruner seeing the whole batch against its first
``--pruner-input-samples`` images (``pruner.input_samples``), both beside the
model's own channels-last training step. Every variant is timed in ``--rounds``
interleaved rounds, so that the ratios compare figures taken side by side on a
noisy machine; the median of the rounds is reported.

    python benchmarks/bench_training_speed.py                 # 2 threads, batch 128
    python benchmarks/bench_training_speed.py --threads 1 --models lenet5 resnet20

Prints a table and writes JSON (``benchmarks/results/training_speed.json`` unless ``--out``).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from pnp.core.gating import GatedModel
from pnp.core.groups import find_channel_groups
from pnp.core.io import write_text_atomic
from pnp.core.losses import PrunerLoss, kd_loss
from pnp.core.pruner import PrunerNetwork
from pnp.core.task import ClassificationTask, pruner_terms
from pnp.models import lenet5, mobilenetv2, resnet20, resnet56

MODELS = {"lenet5": lenet5, "resnet20": resnet20, "resnet56": resnet56, "mobilenetv2": mobilenetv2}
CL = torch.channels_last


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["lenet5", "resnet20", "mobilenetv2"], choices=sorted(MODELS))
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--channels", type=int, default=1, help="input channels (1: Fashion-MNIST, 3: CIFAR-like)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--pruner-input-samples", type=int, default=32,
                        help="images the sub-batch pruner decides from (pruner.input_samples)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "training_speed.json")
    return parser.parse_args(argv)


def train_step(model: nn.Module, optimizer, x, y, teacher: nn.Module | None = None, teacher_logits=None) -> None:
    optimizer.zero_grad(set_to_none=True)
    logits = model(x)
    loss = F.cross_entropy(logits, y)
    if teacher is not None or teacher_logits is not None:
        if teacher_logits is None:
            with torch.no_grad():
                teacher_logits = teacher(x)
        loss = loss + kd_loss(logits, teacher_logits, 4.0)
    loss.backward()
    optimizer.step()


def timed(step, steps: int) -> float:
    """Seconds per step over ``steps`` steps (after two untimed ones)."""
    for _ in range(2):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def layout_variants(name: str, args) -> dict:
    """One model's step in each layout: closures over their own model, optimizer and batch."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch_size, args.channels, 28, 28, generator=g)
    y = torch.randint(0, 10, (args.batch_size,), generator=g)
    variants = {}
    for layout in ("contiguous", "channels_last"):
        torch.manual_seed(0)
        model = MODELS[name](in_channels=args.channels)
        xs = x
        if layout == "channels_last":
            model = model.to(memory_format=CL)
            xs = x.contiguous(memory_format=CL)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        variants[layout] = lambda m=model, o=optimizer, xs=xs: train_step(m, o, xs, y)
    return variants


def distillation_variants(args) -> dict:
    """LeNet-5's 10%-FLOPs student (5, 12, 268 channels, as the main job keeps), distilled live or from given logits."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch_size, args.channels, 28, 28, generator=g).contiguous(memory_format=CL)
    y = torch.randint(0, 10, (args.batch_size,), generator=g)
    teacher = lenet5(in_channels=args.channels).eval().to(memory_format=CL)
    with torch.no_grad():
        given = teacher(x)
    variants = {}
    for how in ("teacher every step", "teacher outputs given"):
        torch.manual_seed(0)
        student = nn.Sequential(
            nn.Conv2d(args.channels, 5, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(5, 12, 5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(12 * 16, 268), nn.ReLU(), nn.Linear(268, 10),
        ).to(memory_format=CL)
        optimizer = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9)
        if how == "teacher every step":
            variants[how] = lambda s=student, o=optimizer: train_step(s, o, x, y, teacher=teacher)
        else:
            variants[how] = lambda s=student, o=optimizer: train_step(s, o, x, y, teacher_logits=given)
    return variants


def pruner_variants(name: str, args) -> dict:
    """One model's pruner step (pnp.core.task.pruner_terms, Adam) deciding from the whole batch or its first images;
    and the model's own training step beside them."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch_size, args.channels, 28, 28, generator=g).contiguous(memory_format=CL)
    y = torch.randint(0, 10, (args.batch_size,), generator=g)
    torch.manual_seed(0)
    target = MODELS[name](in_channels=args.channels).eval()
    groups = find_channel_groups(target, x[:1].contiguous())
    task = ClassificationTask(x[:1].contiguous())
    variants = {}
    for label, samples in (("whole batch", None), (f"first {args.pruner_input_samples}", args.pruner_input_samples)):
        torch.manual_seed(0)
        pruner = PrunerNetwork(target, groups, mask_mode="batch", input_samples=samples).to(memory_format=CL).train()
        gate = GatedModel(copy.deepcopy(target).to(memory_format=CL), groups, freeze=True)
        objective = PrunerLoss(groups, sparsity_weight=0.0, budget=0.1, budget_weight=1.0)
        optimizer = torch.optim.Adam(pruner.param_groups(1e-3))

        def step(p=pruner, gate=gate, objective=objective, o=optimizer):
            o.zero_grad(set_to_none=True)
            pruner_terms(task, gate.target, gate, p, objective, (x, y))["loss"].backward()
            o.step()

        variants[label] = step
    torch.manual_seed(0)
    model = MODELS[name](in_channels=args.channels).to(memory_format=CL)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    variants["training step"] = lambda: train_step(model, optimizer, x, y)
    return variants


def measure(variants: dict, args) -> dict:
    times = {k: [] for k in variants}
    for _ in range(args.rounds):
        for key, step in variants.items():
            times[key].append(timed(step, args.steps))
    return {k: {"ms_per_step": 1e3 * statistics.median(v), "images_per_s": args.batch_size / statistics.median(v),
                "rounds_ms": [1e3 * t for t in v]} for k, v in times.items()}


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    rows = {}
    for name in args.models:
        result = measure(layout_variants(name, args), args)
        result["speedup"] = result["contiguous"]["ms_per_step"] / result["channels_last"]["ms_per_step"]
        rows[name] = result
        print(f"{name:12s} contiguous {result['contiguous']['ms_per_step']:8.1f} ms/step   channels-last "
              f"{result['channels_last']['ms_per_step']:8.1f} ms/step   x{result['speedup']:.2f}", flush=True)
    kd = measure(distillation_variants(args), args)
    kd["speedup"] = kd["teacher every step"]["ms_per_step"] / kd["teacher outputs given"]["ms_per_step"]
    print(f"{'distillation':12s} teacher every step {kd['teacher every step']['ms_per_step']:.1f} ms/step   "
          f"outputs given {kd['teacher outputs given']['ms_per_step']:.1f} ms/step   x{kd['speedup']:.2f}")
    pruner_rows = {}
    sub = f"first {args.pruner_input_samples}"
    for name in args.models:
        result = measure(pruner_variants(name, args), args)
        result["speedup"] = result["whole batch"]["ms_per_step"] / result[sub]["ms_per_step"]
        pruner_rows[name] = result
        train = result["training step"]["ms_per_step"]
        print(f"{name:12s} pruner step: whole batch {result['whole batch']['ms_per_step']:8.1f} ms "
              f"({result['whole batch']['ms_per_step'] / train:.2f} training steps)   {sub} "
              f"{result[sub]['ms_per_step']:8.1f} ms ({result[sub]['ms_per_step'] / train:.2f})   x{result['speedup']:.2f}",
              flush=True)
    record = {
        "layouts": rows,
        "distillation_lenet5_student": kd,
        "pruner_steps": pruner_rows, "pruner_input_samples": args.pruner_input_samples,
        "batch_size": args.batch_size, "channels": args.channels, "threads": args.threads,
        "steps": args.steps, "rounds": args.rounds,
        "torch": torch.__version__, "machine": platform.machine(), "processor": platform.processor(),
        "cpu_count": os.cpu_count(), "load_before": load_before, "load_after": os.getloadavg(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out, json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
