"""Model coverage: which timm models pnp prunes exactly, how much of each, and what Torch-Pruning does beside it.

For each model of the zoo (untrained, built with pnp's ``timm:`` builder, eval mode, random
norm statistics and random values for every parameter a fresh model holds constant: zero
biases, layer scales of 1e-6, zero-init gains hide channel mix-ups), on a batch of 2 images:

1. pnp: ``find_channel_groups(prove=True)`` and ``apply_surgery(verify=True)`` with a random
   half of every group kept (legalised), both timed; the pruned model's output against the
   gated model's (relative error: max abs difference / max abs output); save and reload
   with ``save_pruned``/``load_pruned`` and compare. Also: the share of conv/linear output
   channels (classifier excluded) that lie in a group, and why groups were left out.
2. Torch-Pruning: ``MetaPruner`` with ``MagnitudeImportance(p=1)``, ``pruning_ratio=0.5``,
   the classifier ignored, local pruning, whole heads (``num_heads``, half of them) for
   timm-style attention layers; ``step()`` and a forward pass.

Each model runs in its own process, each of the two parts under ``--timeout`` seconds, so a
crash or a slow model is recorded in its row and the table goes on.

    OMP_NUM_THREADS=1 python benchmarks/model_coverage.py              # the whole zoo, 15-25 min on 1 core
    OMP_NUM_THREADS=1 python benchmarks/model_coverage.py --models resnet18 vit_tiny_patch16_224
    OMP_NUM_THREADS=1 python benchmarks/model_coverage.py --update --models ghostnet_100   # after a fix

Writes ``results.json`` and ``table.md`` (``benchmarks/results/model_coverage/`` unless
``--out``) and prints the table.
"""

from __future__ import annotations

import argparse
import copy
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "benchmarks"))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from pnp.core.io import read_json, write_json_atomic, write_text_atomic  # noqa: E402
from pnp.training.runs import script_main  # noqa: E402

OUT = REPO / "benchmarks" / "results" / "model_coverage" / "results.json"
EXACT = 1e-4  # relative error below which the pruned model counts as computing the gated model


@dataclass(frozen=True)
class ZooModel:
    family: str
    kind: str  # "CNN", "transformer" (attention or token-mixing MLP on tokens) or "hybrid"
    size: int = 64  # image side; the smallest tried (64, 96, ..., 224) that the model runs at


ZOO = {
    "resnet18": ZooModel("ResNet", "CNN"),
    "resnet50d": ZooModel("ResNet-D", "CNN"),
    "seresnext26d_32x4d": ZooModel("SE-ResNeXt", "CNN"),
    "res2net50_14w_8s": ZooModel("Res2Net", "CNN"),
    "nf_resnet26": ZooModel("NF-ResNet", "CNN"),
    "cspdarknet53": ZooModel("CSPDarkNet", "CNN"),
    "dla34": ZooModel("DLA", "CNN"),
    "hrnet_w18_small": ZooModel("HRNet", "CNN"),
    "dpn68": ZooModel("DPN", "CNN"),
    "densenet121": ZooModel("DenseNet", "CNN"),
    "inception_v3": ZooModel("Inception", "CNN", 96),
    "xception41": ZooModel("Xception", "CNN"),
    "ese_vovnet19b_dw": ZooModel("VoVNet", "CNN"),
    "repvgg_a0": ZooModel("RepVGG", "CNN"),
    "regnetx_002": ZooModel("RegNetX", "CNN"),
    "regnety_002": ZooModel("RegNetY", "CNN"),
    "ghostnet_100": ZooModel("GhostNet", "CNN"),
    "efficientnet_b0": ZooModel("EfficientNet", "CNN"),
    "efficientnetv2_rw_t": ZooModel("EfficientNetV2", "CNN"),
    "mixnet_s": ZooModel("MixNet", "CNN"),
    "mobilenetv3_small_100": ZooModel("MobileNetV3", "CNN"),
    "mobilenetv4_conv_small": ZooModel("MobileNetV4", "CNN"),
    "lcnet_050": ZooModel("LCNet", "CNN"),
    "rexnet_100": ZooModel("ReXNet", "CNN"),
    "convnext_atto": ZooModel("ConvNeXt", "CNN"),
    "poolformer_s12": ZooModel("PoolFormer", "CNN"),
    "vit_tiny_patch16_224": ZooModel("ViT", "transformer"),
    "deit_tiny_patch16_224": ZooModel("DeiT", "transformer"),
    "pit_ti_224": ZooModel("PiT", "transformer"),
    "swin_tiny_patch4_window7_224": ZooModel("Swin", "transformer"),
    "pvt_v2_b0": ZooModel("PVTv2", "transformer"),
    "coat_lite_tiny": ZooModel("CoaT-Lite", "transformer"),
    "resmlp_12_224": ZooModel("ResMLP", "transformer"),
    "levit_128s": ZooModel("LeViT", "hybrid"),
    "efficientformer_l1": ZooModel("EfficientFormer", "hybrid", 224),  # attention biases are fixed to 7x7 tokens
    "mobilevit_xxs": ZooModel("MobileViT", "hybrid"),
    "efficientvit_b0": ZooModel("EfficientViT (MIT)", "hybrid"),
    "fastvit_t8": ZooModel("FastViT", "hybrid"),
    "tiny_vit_5m_224": ZooModel("TinyViT", "hybrid"),
}

