"""Weight inheritance: the learned widths, with the channels a short fine-tuning look-ahead prefers."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

import pnp
from pnp.core.readout import reselect_keep
from pnp.core.surgery import apply_surgery
from pnp.core.criteria import CriterionNotApplicableError
from pnp.training.inherit import (
    candidate_keeps, check_inherit, choose_inheritance, lookahead_accuracy, rival_widths, select_inheritance,
)


class TinyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.relu(self.conv(x))), 1))


def half_dead_cnn() -> TinyCNN:
    """Channels 0-3 are dead (zero filters, biases and classifier columns: no gradient can revive them); 4-7 respond to brightness."""
    torch.manual_seed(0)
    model = TinyCNN()
    with torch.no_grad():
        model.conv.weight.abs_()
        model.conv.weight[:4] = 0
        model.conv.bias.zero_()
        model.fc.weight[:, :4] = 0
    return model.eval()


def brightness_data(n: int = 256, seed: int = 0) -> TensorDataset:
    """Two classes: class 1 images are brighter. Linearly separable from pooled positive filter responses."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.randn(n, 1, 8, 8, generator=g) * 0.3 + y.view(-1, 1, 1, 1).float()
    return TensorDataset(x, y)


@pytest.fixture
def setup():
    model = half_dead_cnn()
    example = torch.randn(2, 1, 8, 8)
    groups = pnp.find_channel_groups(model, example)
    dead = torch.tensor([True] * 4 + [False] * 4)
    train = brightness_data(256, seed=0)
    held_out = DataLoader(brightness_data(200, seed=1), batch_size=50)

    def train_loader():
        return DataLoader(train, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0))

    return model, example, groups, {"conv": dead}, train_loader, held_out


def test_reselect_keeps_each_width_and_takes_the_most_important(setup):
    _, _, groups, keep, _, _ = setup
    importance = {"conv": torch.tensor([0.0, 1, 2, 3, 9, 8, 7, 6])}
    chosen, _ = reselect_keep(groups, keep, importance)
    assert chosen["conv"].tolist() == [False] * 4 + [True] * 4
    assert int(chosen["conv"].sum()) == int(keep["conv"].sum())


def test_reselect_leaves_unscored_groups_and_rejects_a_wrong_shape(setup):
    _, _, groups, keep, _, _ = setup
    chosen, _ = reselect_keep(groups, keep, {})
    assert torch.equal(chosen["conv"], keep["conv"])
    with pytest.raises(ValueError, match=r"importance\['conv'\] has shape \(3,\); expected \(8,\)"):
        reselect_keep(groups, keep, {"conv": torch.ones(3)})


def test_candidates_keep_the_widths_and_say_why_one_does_not_apply(setup):
    model, _, groups, keep, _, _ = setup
    keeps, skipped = candidate_keeps(model, groups, keep, ["learned", "l1", "bn_scale"])
    assert torch.equal(keeps["learned"]["conv"], keep["conv"])
    assert keeps["l1"]["conv"].tolist() == [False] * 4 + [True] * 4  # the live filters have the larger L1 norms
    assert "bn_scale" in skipped and "BatchNorm" in skipped["bn_scale"]


def test_lookahead_chooses_the_channels_that_fine_tune_better(setup):
    """The pruner's picks here are dead channels: fine-tuning cannot revive them, and the look-ahead sees it."""
    model, example, groups, keep, train_loader, held_out = setup
    before = {k: v.clone() for k, v in model.state_dict().items()}
    chosen = choose_inheritance(
        model, groups, keep, example, ["learned", "l1"], train_loader, held_out, steps=40, lr=0.1
    )
    assert chosen.choice == "l1"
    assert chosen.scores["l1"] > 90.0
    assert chosen.scores["learned"] < 65.0  # no better than guessing the majority class
    assert chosen.keep["conv"].tolist() == [False] * 4 + [True] * 4
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "the target was changed"
    again = choose_inheritance(model, groups, keep, example, ["learned", "l1"], train_loader, held_out, steps=40, lr=0.1)
    assert again.scores == chosen.scores  # same batches, same seed: the same comparison


