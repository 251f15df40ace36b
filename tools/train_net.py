"""Train, prune and fine-tune a Faster R-CNN R-FPN detector (detectron2's train_net convention).

    python tools/train_net.py --stage all --dataset-dir data/fashion-det --num-images 400 \\
        --output-dir runs/det --budget 0.5 --kd-fpn 1.0 SOLVER.MAX_ITER 300

Stages: train (baseline), prune-train (the backbone pruner), prune (read-out and
surgery), finetune (optionally distilled), or all; each writes under --output-dir
and the report (AP, FLOPs, params, latency before and after) follows the last one.
Trailing ``KEY VALUE`` pairs override the detectron2 config, as in detectron2's tools.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pnp.detection.pipeline import STAGES, build_config, register_splits, run_stages  # noqa: E402


def argument_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", default="all", choices=[*STAGES, "all", "report"])
    p.add_argument("--config-file", default="", metavar="FILE", help="detectron2 YAML merged over pnp's recipe")
    p.add_argument("--dataset-dir", required=True, help="COCO layout: train/, val/, annotations/instances_{train,val}.json")
    p.add_argument("--num-images", type=int, default=None, help="compose this many Fashion-MNIST training images first")
    p.add_argument("--fashion-root", default=None, help="Fashion-MNIST IDX files for --num-images")
    p.add_argument("--output-dir", default="output/detection")
    p.add_argument("--depth", type=int, default=18, choices=[18, 34, 50, 101])
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--budget", type=float, default=0.5, help="fraction of backbone FLOPs to keep")
    p.add_argument("--pruner-iters", type=int, default=200)
    p.add_argument("--pruner-lr", type=float, default=1e-3)
    p.add_argument("--sparsity-weight", type=float, default=1.0)
    p.add_argument("--kd-fpn", type=float, default=0.0, help="weight of FPN feature imitation while fine-tuning")
    p.add_argument("--kd-cls", type=float, default=0.0, help="weight of RoI class-logit distillation while fine-tuning")
    p.add_argument("--finetune-iters", type=int, default=None, help="default: SOLVER.MAX_ITER")
    p.add_argument("--finetune-lr", type=float, default=None, help="default: SOLVER.BASE_LR")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="detectron2 config overrides: KEY VALUE ...")
    return p


def main(argv=None) -> None:
    args = argument_parser().parse_args(argv)
    train, val = register_splits(args.dataset_dir, args.num_images, args.image_size, args.fashion_root)
    cfg = build_config(train, val, args.depth, args.image_size, args.config_file, args.opts, args.output_dir)
    stages = {"all": STAGES, "report": ()}.get(args.stage, (args.stage,))
    run_stages(
        stages, cfg, args.output_dir, budget=args.budget, pruner_iters=args.pruner_iters, pruner_lr=args.pruner_lr,
        sparsity_weight=args.sparsity_weight, kd_fpn=args.kd_fpn, kd_cls=args.kd_cls,
        finetune_iters=args.finetune_iters, finetune_lr=args.finetune_lr,
    )


if __name__ == "__main__":
    main()