DATA = {"in_channels": 3, "num_classes": 10}

# why a group was left out, by the first pattern its reason matches
REASONS = [
    ("output", r"model's output"),
    ("weight standardisation", r"weight standardisation"),
    ("norm across channels", r"normalises across channels"),
    ("channel shuffle", r"channel shuffle"),
    ("removal != gating", r"does not reproduce gating"),
    ("tp index mapping", r"torch-pruning could not map"),
    ("sliced/indexed", r"sliced or indexed"),
    ("RNN/MHA", r"a layer pnp does not cut"),
    ("heads reach other layers", r"heads of attention layer .* also reach"),
    ("grouped conv", r"grouped convolution"),
    ("no consumer", r"no layer consumes"),
    ("too small", r"fewer than min_size"),
]


class PartTimeout(BaseException):
    """A part ran past --timeout (a BaseException, so the library's own ``except Exception`` cannot swallow it)."""


# ---------------------------------------------------------------- one model (in a worker process)


def randomize_constants(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random values for every parameter a fresh model holds constant (biases, norm affines, layer scales, gains)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            flat = p.flatten()
            if p.numel() < 2 or not bool((flat == flat[0]).all()):
                continue
            centred = name.endswith(("bias", "beta")) or float(flat[0]) == 0.0
            p.copy_(torch.rand(p.shape, generator=gen) + (-0.5 if centred else 0.5))
    return model


def classifier_layers(model: nn.Module) -> list[nn.Module]:
    """The conv/linear layers of timm's classifier (LeViT has two, distillation head included)."""
    heads = model.get_classifier()
    heads = heads if isinstance(heads, (tuple, list)) else [heads]
    return [m for h in heads for m in h.modules() if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))]


def out_width(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def prunable_share(model: nn.Module, groups) -> float:
    """Output channels of conv/linear layers (classifier excluded) that lie in some group, as a share of all."""
    skip = {id(m) for m in classifier_layers(model)}
    layers = {n: m for n, m in model.named_modules()
              if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)) and id(m) not in skip}
    covered: dict[str, set[int]] = {}
    for g in groups:
        for member in g.members:  # a head group's qkv member holds every channel of its heads
            if member.side == "out" and member.module in layers:
                covered.setdefault(member.module, set()).update(member.indices.tolist())
    total = sum(out_width(m) for m in layers.values())
    return sum(len(c) for c in covered.values()) / total if total else 0.0


