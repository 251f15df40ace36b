"""``tools/train_net.py``: the detection stages behind detectron2's own command-line conventions.

Arguments come from detectron2's ``default_argument_parser`` plus pnp's; the job
is set up by ``default_setup`` (logging, the resolved config in the output folder)
and run by ``launch`` on every GPU of every machine given. Exit status: 0 on
success, 2 for bad input (a message, no traceback), 1 for an internal error,
130/143 when interrupted (run the same command again to resume).
"""

from __future__ import annotations

import argparse
import os
import sys

from pnp.detection.compat import import_detectron2
from pnp.training.runs import RESUME_HINT, interrupted_status, interrupts_recorded


def argument_parser() -> argparse.ArgumentParser:
    import_detectron2()
    from detectron2.engine import default_argument_parser

    from pnp.detection.modeling import DEPTHS, META_ARCHITECTURES
    from pnp.detection.pipeline import STAGES
    from pnp.detection.pruning import SCOPES

    p = default_argument_parser()
    p.description = __doc__
    p.add_argument("--stage", default="all", choices=[*STAGES, "all", "report"])
    p.add_argument("--dataset-dir", required=True, help="COCO layout: train/, val/, annotations/instances_{train,val}.json")
    p.add_argument("--num-images", type=int, default=None, help="compose this many Fashion-MNIST training images first")
    p.add_argument("--fashion-root", default=None, help="Fashion-MNIST IDX files for --num-images")
    p.add_argument("--output-dir", default="output/detection")
    p.add_argument("--meta-architecture", default="faster_rcnn", choices=list(META_ARCHITECTURES))
    p.add_argument("--depth", type=int, default=18, choices=list(DEPTHS))
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--budget", type=float, default=0.5, help="fraction of the scope's FLOPs to keep")
    p.add_argument("--scope", default="detector", choices=list(SCOPES),
                   help="detector: backbone, FPN and heads under one budget; backbone: the backbone only")
    p.add_argument("--round-to", type=int, default=1, help="keep channel counts multiples of this")
    p.add_argument("--inherit", default="learned", choices=["learned", "l1", "magnitude"],
                   help="which channels fill the learned widths: the pruner's picks or a criterion's")
    p.add_argument("--pruner-iters", type=int, default=200)
    p.add_argument("--pruner-lr", type=float, default=1e-3)
    p.add_argument("--sparsity-weight", type=float, default=1.0)
    p.add_argument("--kd-fpn", type=float, default=0.0, help="weight of FPN feature imitation while fine-tuning")
    p.add_argument("--kd-cls", type=float, default=0.0, help="weight of RoI class-logit distillation while fine-tuning")
    p.add_argument("--finetune-iters", type=int, default=None, help="default: SOLVER.MAX_ITER")
    p.add_argument("--finetune-lr", type=float, default=None, help="default: SOLVER.BASE_LR")
    return p


def check_args(args: argparse.Namespace) -> None:
    """Raise ValueError naming the flag and value for what no stage could use."""
    if args.budget is not None and not 0.0 < args.budget <= 1.0:
        raise ValueError(f"--budget {args.budget} is outside (0, 1]: it is the fraction of FLOPs to keep, e.g. 0.5")
    for flag, value in (("--pruner-iters", args.pruner_iters), ("--round-to", args.round_to), ("--image-size", args.image_size)):
        if value < 1:
            raise ValueError(f"{flag} {value} must be at least 1")
    for flag, value in (("--kd-fpn", args.kd_fpn), ("--kd-cls", args.kd_cls)):
        if value < 0:
            raise ValueError(f"{flag} {value} must be >= 0")
    if args.kd_cls > 0 and args.meta_architecture == "retinanet":
        raise ValueError("--kd-cls distils RoI class logits, which RetinaNet has not; use --kd-fpn")


def setup(args: argparse.Namespace):
    """Register the data, compose the config (pnp's recipe, ``--config-file``, ``KEY VALUE`` pairs), set up the job."""
    from detectron2.engine import default_setup
    from detectron2.utils import comm

    from pnp.detection.pipeline import build_config, register_splits

    if args.num_images is not None and comm.get_world_size() > 1:  # one process composes, the others wait
        if comm.is_main_process():
            register_splits(args.dataset_dir, args.num_images, args.image_size, args.fashion_root)
        comm.synchronize()
        train, val = register_splits(args.dataset_dir, None, args.image_size, args.fashion_root)
    else:
        train, val = register_splits(args.dataset_dir, args.num_images, args.image_size, args.fashion_root)
    cfg = build_config(train, val, args.depth, args.image_size, args.config_file, args.opts or [], args.output_dir,
                       meta_architecture=args.meta_architecture)
    default_setup(cfg, args)
    return cfg


def run(args: argparse.Namespace):
    """One process's job: every stage asked for, then the report."""
    from pnp.detection.pipeline import STAGES, run_stages

    cfg = setup(args)
    stages = () if args.eval_only else {"all": STAGES, "report": ()}.get(args.stage, (args.stage,))
    return run_stages(
        stages, cfg, args.output_dir, budget=args.budget, pruner_iters=args.pruner_iters, pruner_lr=args.pruner_lr,
        sparsity_weight=args.sparsity_weight, kd_fpn=args.kd_fpn, kd_cls=args.kd_cls,
        finetune_iters=args.finetune_iters, finetune_lr=args.finetune_lr, scope=args.scope, round_to=args.round_to,
        inherit=args.inherit,
    )


def _user_errors() -> tuple:
    from pnp.core.artifacts import ArtifactError
    from pnp.training.runs import StageConflictError

    return (ValueError, FileNotFoundError, ArtifactError, StageConflictError)


def main(argv=None) -> int:
    """Parse, launch, and turn the outcome into an exit status (see the module's docstring)."""
    import_detectron2()
    from detectron2.engine import launch

    args = argument_parser().parse_args(argv)
    interrupted: list[int] = []
    try:
        check_args(args)
        with interrupts_recorded(interrupted):
            launch(run, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
                   dist_url=args.dist_url, args=(args,))
    except KeyboardInterrupt:
        print(f"[pnp] {RESUME_HINT}", file=sys.stderr, flush=True)
        return interrupted_status(interrupted)
    except _user_errors() as exc:
        if os.environ.get("PNP_DEBUG"):
            raise
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    return 0