def test_distilled_lookahead_learns_from_the_teacher_it_is_given_not_the_target_it_cuts(setup):
    """A target that adapted beside the pruner is cut, but the look-ahead, like the fine-tuning after it, distils
    from the original: the scores are those of candidates distilled from the teacher given."""
    model, example, groups, keep, train_loader, held_out = setup
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(-1.0)  # a teacher that says something else
    keeps, _ = candidate_keeps(model, groups, keep, ["learned", "l1"])
    scores = {}
    for label, teacher in (("target", model), ("other", other)):
        scores[label] = {}
        for name, k in keeps.items():
            pruned = apply_surgery(copy.deepcopy(model), groups, k, example, verify=False)
            scores[label][name] = lookahead_accuracy(pruned, train_loader(), held_out, steps=20, lr=0.1, teacher=teacher,
                                                     kd_weight=3.0)
    assert scores["target"] != scores["other"]  # the teacher matters here
    given = choose_inheritance(model, groups, keep, example, ["learned", "l1"], train_loader, held_out, steps=20, lr=0.1,
                               kd_weight=3.0, teacher=other)
    default = choose_inheritance(model, groups, keep, example, ["learned", "l1"], train_loader, held_out, steps=20,
                                 lr=0.1, kd_weight=3.0)
    assert given.scores == scores["other"] and default.scores == scores["target"]


def test_distilled_lookahead_runs_the_teacher_once_for_all_candidates(setup):
    """Every candidate trains on the same batches, so the teacher's logits of the first serve the others:
    the scores are those of candidates distilled one by one, and a loader that changes its batches is refused."""
    model, example, groups, keep, train_loader, held_out = setup
    rival = {"conv": torch.tensor([False] * 5 + [True] * 3)}
    keeps, _ = candidate_keeps(model, groups, keep, ["learned", "l1"])
    alone = {}
    for name, k in {**keeps, "widths:l1": rival}.items():
        pruned = apply_surgery(copy.deepcopy(model), groups, k, example, verify=False)
        alone[name] = lookahead_accuracy(pruned, train_loader(), held_out, steps=20, lr=0.1, teacher=model, kd_weight=1.0)

    # the hook is copied into the teacher and the candidates; uncut, only the teacher (and surgery's tracing) runs
    full_width, runs = model.conv.out_channels, []
    hook = model.register_forward_hook(lambda m, *_: runs.append(1) if m.conv.out_channels == full_width else None)
    counts = {}
    try:
        for kd_weight in (0.0, 1.0):
            runs.clear()
            chosen = choose_inheritance(model, groups, keep, example, ["learned", "l1"], train_loader, held_out,
                                        steps=20, lr=0.1, kd_weight=kd_weight, rivals={"widths:l1": rival})
            counts[kd_weight] = len(runs)
    finally:
        hook.remove()
    assert chosen.scores == alone
    assert counts[1.0] - counts[0.0] == 20  # the teacher once a step, not once a step and candidate

    kept: list = []
    lookahead_accuracy(copy.deepcopy(model), train_loader(), held_out, steps=3, teacher=model, kd_weight=1.0,
                       teacher_outputs=kept)
    other_batches = DataLoader(TensorDataset(*brightness_data(96, seed=7).tensors), batch_size=32)
    with pytest.raises(RuntimeError, match="look-ahead step 0 got other batches"):
        lookahead_accuracy(copy.deepcopy(model), other_batches, held_out, steps=3, teacher=model, kd_weight=1.0,
                           teacher_outputs=kept)


def test_lookahead_reads_the_teachers_logits_from_batches_that_carry_them(setup):
    """Batches with a third item (the teacher's logits, computed once for the run's fine-tuning too) train the
    candidate as the teacher's own pass does, and the teacher does not run; other logits train it otherwise."""
    model, example, groups, keep, train_loader, held_out = setup
    (k,) = candidate_keeps(model, groups, keep, ["l1"])[0].values()
    x, y = train_loader().dataset.tensors
    with torch.no_grad():
        logits = model.eval()(x)

    def carrying(outputs):
        return DataLoader(TensorDataset(x, y, outputs), batch_size=32, shuffle=True,
                          generator=torch.Generator().manual_seed(0))

    def trained(loader, teacher):  # the candidate's accuracy and its weights after the look-ahead
        pruned = apply_surgery(copy.deepcopy(model), groups, k, example, verify=False)
        accuracy = lookahead_accuracy(pruned, loader, held_out, steps=20, lr=0.1, teacher=teacher, kd_weight=3.0,
                                      channels_last=False)
        return accuracy, torch.cat([p.detach().flatten() for p in pruned.parameters()])

    teacher, runs = copy.deepcopy(model), []
    teacher.register_forward_hook(lambda *_: runs.append(1))
    live = trained(train_loader(), teacher)
    assert len(runs) == 20  # once a step
    runs.clear()
    carried = trained(carrying(logits), teacher)
    assert runs == []  # the teacher never ran
    assert carried[0] == live[0]
    torch.testing.assert_close(carried[1], live[1])
    other = trained(carrying(-logits), teacher)[1]  # the carried logits are what it learns from
    assert not torch.allclose(other, live[1], atol=1e-3)