def reason_counts(excluded: dict[str, str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for why in excluded.values():
        kind = next((k for k, pattern in REASONS if re.search(pattern, why)), "other")
        counts[kind] = counts.get(kind, 0) + 1
    return counts


def transformer_parts(model: nn.Module, groups) -> dict:
    """Of timm-style attention layers and ``mlp.fc1`` layers, how many pnp offers as a group."""
    from pnp.core.attention import head_layouts

    layouts = head_layouts(model)
    fc1 = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.endswith("mlp.fc1")]
    heads = [q for q in layouts if q in groups and groups[q].unit == "head"]
    return {"attention_layers": len(layouts), "attention_by_heads": len(heads),
            "mlp_layers": len(fc1), "mlp_prunable": sum(n in groups for n in fc1)}


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def failure(exc: BaseException) -> dict:
    if isinstance(exc, PartTimeout):
        return {"type": "timeout", "message": str(exc)}
    text = str(exc).strip()
    return {"type": type(exc).__name__, "message": text.splitlines()[0][:300] if text else ""}


def max_rel_error(expected: torch.Tensor, actual: torch.Tensor) -> float | None:
    """Max abs difference over max abs expected value; None when the shapes differ."""
    if expected.shape != actual.shape:
        return None
    return float((expected - actual).abs().max()) / max(float(expected.abs().max()), 1e-12)


def cover_with_pnp(name: str, model: nn.Module, x: torch.Tensor, kwargs: dict, row: dict, save) -> None:
    """Fill ``row`` with pnp's figures for ``model``, step by step (``save`` writes the row so far)."""
    import warnings

    from pnp.core.artifacts import load_pruned, save_pruned
    from pnp.core.gating import GatedModel
    from pnp.core.groups import find_channel_groups, keep_from_ratio, legalize_keep
    from pnp.core.surgery import SurgeryMismatchError, apply_surgery

    row["step"] = "find_channel_groups"
    start = time.perf_counter()
    groups = find_channel_groups(model, x, prove=True)
    row["find_s"] = time.perf_counter() - start
    row["groups"] = len(groups)
    row["head_groups"] = sum(g.unit == "head" for g in groups)
    row["prunable_share"] = prunable_share(model, groups)
    row["excluded"] = reason_counts(groups.excluded)
    row["excluded_reasons"] = groups.excluded
    row.update(transformer_parts(model, groups))
    save()
    if not len(groups):
        row["step"] = "done"
        return

    row["step"] = "apply_surgery"
    keep = keep_from_ratio(groups, 0.5, generator=torch.Generator().manual_seed(0))
    keep, _ = legalize_keep(groups, keep)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            pruned = apply_surgery(model, groups, keep, x, verify=True)
        except SurgeryMismatchError as exc:  # still measure how far off the cut model is
            row["error"] = {"step": "apply_surgery(verify=True)", **failure(exc)}
            pruned = apply_surgery(model, groups, keep, x)
    row["surgery_s"] = time.perf_counter() - start
    row["pnp_param_reduction"] = 1 - params(pruned) / params(model)

    row["step"] = "compare with gated model"
    gated = GatedModel(model, groups)
    try:
        with torch.no_grad():
            expected = gated(x, masks={n: k.float() for n, k in keep.items()})
            actual = pruned.eval()(x)
    finally:
        gated.remove()
    row["rel_error"] = max_rel_error(expected, actual)
    row["exact"] = row["rel_error"] is not None and row["rel_error"] < EXACT
    save()

    row["step"] = "save/reload"
    with tempfile.TemporaryDirectory(prefix="pnp-coverage-") as tmp:
        save_pruned(pruned, Path(tmp) / name, builder=f"timm:{name}", builder_kwargs=kwargs)
        loaded = load_pruned(Path(tmp) / name)
    with torch.no_grad():
        row["reload_equal"] = bool(torch.equal(loaded(x), actual))
    row["step"] = "done"


def cover_with_torch_pruning(model: nn.Module, x: torch.Tensor, shape: tuple, row: dict) -> None:
    import torch_pruning as tp

    from pnp.core.attention import head_layouts

    modules = dict(model.named_modules())
    attention = {modules[layout.layer]: modules[layout.qkv] for layout in head_layouts(model).values()}
    before = params(model)
    row["tp_heads"] = bool(attention)
    row["tp_step"] = "init"
    start = time.perf_counter()
    pruner = tp.pruner.MetaPruner(
        model, x, importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=0.5,
        ignored_layers=classifier_layers(model), global_pruning=False,
        num_heads={qkv: attn.num_heads for attn, qkv in attention.items()},
        prune_num_heads=bool(attention), prune_head_dims=not attention, head_pruning_ratio=0.5 if attention else 0.0,
    )
    row["tp_step"] = "step"
    pruner.step()
    for attn, qkv in attention.items():  # Torch-Pruning's ViT example: the layer reads its sizes at run time
        attn.num_heads = pruner.num_heads[qkv]
        attn.head_dim = qkv.out_features // (3 * attn.num_heads)
        if hasattr(attn, "attn_dim"):
            attn.attn_dim = attn.num_heads * attn.head_dim
    row["tp_s"] = time.perf_counter() - start
    row["tp_param_reduction"] = 1 - params(model) / before
    row["tp_step"] = "forward"
    with torch.no_grad():
        out = model.eval()(x)
    out = out[0] if isinstance(out, (tuple, list)) else out
    row["tp_shape_changed"] = tuple(out.shape) != shape
    row["tp_ok"] = not row["tp_shape_changed"]
    row["tp_step"] = "done"


def run_part(part, timeout: float, *args) -> dict | None:
    """Run ``part(*args)`` under ``timeout`` seconds; the failure it ended with, or None."""

    def alarm(signum, frame):
        raise PartTimeout(f"past {timeout:g} s")

    signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        part(*args)
    except BaseException as exc:  # a crash is a result here; the worker must write its row
        if isinstance(exc, KeyboardInterrupt):
            raise
        return failure(exc)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    return None


def cover_model(name: str, timeout: float, path: Path) -> None:
    """The worker: one model's row, written to ``path`` after every step."""
    from conftest import randomize_norm_layers  # the tests' random BatchNorm statistics

    from pnp.core.builders import build_model

    torch.set_num_threads(1)
    entry = ZOO.get(name, ZooModel("?", "?"))
    kwargs = {**DATA, "input_size": entry.size}
    row: dict = {"model": name, "family": entry.family, "kind": entry.kind, "input_size": entry.size}

    def save():
        write_json_atomic(path, row)

    row["step"] = "build"
    try:
        torch.manual_seed(0)
        model = build_model(f"timm:{name}", **kwargs).eval()
        randomize_norm_layers(model, seed=1)
        randomize_constants(model, seed=2)
        x = torch.randn(2, 3, entry.size, entry.size, generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            shape = tuple(model(x).shape)
        row["params"] = params(model)
        tp_model = copy.deepcopy(model)
    except Exception as exc:
        row["error"] = {"step": "build", **failure(exc)}
        save()
        return
    save()
    crash = run_part(cover_with_pnp, timeout, name, model, x, kwargs, row, save)
    if crash is not None:  # after a failed verification, the crash that ended the part is kept too
        row["later_error" if "error" in row else "error"] = {"step": row["step"], **crash}
    save()
    crash = run_part(cover_with_torch_pruning, timeout, tp_model, x, shape, row)
    if crash is not None:
        row["tp_ok"] = False
        row["tp_error"] = {"step": row.get("tp_step"), **crash}
    save()


# ---------------------------------------------------------------- the zoo (parent process)


def run_worker(name: str, timeout: float) -> dict:
    """One model's row from a fresh process; a process that dies or hangs is recorded as such."""
    with tempfile.TemporaryDirectory(prefix="pnp-coverage-row-") as tmp:
        path = Path(tmp) / "row.json"
        cmd = [sys.executable, __file__, "--worker", name, "--worker-out", str(path), "--timeout", str(timeout)]
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        start = time.perf_counter()
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=2 * timeout + 120)
            problem = None if done.returncode == 0 else {
                "type": f"exit {done.returncode}", "message": (done.stderr.strip().splitlines() or [""])[-1][:300]}
        except subprocess.TimeoutExpired:
            problem = {"type": "timeout", "message": f"the worker ran past {2 * timeout + 120:g} s"}
        row = read_json(path) if path.exists() else {"model": name}
    row["wall_s"] = time.perf_counter() - start
    if problem is not None:
        row.setdefault("error", {"step": row.get("step"), **problem})
    return row


def fmt_s(value) -> str:
    return "" if value is None else f"{value:.1f}"


def pnp_status(row: dict) -> str:
    err = row.get("error")
    crash = f"{err['type']} in {err.get('step')}" if err else ""
    if "rel_error" in row:
        cut = "output shape differs" if row["rel_error"] is None else (
            "exact" if row["exact"] else f"rel err {row['rel_error']:.1e}")
        return f"{cut}; {crash}" if crash else cut
    return crash or ("no groups" if row.get("groups") == 0 else "?")


def tp_status(row: dict) -> str:
    if row.get("tp_ok"):
        return f"ok, -{row['tp_param_reduction']:.0%} params" + (" (heads)" if row.get("tp_heads") else "")
    if row.get("tp_shape_changed"):
        return "output shape changed"
    err = row.get("tp_error")
    return f"{err['type']} in {err['step']}" if err else "?"


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| model | family | size | groups | prunable | pnp | -params | find s | surgery s | reload | left out | Torch-Pruning |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        share = r.get("prunable_share")
        heads = f" ({r['head_groups']} head)" if r.get("head_groups") else ""
        reload = {True: "ok", False: "DIFFERS"}.get(r.get("reload_equal"), "")
        if r.get("error", {}).get("step") == "save/reload":
            reload = "FAILS"
        left = ", ".join(f"{k} {v}" for k, v in sorted(r.get("excluded", {}).items(), key=lambda kv: -kv[1]))
        cut = r.get("pnp_param_reduction")
        lines.append(
            f"| {r['model']} | {r.get('family', '')} | {r.get('input_size', '')} | {r.get('groups', '')}{heads} | "
            f"{'' if share is None else f'{share:.0%}'} | {pnp_status(r)} | {'' if cut is None else f'{cut:.0%}'} | "
            f"{fmt_s(r.get('find_s'))} | {fmt_s(r.get('surgery_s'))} | {reload} | {left} | {tp_status(r)} |"
        )
    return "\n".join(lines) + "\n"


def summary(rows: list[dict]) -> str:
    exact = sum(bool(r.get("exact")) and "error" not in r for r in rows)
    cnns = [r for r in rows if r.get("kind") == "CNN"]
    half = sum((r.get("prunable_share") or 0) >= 0.5 for r in cnns)
    vits = [r for r in rows if r.get("family") in ("ViT", "DeiT")]
    vit_ok = all(r.get("attention_layers") and r["attention_by_heads"] == r["attention_layers"]
                 and r["mlp_prunable"] == r["mlp_layers"] for r in vits)
    tp_ok = sum(bool(r.get("tp_ok")) for r in rows)
    heads = ("yes" if vit_ok else "no") if vits else "n/a"
    return (f"pnp exact on {exact}/{len(rows)} models; {half}/{len(cnns)} CNNs have >=50% of their conv/linear "
            f"channels prunable; ViT/DeiT MLP units and heads all prunable: {heads} ({len(vits)} models); "
            f"Torch-Pruning ran {tp_ok}/{len(rows)}; slowest group finding {slowest(rows, 'find_s')}, "
            f"slowest surgery {slowest(rows, 'surgery_s')}")


def slowest(rows: list[dict], key: str) -> str:
    timed = [r for r in rows if r.get(key) is not None]
    if not timed:
        return "n/a"
    worst = max(timed, key=lambda r: r[key])
    return f"{worst['model']} {worst[key]:.1f} s"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(ZOO), help=f"timm model names (default: the zoo of {len(ZOO)})")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds for each model's pnp part and its Torch-Pruning part")
    parser.add_argument("--out", type=Path, default=OUT, help="the JSON file; table.md is written beside it")
    parser.add_argument("--update", action="store_true",
                        help="rerun only --models and keep the other rows of --out (each row names its commit)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        cover_model(args.worker, args.timeout, args.worker_out)
        return
    import timm

    from methods.environment import environment

    unknown = [m for m in args.models if m not in timm.list_models()]
    if unknown:
        raise SystemExit(f"--models: timm has no model {unknown}; timm.list_models() lists the names")
    env = {**environment("cpu"), "timm": timm.__version__, "threads": 1}
    rows = {}
    if args.update and args.out.is_file():  # rows of models not rerun stay, each with the commit it was measured at
        previous = read_json(args.out)
        rows = {r["model"]: {"commit": previous["environment"]["commit"], **r} for r in previous["models"]}
    for name in args.models:
        row = {**run_worker(name, args.timeout), "commit": env["commit"]}
        rows[name] = row
        print(f"{name}: {pnp_status(row)}; Torch-Pruning {tp_status(row)} ({row['wall_s']:.0f} s)", flush=True)
    rows = [rows[n] for n in ZOO if n in rows] + [r for n, r in rows.items() if n not in ZOO]
    table = markdown_table(rows)
    line = summary(rows)
    write_json_atomic(args.out, {"environment": env, "timeout_s": args.timeout, "summary": line, "models": rows})
    write_text_atomic(args.out.with_name("table.md"), table + "\n" + line + "\n")
    print()
    print(table)
    print(line)


if __name__ == "__main__":
    script_main(main)  # bad input: its message, status 2
