"""ClassifierModule: training lowers the loss, the schedule ends where it says, distillation is opt-in."""

import math

import pytest
import pytorch_lightning as pl
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from pnp.training.classifier import ClassifierModule


def synthetic_loader(n=256, classes=4, seed=0, batch_size=32, shuffle=True):
    """Each class lights up its own quadrant of an 8x8 image, plus noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    x = torch.randn(n, 1, 8, 8, generator=g) * 0.5
    for c in range(classes):
        r, col = divmod(c, 2)
        x[y == c, :, 4 * r : 4 * r + 4, 4 * col : 4 * col + 4] += 1.5
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle, generator=g)


def small_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(256, 4))


def trainer(**kwargs):
    defaults = dict(
        accelerator="cpu", max_epochs=3, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )
    return pl.Trainer(**{**defaults, **kwargs})


def mean_loss(model, loader):
    with torch.no_grad():
        return sum(F.cross_entropy(model(x), y, reduction="sum").item() for x, y in loader) / len(loader.dataset)


def test_training_lowers_loss_and_cosine_ends_at_zero():
    pl.seed_everything(0)
    train, val = synthetic_loader(seed=0), synthetic_loader(seed=1, shuffle=False)
    model = small_net()
    before = mean_loss(model, val)
    module = ClassifierModule(model, lr=0.05, epochs=3, schedule="cosine")
    t = trainer()
    t.fit(module, train, val)
    after = mean_loss(model, val)
    assert after < 0.5 * before
    val_acc = t.callback_metrics["val/acc"].item()
    assert val_acc > 90.0
    assert t.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-6)
    assert "train/kd_loss" not in t.callback_metrics
    result = t.test(module, val, verbose=False)[0]
    assert result["test/acc"] == pytest.approx(val_acc, abs=1e-4)  # same data, same model


class LearningRates(pl.Callback):
    def __init__(self):
        self.rates = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.rates.append(trainer.optimizers[0].param_groups[0]["lr"])


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_warmup_raises_the_rate_linearly_then_follows_the_schedule(schedule):
    # 8 steps an epoch; warmup over the first epoch and a half: 12 steps
    rates = LearningRates()
    module = ClassifierModule(small_net(), lr=0.1, epochs=3, schedule=schedule, warmup_epochs=1.5)
    trainer(max_epochs=3, callbacks=[rates]).fit(module, synthetic_loader(n=256, batch_size=32))
    assert len(rates.rates) == 24
    plain = [0.1 * (0.5 * (1 + math.cos(math.pi * s / 24)) if schedule == "cosine" else 1.0) for s in range(24)]
    expected = [p * min(1.0, (s + 1) / 12) for s, p in enumerate(plain)]
    assert rates.rates == pytest.approx(expected)
    assert rates.rates[0] < 0.01 and rates.rates[11] == pytest.approx(plain[11])


def test_warmup_must_end_before_training_does():
    with pytest.raises(ValueError, match="warmup_epochs 3"):
        ClassifierModule(small_net(), epochs=3, warmup_epochs=3)


def test_step_schedule_and_adam():
    module = ClassifierModule(small_net(), lr=0.01, epochs=2, schedule="step", optimizer="adam")
    t = trainer(max_epochs=2)
    t.fit(module, synthetic_loader(n=64))
    assert isinstance(t.optimizers[0], torch.optim.Adam)
    assert t.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.01 * 0.01)


def test_adamw_decays_weights_but_not_biases_or_norm_scales():
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.LazyLinear(10))
    net(torch.zeros(1, 1, 8, 8))
    module = ClassifierModule(net, lr=0.01, weight_decay=0.05, optimizer="adamw", schedule="constant")
    optimizer = module.configure_optimizers()
    assert isinstance(optimizer, torch.optim.AdamW)
    decayed, undecayed = optimizer.param_groups
    assert decayed["weight_decay"] == 0.05 and undecayed["weight_decay"] == 0.0
    assert {id(p) for p in decayed["params"]} == {id(net[0].weight), id(net[4].weight)}
    assert {id(p) for p in undecayed["params"]} == {id(net[0].bias), id(net[1].weight), id(net[1].bias), id(net[4].bias)}
    # with no decay a parameter left alone by its gradient stays put; a decayed one shrinks
    weight, bias = net[4].weight.detach().clone(), net[4].bias.detach().clone()
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    assert torch.all(net[4].weight.abs() < weight.abs() + 1e-12) and not torch.equal(net[4].weight, weight)
    assert torch.equal(net[4].bias, bias)


class ExplodingTeacher(nn.Module):
    def forward(self, x):
        raise AssertionError("the teacher must not run when kd_weight is 0")


def test_zero_kd_weight_never_calls_the_teacher():
    module = ClassifierModule(small_net(), teacher=ExplodingTeacher(), kd_weight=0.0, epochs=1)
    t = trainer(max_epochs=1)
    t.fit(module, synthetic_loader(n=64))
    assert "train/kd_loss" not in t.callback_metrics


def test_distillation_is_logged_and_added_to_the_loss():
    pl.seed_everything(0)
    teacher = small_net(seed=1)
    frozen = {k: v.clone() for k, v in teacher.state_dict().items()}
    module = ClassifierModule(small_net(), lr=0.05, teacher=teacher, kd_weight=0.5, kd_temperature=2.0, epochs=2)
    t = trainer(max_epochs=2)
    t.fit(module, synthetic_loader(n=128))
    m = t.callback_metrics
    assert m["train/kd_loss_epoch"] > 0
    expected = m["train/ce_loss"] + 0.5 * m["train/kd_loss_epoch"]
    assert m["train/loss_epoch"] == pytest.approx(expected.item(), rel=1e-4)
    assert not teacher.training
    assert all(torch.equal(v, frozen[k]) for k, v in teacher.state_dict().items())


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="needs a teacher"):
        ClassifierModule(small_net(), kd_weight=1.0)
    with pytest.raises(ValueError, match="optimizer 'rmsprop'"):
        ClassifierModule(small_net(), optimizer="rmsprop")
    with pytest.raises(ValueError, match="schedule 'linear'"):
        ClassifierModule(small_net(), schedule="linear")


def test_model_handed_over_in_eval_mode_trains_its_batchnorm_statistics():
    """A pruned or reloaded model arrives in eval mode; fine-tuning must still update BatchNorm."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(256, 4)).eval()
    teacher = small_net(seed=1).eval()
    module = ClassifierModule(model, lr=0.01, epochs=1, teacher=teacher, kd_weight=0.5)
    trainer(max_epochs=1).fit(module, synthetic_loader())
    assert model[1].num_batches_tracked.item() == 8  # every training batch updated the running statistics
    assert not teacher.training