def test_a_criterions_own_widths_compete_with_the_learned_widths(setup):
    """A rival (a criterion's read-out, with widths of its own) is scored after the candidates at the learned
    widths; when it fine-tunes better, its decisions are taken as they are, widths and all."""
    model, example, groups, keep, train_loader, held_out = setup  # keep: the four dead channels
    rival = {"conv": torch.tensor([False] * 5 + [True] * 3)}  # three live channels: another width
    chosen = choose_inheritance(model, groups, keep, example, ["learned"], train_loader, held_out,
                                steps=40, lr=0.1, rivals={"widths:l1": rival})
    assert list(chosen.scores) == ["learned", "widths:l1"]
    assert chosen.choice == "widths:l1" and torch.equal(chosen.keep["conv"], rival["conv"])
    assert chosen.scores["widths:l1"] > 90.0 > chosen.scores["learned"]
    level = choose_inheritance(model, groups, keep, example, ["learned"], train_loader, held_out,
                               steps=40, lr=0.1, rivals={"widths:l1": keep})
    assert level.choice == "learned"  # a tie goes to the learned widths


def test_selection_takes_the_best_score_and_on_a_tie_the_earlier_candidate():
    """The choice any task's look-ahead feeds: every candidate scored once, in order; skipped ones recorded."""
    keeps = {name: {"conv": torch.arange(4) % (i + 2) == 0} for i, name in enumerate(["learned", "l1", "magnitude"])}
    scored = []

    def score(name, keep):
        scored.append(name)
        return {"learned": 30.0, "l1": 52.5, "magnitude": 52.5}[name]

    chosen = select_inheritance(keeps, score, {"bn_scale": "no BatchNorm"}, steps=7, metric="AP")
    assert scored == ["learned", "l1", "magnitude"]
    assert chosen.choice == "l1" and torch.equal(chosen.keep["conv"], keeps["l1"]["conv"])
    assert chosen.to_dict() == {"choice": "l1", "lookahead_AP": {"learned": 30.0, "l1": 52.5, "magnitude": 52.5},
                                "skipped": {"bn_scale": "no BatchNorm"}, "steps": 7}
    level = select_inheritance(keeps, lambda name, keep: 0.0)
    assert level.choice == "learned" and set(level.to_dict()) == {"choice", "lookahead_accuracy", "skipped", "steps"}
    # one candidate left (the others skipped): taken as it is, no look-ahead trained for it
    only = select_inheritance({"magnitude": keeps["magnitude"]}, score, {"widths:magnitude": "no budget"}, steps=7)
    assert scored == ["learned", "l1", "magnitude"]  # score was not called again
    assert only.to_dict() == {"choice": "magnitude", "lookahead_accuracy": {}, "skipped": {"widths:magnitude": "no budget"},
                              "steps": 0}
    with pytest.raises(ValueError, match=r"none of the inheritance candidates \['bn_scale'\] applies"):
        select_inheritance({}, score, {"bn_scale": "no BatchNorm"})


def test_rival_widths_are_read_out_at_the_budget_and_the_ones_not_tried_say_why():
    """Both tasks' rivals: each criterion's read-out, named widths:CRITERION; without a budget none, naming the setting."""
    keep = {"conv": torch.arange(8) < 3}

    def read_out(criterion):
        if criterion == "bn_scale":
            raise CriterionNotApplicableError("the model has no BatchNorm")
        return keep, {"threshold": 0.5}

    rivals, skipped = rival_widths(["magnitude", "bn_scale", "magnitude"], 0.3, read_out)
    assert list(rivals) == ["widths:magnitude"] and rivals["widths:magnitude"][1] == {"threshold": 0.5, "criterion": "magnitude"}
    assert torch.equal(rivals["widths:magnitude"][0]["conv"], keep["conv"])
    assert skipped == {"widths:bn_scale": "the model has no BatchNorm"}
    rivals, skipped = rival_widths(["magnitude"], None, read_out, budget_field="readout.budget")
    assert rivals == {} and skipped["widths:magnitude"].startswith("no readout.budget:")


