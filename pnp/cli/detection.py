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
from pnp.training.runs import DEBUG_VARIABLE, RESUME_HINT, interrupted_status, interrupts_recorded


def argument_parser() -> argparse.ArgumentParser:
    import_detectron2()
    from detectron2.engine import default_argument_parser

    from pnp.detection.modeling import DEPTHS, META_ARCHITECTURES
    from pnp.detection.pipeline import INHERIT_SOURCES, STAGES, DetectionRecipe
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
    # the recipe's flags: each defaults to pnp.detection.pipeline.DetectionRecipe's field
    recipe = DetectionRecipe()
    flags = [
        ("--budget", float, "fraction of the scope's FLOPs to keep"),
        ("--scope", str, "detector: backbone, FPN and heads under one budget; backbone: the backbone only"),
        ("--round-to", int, "keep channel counts multiples of this"),
        ("--min-channels", int, "keep at least this many channels in every group"),
        ("--min-share", float, "no group under this share of the uniform keep ratio at the budget (0: no floor)"),
        ("--inherit", str, "which channels fill the learned widths: the pruner's picks, a criterion's, or auto: the best "
                           "of --inherit-candidates after --lookahead-iters training iterations each"),
        ("--inherit-candidates", str, "what --inherit auto tries"),
        ("--widths-from", str, "--inherit auto: criteria whose own widths (their read-out at the budget) compete with "
                               "the learned widths"),
        ("--lookahead-iters", int, "--inherit auto: training iterations per candidate, at the fine-tuning learning rate"),
        ("--lookahead-images", int, "--inherit auto: training images (at most half) held out of its training, on "
                                    "which the candidates' box AP is compared"),
        ("--pruner-iters", int, "pruner training iterations"),
        ("--pruner-lr", float, "pruner learning rate"),
        ("--sparsity-weight", float, "weight of the pruner's sparsity term"),
        ("--kd-fpn", float, "weight of FPN feature imitation while fine-tuning"),
        ("--kd-cls", float, "weight of RoI class-logit distillation while fine-tuning (R-CNNs; 0 for RetinaNet)"),
        ("--finetune-iters", int, "fine-tuning iterations (default: SOLVER.MAX_ITER)"),
        ("--finetune-lr", float, "fine-tuning learning rate (default: SOLVER.BASE_LR)"),
    ]
    choices = {"--scope": list(SCOPES), "--inherit": [*INHERIT_SOURCES, "auto"], "--inherit-candidates": list(INHERIT_SOURCES),
               "--widths-from": list(INHERIT_SOURCES[1:])}
    nargs = {"--inherit-candidates": "+", "--widths-from": "*"}
    for flag, kind, text in flags:
        default = getattr(recipe, flag[2:].replace("-", "_"))
        p.add_argument(flag, type=kind, default=None, choices=choices.get(flag), nargs=nargs.get(flag),
                       help=f"{text} (default: {default})" if default is not None else text)
    return p


RECIPE_FLAGS = ("budget", "scope", "round_to", "min_channels", "min_share", "inherit", "inherit_candidates", "widths_from",
                "lookahead_iters",
                "lookahead_images", "pruner_iters", "pruner_lr", "sparsity_weight", "kd_fpn", "kd_cls", "finetune_iters",
                "finetune_lr")


def recipe_of(args: argparse.Namespace):
    """The detection recipe with the flags given on the command line; ValueError naming a flag it cannot use."""
    from pnp.detection.pipeline import DetectionRecipe

    given = {name: getattr(args, name) for name in RECIPE_FLAGS if getattr(args, name) is not None}
    for name in ("inherit_candidates", "widths_from"):  # lists from the command line; the recipe holds tuples
        if name in given:
            given[name] = tuple(given[name])
    recipe = DetectionRecipe(**given)
    if "kd_cls" not in given:
        recipe = recipe.for_architecture(args.meta_architecture)
    try:
        recipe.check(args.meta_architecture)
    except ValueError as exc:  # its messages start with the field: name the flag instead
        field, _, rest = str(exc).partition(" ")
        raise ValueError(f"--{field.replace('_', '-')} {rest}" if field in RECIPE_FLAGS else str(exc)) from None
    if args.image_size < 1:
        raise ValueError(f"--image-size {args.image_size} must be at least 1")
    return recipe


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
    return run_stages(stages, cfg, args.output_dir, recipe_of(args))


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
        recipe_of(args)  # bad flags are refused before any process starts
        with interrupts_recorded(interrupted):
            launch(run, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
                   dist_url=args.dist_url, args=(args,))
    except KeyboardInterrupt:
        print(f"[pnp] {RESUME_HINT}", file=sys.stderr, flush=True)
        return interrupted_status(interrupted)
    except _user_errors() as exc:
        if os.environ.get(DEBUG_VARIABLE):
            raise
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    return 0