def test_channels_last_trains_the_same_weights_and_hands_back_the_usual_layout():
    """Training in channels-last layout sees channels-last weights and batches, and changes only the speed."""
    seen = {}

    class Spy(nn.Module):
        def forward(self, x):
            seen.setdefault("batch", x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous())
            return x

    def fit(channels_last):
        pl.seed_everything(0)
        torch.manual_seed(0)
        model = nn.Sequential(Spy(), nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                              nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4))
        g = torch.Generator().manual_seed(0)
        loader = DataLoader(TensorDataset(torch.randn(64, 3, 8, 8, generator=g), torch.randint(0, 4, (64,), generator=g)),
                            batch_size=16)
        module = ClassifierModule(model, lr=0.05, epochs=2, channels_last=channels_last)
        trainer(max_epochs=2).fit(module, loader)
        return model

    plain = fit(False)
    assert seen.pop("batch") is False
    fast = fit(True)
    assert seen.pop("batch") is True  # the batch reached the model channels-last
    conv = fast[1].weight
    assert conv.is_contiguous()  # back to the usual layout once training ends
    for a, b in zip(plain.state_dict().values(), fast.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_precomputed_teacher_outputs_train_as_the_live_teacher_does(tmp_path):
    """Distilling from logits computed once gives the model a live teacher gives, without running the teacher."""
    from tests.test_data import make_fashion_mnist, no_system_fashion_mnist  # noqa: F401
    from pnp.training.classifier import fixed_teacher_outputs
    from pnp.training.data import build_datamodule

    make_fashion_mnist(tmp_path / "fm", gz=True, n_train=96)
    dm = build_datamodule("fashion_mnist", root=tmp_path / "fm", val_size=16, batch_size=16)
    torch.manual_seed(1)
    teacher = nn.Sequential(nn.Conv2d(1, 4, 5, stride=4), nn.ReLU(), nn.Flatten(), nn.Linear(144, 10))
    calls = []
    teacher.register_forward_hook(lambda *args: calls.append(1))

    def fit(cached):
        pl.seed_everything(0)
        model = small_net_for(28)
        module = ClassifierModule(model, lr=0.05, epochs=2, teacher=teacher, kd_weight=1.0, channels_last=False)
        outputs = fixed_teacher_outputs(teacher, dm, channels_last=False) if cached else None
        calls.clear()
        if cached:
            with dm.train_outputs(outputs):
                trainer(max_epochs=2).fit(module, datamodule=dm)
        else:
            trainer(max_epochs=2).fit(module, datamodule=dm)
        return model, len(calls)

    live, live_calls = fit(False)
    cached, cached_calls = fit(True)
    assert live_calls == 2 * 5 and cached_calls == 0  # 80 images, batches of 16, two epochs
    for a, b in zip(live.state_dict().values(), cached.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # the pass runs channels-last as the training that follows does: the same outputs, the teacher given back as it was
    torch.testing.assert_close(fixed_teacher_outputs(teacher, dm, channels_last=True),
                               fixed_teacher_outputs(teacher, dm, channels_last=False), rtol=1e-4, atol=1e-5)
    assert all(p.is_contiguous() for p in teacher.parameters()) and not teacher.training


def small_net_for(side):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(4 * ((side - 3) // 2 + 1) ** 2, 10))


def test_a_strided_1x1_convolution_over_few_channels_trains_in_the_usual_layout(capsys):
    """oneDNN's channels-last weight gradient of such a layer corrupts memory: the module keeps the usual layout."""
    from pnp.training.layout import channels_last_hazard

    seen = []

    class Spy(nn.Module):
        def forward(self, x):
            seen.append(x.is_contiguous())
            return x

    pl.seed_everything(0)
    model = nn.Sequential(Spy(), nn.Conv2d(3, 7, 3, padding=1), nn.ReLU(), nn.Conv2d(7, 8, 1, stride=2),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    assert "'3'" in channels_last_hazard(model) and "7 input channels" in channels_last_hazard(model)
    assert channels_last_hazard(nn.Conv2d(16, 8, 1, stride=2)) is None
    assert channels_last_hazard(nn.Conv2d(7, 8, 1, stride=1)) is None
    g = torch.Generator().manual_seed(0)
    loader = DataLoader(TensorDataset(torch.randn(32, 3, 8, 8, generator=g), torch.randint(0, 4, (32,), generator=g)),
                        batch_size=16)
    trainer().fit(ClassifierModule(model, lr=0.05, epochs=1, channels_last=True), loader)
    assert seen and all(seen)  # every batch stayed in the usual layout
    assert "training in the usual memory layout, not channels-last" in capsys.readouterr().out


def test_shared_teacher_outputs_run_the_teacher_once_and_not_on_augmented_data(tmp_path):
    """The look-ahead and the fine-tuning of one run share one pass of the teacher; augmented images change every
    epoch, so there they get nothing fixed and each stage runs the teacher as before."""
    from types import SimpleNamespace

    from tests.test_data import make_fashion_mnist, no_system_fashion_mnist  # noqa: F401
    from pnp.cli.stages import SharedTeacherOutputs
    from pnp.training.data import build_datamodule

    make_fashion_mnist(tmp_path / "fm", gz=True, n_train=96)
    teacher = nn.Sequential(nn.Conv2d(1, 4, 5, stride=4), nn.ReLU(), nn.Flatten(), nn.Linear(144, 10))
    calls = []
    teacher.register_forward_hook(lambda *args: calls.append(1))
    for augment, expected in ((False, (80, 10)), (True, None)):
        dm = build_datamodule("fashion_mnist", root=tmp_path / "fm", val_size=16, batch_size=16, augment=augment)
        shared = SharedTeacherOutputs(teacher, SimpleNamespace(module=dm), channels_last=False)
        calls.clear()
        first, again = shared.get("prune"), shared.get("finetune")
        assert shared.computed_in == "prune"
        if expected is None:
            assert first is None and again is None and calls == []
        else:
            assert tuple(first.shape) == expected and again is first and len(calls) == 1  # one pass of 80 images