def test_lookahead_trains_the_model(setup):
    model, _, _, _, train_loader, held_out = setup
    from pnp.training.report import evaluate_accuracy

    trained = half_dead_cnn()
    start = evaluate_accuracy(trained, held_out)
    assert lookahead_accuracy(trained, train_loader(), held_out, steps=40, lr=0.1) > max(start, 90.0)
    with pytest.raises(ValueError, match="inherit.steps 0 must be >= 1"):
        lookahead_accuracy(trained, train_loader(), held_out, steps=0)


def test_distilled_lookahead_follows_the_teacher(setup):
    _, _, _, _, train_loader, held_out = setup
    x, y = brightness_data(256, seed=0).tensors
    reversed_teacher = half_dead_cnn()  # taught the opposite labels: distilling from it must pull the student away
    flipped = DataLoader(TensorDataset(x, 1 - y), batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0))
    assert lookahead_accuracy(reversed_teacher, flipped, held_out, steps=40, lr=0.1) < 10.0
    plain = lookahead_accuracy(half_dead_cnn(), train_loader(), held_out, steps=40, lr=0.01)
    distilled = lookahead_accuracy(half_dead_cnn(), train_loader(), held_out, steps=40, lr=0.01,
                                   teacher=reversed_teacher, kd_weight=5.0)
    assert plain > 90.0 > 10.0 > distilled
    with pytest.raises(ValueError, match="inherit.kd_weight 1.0 > 0 needs a teacher"):
        lookahead_accuracy(half_dead_cnn(), train_loader(), held_out, steps=1, kd_weight=1.0)


@pytest.mark.parametrize(
    "choice, candidates, message",
    [
        ("best", ["learned"], "inherit.choice 'best' is not one of"),
        ("auto", [], "inherit.candidates is empty"),
        ("auto", ["learned", "l7"], "inherit.candidates has 'l7'"),
    ],
)
def test_bad_choice_or_candidate_is_named(choice, candidates, message):
    with pytest.raises(ValueError, match=message):
        check_inherit(choice, candidates)


def test_lookahead_benchmark_times_both_ways_and_finds_the_same_scores(tmp_path):
    import json

    from test_criteria import _bench_module

    bench = _bench_module("bench_lookahead")
    out = tmp_path / "lookahead.json"
    result = bench.main(["--model", "lenet5", "--steps", "2", "--batch-size", "16", "--repeats", "2", "--out", str(out)])
    assert result["scores_equal"] is True and len(result["seconds"]["teacher_once"]) == 2
    assert json.loads(out.read_text())["ratio"] == pytest.approx(result["ratio"])
    with pytest.raises(SystemExit, match=r"--keep 1.5 is outside \(0, 1\]"):
        bench.main(["--keep", "1.5", "--out", str(out)])


class ShortcutCNN(nn.Module):
    """A pruned ResNet's shortcut: a strided 1x1 convolution over 4 input channels (oneDNN issue #6035)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.shortcut = nn.Conv2d(4, 8, 1, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(torch.relu(self.shortcut(torch.relu(self.conv(x))))), 1))


def test_lookahead_trains_channels_last_as_fine_tuning_does_and_gives_the_models_back_as_they_were(setup):
    """The look-ahead runs in the memory format fine-tuning runs in (twice as fast for MobileNetV2 on a CPU):
    the candidates score as in the usual layout, the student and teacher come back in the usual layout,
    and a model whose channels-last weight gradient oneDNN gets wrong trains in the usual layout."""
    from pnp.training.layout import training_layout

    model, example, groups, keep, train_loader, held_out = setup
    seen = []
    student = copy.deepcopy(model)
    hook = student.pool.register_forward_pre_hook(  # the convolution's output: its layout follows the weights'
        lambda m, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last)
                                    and not args[0].is_contiguous()))
    scores = {}
    for channels_last in (False, True):
        seen.clear()
        pruned = copy.deepcopy(student)
        teacher = copy.deepcopy(model)
        scores[channels_last] = lookahead_accuracy(pruned, train_loader(), held_out, steps=20, lr=0.1, teacher=teacher,
                                                   kd_weight=1.0, channels_last=channels_last)
        assert set(seen) == {channels_last}  # every batch, training and evaluation, in the asked layout
        for m in (pruned, teacher):
            assert all(p.is_contiguous() for p in m.parameters())
    hook.remove()
    assert scores[True] == pytest.approx(scores[False], abs=1.0)  # 200 held-out images: at most 2 flip on rounding

    assert training_layout(model, True) == torch.channels_last
    assert training_layout(model, False) == torch.contiguous_format
    assert training_layout(ShortcutCNN(), True) == torch.contiguous_format
