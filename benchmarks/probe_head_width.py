"""Probe: pnp as shipped, with one channel group held to at most group magnitude's width.

On MobileNetV2 at 90% fewer FLOPs the learned widths keep two to three times
magnitude's channels in ``head.0`` (the 1x1 convolution before the classifier) and
fewer in the early blocks. This asks whether those head channels cost the body the
FLOPs it needs after fine-tuning: the pruner's scores of the group (``--group``) are
cut to its best ``k``, ``k`` being the width group magnitude keeps there at the same
budget; the read-out then spends the freed budget by the scores as usual (its fill may
still add cut channels back where nothing else fits), and the look-ahead and
fine-tuning are pnp's own. Its runs are a method of the methods
benchmark, ``pnp_headcap``, written beside the others under ``--out`` (the baseline and
the pruner run are reused from there):

    python benchmarks/probe_head_width.py --profile standard --models mobilenetv2 \
        --seeds 10 --budgets 0.9 --out DIR

Every option but ``--group`` is ``bench_methods.py``'s, but for ``--methods`` (set here) and
``--jobs`` (one process).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the methods package beside this file

import bench_methods  # noqa: E402
from methods import methods as M  # noqa: E402
from pnp.cli import stages  # noqa: E402
from pnp.training.runs import script_main  # noqa: E402

METHOD = "pnp_headcap"


class HeadCapped(M.LearnedPruner):
    """The shipped pnp, the pruner's scores of one group cut to magnitude's width there."""

    def __init__(self, group: str):
        super().__init__(f"pnp, {group} at magnitude's width", choice="auto")
        self.group = group

    def choose(self, ctx):
        if self.group not in {g.name for g in ctx.groups}:
            # known once the model is built; the finished baseline stays and is reused when run again
            raise SystemExit(f"probe_head_width: --group {self.group!r} is not a channel group of "
                             f"{ctx.cfg.model.name}; use one of {[g.name for g in ctx.groups]}")
        return super().choose(ctx)

    def read_out(self, ctx, scores, source):
        magnitude = stages.criterion_scores(ctx.cfg, ctx.data, ctx.baseline, ctx.groups, "magnitude")
        magnitude_keep, _ = stages.read_out(ctx.cfg, ctx.groups, magnitude, ("criterion", "magnitude"))
        learned, _ = super().read_out(ctx, scores, source)
        cap = int(magnitude_keep[self.group].sum())
        scores = {name: s.detach().clone().float() for name, s in scores.items()}
        # below every score: the read-out's floor and fill reach these channels last
        scores[self.group][scores[self.group].argsort(descending=True)[cap:]] = -1.0
        keep, info = super().read_out(ctx, scores, source)
        # each group's [learned, capped, magnitude's] channel counts
        widths = {n: [int(learned[n].sum()), int(keep[n].sum()), int(magnitude_keep[n].sum())] for n in keep}
        return keep, {**info, "headcap": {"group": self.group, "cap": cap, "widths": widths}}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--group", default="head.0")
    known, rest = parser.parse_known_args(argv if argv is not None else sys.argv[1:])
    for flag in ("--methods", "--jobs"):
        if any(a == flag or a.startswith(flag + "=") for a in rest):
            raise SystemExit(f"probe_head_width: {flag} is not an option of the probe (it runs pnp_headcap in "
                             "this process); leave it out")
    M.METHODS[METHOD] = HeadCapped(known.group)
    try:
        return bench_methods.main([*rest, "--methods", METHOD])
    finally:
        del M.METHODS[METHOD]


if __name__ == "__main__":
    script_main(main)
