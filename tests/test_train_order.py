"""A stage resumed from a checkpoint trains on the batches a run never stopped would have trained on."""

from __future__ import annotations

import itertools
import signal

import pytest
import pytorch_lightning as pl
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from pnp.cli import stages
from pnp.training.runs import INTERRUPTED_CHECKPOINT
from test_pipeline import compose_config, quick_overrides, write_fashion_mnist


def _config(tmp_path, limit_train_batches=3, workers=0, every_n_steps=0):
    root = write_fashion_mnist(tmp_path / "fashion", n_train=300, n_test=50)
    # 200 training images in batches of 50: 4 batches an epoch, or the first 3 of an epoch's order
    overrides = quick_overrides(root, tmp_path / "out") + ["train.epochs=3",
                                                          f"trainer.limit_train_batches={limit_train_batches}",
                                                          f"data.num_workers={workers}",
                                                          f"trainer.checkpoint_every_n_steps={every_n_steps}"]
    cfg = compose_config("pipeline", overrides)
    return cfg, stages.build_data(cfg)


@pytest.fixture
def data(tmp_path):
    return _config(tmp_path)


def test_training_batches_come_in_the_order_shuffle_true_gives(data):
    """Runs never stopped see the batches they saw before the order became resumable."""
    _, data = data
    module = data.module
    ours = module.train_dataloader()
    before = DataLoader(module.train_dataset, batch_size=module.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(int(module.seed)))
    for cut in (None, 2, None, 3, 1):  # epochs used up, and cut short as limit_train_batches does
        got, want = list(itertools.islice(ours, cut)), list(itertools.islice(before, cut))
        assert len(got) == len(want) > 0
        assert all(torch.equal(g[0], w[0]) and torch.equal(g[1], w[1]) for g, w in zip(got, want))


class _StopAt(pl.Callback):
    """Interrupts training as Ctrl-C does when ``global_step`` reaches ``step``."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise KeyboardInterrupt


def _train(cfg, data, path) -> dict[str, torch.Tensor]:
    stage = stages.stage_dir(path, "train", {"case": "train order"}, data)
    stages.train(cfg, data, stage, stage.check())
    return load_file(str(path / "model" / "model.safetensors"))


def _train_until_stopped(cfg, data, path, step: int, monkeypatch) -> None:
    stage = stages.stage_dir(path, "train", {"case": "train order"}, data)
    make_trainer = stages.make_trainer

    def stopping(*args, **kwargs):
        trainer = make_trainer(*args, **kwargs)
        trainer.callbacks.append(_StopAt(step))
        return trainer

    monkeypatch.setattr(stages, "make_trainer", stopping)
    previous = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit):  # Lightning's end of an interrupted fit
            stages.train(cfg, data, stage, stage.check())
    finally:
        signal.signal(signal.SIGINT, previous)  # Lightning ignores SIGINT while it shuts down
        monkeypatch.undo()
    assert stage.check() == "resume"


@pytest.mark.parametrize("limit, stop_at, from_last_epoch, workers, every_n_steps", [
    (3, 4, False, 0, 0), (3, 3, False, 0, 0), (3, 4, True, 0, 0), (1.0, 5, False, 0, 0), (1.0, 5, True, 0, 0),
    (3, 4, True, 1, 0), (3, 5, True, 0, 2),
], ids=["mid-epoch", "as-an-epoch-begins", "from-the-last-epochs-checkpoint", "whole-epochs-mid-epoch",
        "whole-epochs-from-the-last-epochs-checkpoint", "worker-from-the-last-epochs-checkpoint",
        "from-a-checkpoint-every-2-steps"])
def test_a_resumed_stage_ends_with_the_weights_of_one_never_stopped(tmp_path, monkeypatch, limit, stop_at,
                                                                    from_last_epoch, workers, every_n_steps):
    """Stopped at a step of the second epoch, then run again: the same model as a run never stopped.

    From the checkpoint the interruption wrote, or (a kill, which writes none) from the one the last
    finished epoch (or, with ``checkpoint_every_n_steps``, the last N steps) wrote; with epochs cut short
    by ``limit_train_batches`` or whole, loading in the process or in a persistent worker.
    """
    cfg, data = _config(tmp_path, limit, workers, every_n_steps)
    never_stopped = _train(cfg, data, tmp_path / "whole")
    _train_until_stopped(cfg, data, tmp_path / "stopped", stop_at, monkeypatch)
    if from_last_epoch:
        (tmp_path / "stopped" / INTERRUPTED_CHECKPOINT).unlink()
    resumed = _train(cfg, data, tmp_path / "stopped")
    assert set(resumed) == set(never_stopped)
    assert all(torch.equal(resumed[k], never_stopped[k]) for k in never_stopped)
