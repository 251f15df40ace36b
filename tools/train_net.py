"""Train, prune and fine-tune a detectron2 detector (Faster R-CNN or RetinaNet, ResNet + FPN).

    python tools/train_net.py --stage all --dataset-dir data/fashion-det --num-images 400 \\
        --output-dir runs/det --budget 0.5 --kd-fpn 1.0 SOLVER.MAX_ITER 300

Stages: train (baseline), prune-train (the pruner), prune (read-out and surgery),
finetune (optionally distilled), or all; each writes under --output-dir and the
report (AP, whole-detector and backbone FLOPs, params, latency before and after)
follows the last one. ``--budget`` is the fraction of the whole detector's FLOPs to
keep (``--scope backbone``: of the backbone's, the heads left whole).

detectron2's conventions: ``default_argument_parser`` (``--config-file``,
``--num-gpus``, ``--num-machines``, ``--machine-rank``, ``--dist-url``,
``--eval-only``, trailing ``KEY VALUE`` overrides), ``default_setup`` and
``launch`` for several GPUs and machines. An interrupted stage resumes from its
last periodic checkpoint (``SOLVER.CHECKPOINT_PERIOD``) when the same command is
run again; a finished one is skipped (``--resume`` is accepted and always on).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pnp.cli.detection import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
