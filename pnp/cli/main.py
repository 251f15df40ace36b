"""The ``pnp-*`` commands: compose and check a config, then run one stage or all four.

Each command is a Hydra app over the ``configs/`` tree. Its output directory is
``out_dir`` (``hydra.run.dir``); the resolved config is written to
``<out_dir>/.hydra/config.yaml`` once every input has been checked, so a rejected
command leaves an existing directory untouched.
"""

from __future__ import annotations

import copy
import errno
import os
import sys
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from pnp.cli.config import ConfigError, InputError, config_dir, register_schemas, validate
from pnp.cli.loading import read_keep_file
from pnp.training.runs import DEBUG_VARIABLE, RESUME_HINT, StageConflictError, interrupted_status, interrupts_recorded, is_global_zero
from pnp.core.io import read_json, write_json_atomic, write_text_atomic

REPORT_FILE = "report.json"
STAGES = ("train", "train_pruner", "prune", "finetune")
COMMANDS = {
    "train": "pnp-train",
    "train_pruner": "pnp-train-pruner",
    "prune": "pnp-prune",
    "finetune": "pnp-finetune",
    "pipeline": "pnp-pipeline",
}


def _user_errors():
    from lightning_fabric.utilities.exceptions import MisconfigurationException

    from pnp.core.artifacts import ArtifactError
    from pnp.training.data import DatasetNotFoundError

    return (InputError, StageConflictError, ArtifactError, DatasetNotFoundError, MissingMandatoryValue,
            MisconfigurationException)


# a file that cannot be written for one of these reasons is the machine's or the user's
# to fix (space, permissions, a path through a file), not a fault of pnp
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR}


def _user_message(exc: BaseException) -> str | None:
    """What to tell the user about ``exc`` when it is theirs to fix; None for an internal error."""
    from lightning_fabric.utilities.exceptions import MisconfigurationException

    if isinstance(exc, OSError) and not isinstance(exc, _user_errors()) and exc.errno in _WRITE_ERRNOS:
        where = f" {exc.filename}" if exc.filename else ""
        return f"cannot write{where}: {exc.strerror}; free some space or choose a writable out_dir"
    if not isinstance(exc, _user_errors()):
        return None
    message = str(exc).strip()
    if isinstance(exc, OmegaConfBaseException):
        message = message.splitlines()[0] + "".join(
            f" ({line.strip()})" for line in message.splitlines()[1:] if "full_key" in line
        )
    if isinstance(exc, MisconfigurationException):  # Lightning's word on a trainer.* value
        message = f"the trainer settings do not fit the data: {message.splitlines()[0]} (set it as trainer.<name>=...)"
    return message


def _check_out_dir(argv: list[str]) -> str | None:
    """Why the ``out_dir=`` of ``argv`` cannot be a run directory, or None (checked before Hydra creates it)."""
    given = [a.split("=", 1)[1] for a in argv if a.startswith("out_dir=")]
    if not given or not given[-1]:
        return None
    path = Path(given[-1]).expanduser()
    if path.exists() and not path.is_dir():
        return f"out_dir={given[-1]!r}: is a file, not a directory; choose a directory"
    parent = path
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        return f"out_dir={given[-1]!r}: {parent} is a file, so no directory can be made under it; choose another out_dir"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"out_dir={given[-1]!r}: {parent} is not writable; choose a writable out_dir"
    return None


def write_resolved_config(cfg: DictConfig, run_dir: Path) -> None:
    """``.hydra/config.yaml`` (resolved) and ``.hydra/overrides.yaml``, as Hydra would write them."""
    if not is_global_zero():
        return
    write_text_atomic(run_dir / ".hydra" / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    try:
        from hydra.core.hydra_config import HydraConfig

        overrides = list(HydraConfig.get().overrides.task)
    except ValueError:  # not started by Hydra (tests call run() directly)
        overrides = []
    write_text_atomic(run_dir / ".hydra" / "overrides.yaml", OmegaConf.to_yaml(OmegaConf.create(overrides)))


def _say(message: str) -> None:
    if is_global_zero():
        print(message, flush=True)


# ---------------------------------------------------------------- the commands


def run(command: str, cfg: DictConfig, run_dir: str | Path) -> dict:
    """Run ``command`` (a key of :data:`COMMANDS`) with a composed config into ``run_dir``; return its report."""
    from pnp.cli import stages

    run_dir = Path(run_dir).resolve()
    for key in _required(command):
        if OmegaConf.is_missing(cfg, key):
            raise ConfigError(key, "???", f"is required: pass {key}=<path> on the command line")
    validate(cfg, command)
    data = stages.build_data(cfg)
    if command in ("train", "pipeline"):
        stages.check_builder(data)
    return {
        "train": _train,
        "train_pruner": _train_pruner,
        "prune": _prune,
        "finetune": _finetune,
        "pipeline": _pipeline,
    }[command](cfg, run_dir, data)


def _required(command: str) -> tuple[str, ...]:
    return {"train_pruner": ("target",), "prune": ("target",), "finetune": ("pruned",)}.get(command, ())


def _input(path: str | None) -> dict | None:
    """A stage input as its record holds it: where it was and, by content, what it held."""
    from pnp.core.io import content_digest

    if path is None:
        return None
    return {"path": _abs(path), "content": content_digest(Path(path).expanduser())}


def _abs(path: str | None) -> str | None:
    return None if path is None else str(Path(path).expanduser().resolve())


def _train(cfg, run_dir: Path, data) -> dict:
    from pnp.cli import stages

    stage = stages.stage_dir(run_dir, "train", stages.what_config(cfg, "model", "data", "train"), data)
    state = stage.check()
    if state != "done":  # a finished stage keeps the record of the run that made it
        write_resolved_config(cfg, run_dir)
    result = stages.train(cfg, data, stage, state)
    _say(_table(baseline=result.report.get("model"), stage_reports={"train": result.report}))
    _say_paths(run_dir, result.report, [])
    return result.report


def _train_pruner(cfg, run_dir: Path, data) -> dict:
    from pnp.cli import stages

    target = stages.target_from(cfg, data)
    stages.check_readout(cfg, data)
    stage = stages.stage_dir(run_dir, "train_pruner", stages.what_config(cfg, "model", "data", "pruner", "readout", target=_input(cfg.target)), data)
    state = stage.check()
    if state != "done":  # a finished stage keeps the record of the run that made it
        write_resolved_config(cfg, run_dir)
    result = stages.train_pruner(cfg, data, stage, state, target, readout=True)
    info = result.report.get("readout", {})
    if info:
        _say(
            f"[pnp] keep decisions: {info['channels_kept']}/{info['channels_total']} channels, "
            f"predicted FLOPs kept {100 * info['flops_fraction']:.1f}%, params kept {100 * info['params_fraction']:.1f}% "
            f"-> {run_dir / stages.KEEP_FILE}"
        )
    _say_paths(run_dir, result.report, [])
    return result.report


def _prune(cfg, run_dir: Path, data) -> dict:
    from pnp.cli import stages

    target = stages.target_from(cfg, data)
    groups = stages.find_groups(cfg, data, target)
    original = None
    if cfg.keep is not None:
        keep, info = read_keep_file("keep", cfg.keep, groups), {"source": _abs(cfg.keep)}
    elif cfg.criterion is not None:
        scores = stages.criterion_scores(cfg, data, target, groups, cfg.criterion)
        keep, info = stages.read_out(cfg, groups, scores, ("criterion", cfg.criterion))
        info["criterion"] = cfg.criterion
    else:
        keep, info = stages.read_out(cfg, groups, stages.scores_from(cfg), ("pruner_run", cfg.pruner_run))
        adapted = stages.adapted_target(Path(cfg.pruner_run), data)
        if adapted is not None:  # the target learned beside the pruner: cut from it, compare with the original
            _say(f"[pnp] cutting the target as it adapted beside the pruner ({Path(cfg.pruner_run) / stages.ADAPTED_DIR})")
            original, target = target, adapted
    # the criterion picks the channels itself: no inheritance settings decide the result
    sections = ("model", "data", "readout") + (("inherit",) if cfg.criterion is None else ())
    by_criterion = {"criterion": cfg.criterion} if cfg.criterion is not None else {}
    stage = stages.stage_dir(run_dir, "prune", stages.what_config(
        cfg, *sections, verify=cfg.verify, norm_samples=cfg.norm_samples, target=_input(cfg.target),
        pruner_run=_input(cfg.pruner_run), keep=_input(cfg.keep), **by_criterion,
    ), data)
    state = stage.check()
    if state != "done":  # a finished stage keeps the record of the run that made it
        write_resolved_config(cfg, run_dir)
    # a keep file or a criterion's picks are cut as they are; decisions read out of a pruner run
    # get their weights as cfg.inherit says
    # the report compares with the original target, also when an adapted one is cut
    before = stages.summarize(original, data, cfg) if original is not None and state != "done" else None
    result = stages.prune(cfg, data, stage, state, target, groups, keep, info, before=before,
                          inherit_weights=cfg.pruner_run is not None, teacher=original)
    r = result.report
    _say(_table(baseline=r.get("before"), pruned=r.get("after"), stage_reports={"prune": r}))
    _say_paths(run_dir, r, [Path(p) for p in r.get("plots", {}).values()])
    return r


def _finetune(cfg, run_dir: Path, data) -> dict:
    from pnp.cli import stages

    pruned = stages.pruned_from(cfg, data)
    teacher = stages.target_from(cfg, data, "teacher") if cfg.teacher is not None else None
    stage = stages.stage_dir(run_dir, "finetune", stages.what_config(
        cfg, "data", "finetune", pruned=_input(cfg.pruned), teacher=_input(cfg.teacher),
    ), data)
    state = stage.check()
    if state != "done":  # a finished stage keeps the record of the run that made it
        write_resolved_config(cfg, run_dir)
    before = stages.summarize(pruned, data, cfg) if state != "done" else None
    result = stages.finetune(cfg, data, stage, state, copy.deepcopy(pruned), teacher, before=before)
    r = result.report
    baseline = stages.summarize(teacher, data, cfg) if teacher is not None else None  # the unpruned model, for comparison
    _say(_table(baseline=baseline, pruned=r.get("before"), finetuned=r.get("model"), stage_reports={"finetune": r}))
    _say_paths(run_dir, r, [])
    return r


def _pipeline(cfg, run_dir: Path, data) -> dict:
    """train -> train_pruner -> prune -> finetune, skipping stages finished before with the same config."""
    from pnp.cli import stages

    dirs = {
        "train": stages.stage_dir(run_dir / "train", "train", stages.what_config(cfg, "model", "data", "train"), data),
        "train_pruner": stages.stage_dir(run_dir / "train_pruner", "train_pruner", stages.what_config(cfg, "model", "data", "pruner"), data),
        "prune": stages.stage_dir(run_dir / "prune", "prune", stages.what_config(cfg, "model", "data", "readout", "inherit", verify=cfg.verify,
                                                                      norm_samples=cfg.norm_samples), data),
        "finetune": stages.stage_dir(run_dir / "finetune", "finetune", stages.what_config(cfg, "data", "finetune"), data),
    }
    states = {name: d.check() for name, d in dirs.items()}
    for i, name in enumerate(STAGES):
        later_done = [s for s in STAGES[i + 1:] if states[s] == "done"]
        if states[name] != "done" and later_done:
            raise StageConflictError(
                f"stage {later_done[0]!r} in {dirs[later_done[0]].path} finished, but stage {name!r} before it did not: "
                f"its results would be stale. Delete {', '.join(str(dirs[s].path) for s in later_done)} or choose another out_dir"
            )
    if all(state == "done" for state in states.values()) and (run_dir / REPORT_FILE).is_file():
        # nothing runs: the recorded config and report stay those of the run that made the results
        report = read_json(run_dir / REPORT_FILE)
        _say(f"[pnp] every stage finished in an earlier run; nothing was run, and {run_dir / REPORT_FILE} and "
             f"{run_dir / '.hydra' / 'config.yaml'} are kept as that run wrote them")
        _say(_table(report.get("before"), report.get("pruned"), report.get("after")))
        return report
    stages.check_readout(cfg, data)
    write_resolved_config(cfg, run_dir)
    what = {
        "train": f"training the target ({cfg.train.epochs} epochs)",
        "train_pruner": f"training the pruner network ({cfg.pruner.epochs} epoch(s), or {cfg.pruner.min_steps} steps where those are more)",
        "prune": "surgery",
        "finetune": f"fine-tuning the pruned model ({cfg.finetune.epochs} epochs)",
    }

    def announce(name: str) -> None:
        how = {"done": "finished in an earlier run, skipped", "resume": "resuming from its last checkpoint: ", "new": ""}[states[name]]
        _say(f"[pnp] stage {STAGES.index(name) + 1}/4 {name}: {how}{what[name] if states[name] != 'done' else ''} -> {dirs[name].path}")

    start = time.perf_counter()
    announce("train")
    r_train = stages.train(cfg, data, dirs["train"], states["train"])
    target = r_train.model
    announce("train_pruner")
    r_pruner = stages.train_pruner(cfg, data, dirs["train_pruner"], states["train_pruner"], copy.deepcopy(target), readout=False)
    groups = keep = info = None
    if states["prune"] != "done":
        groups = stages.find_groups(cfg, data, target)
        keep, info = stages.read_out(cfg, groups, r_pruner.scores, ("pruner scores", str(dirs["train_pruner"].path)))
    announce("prune")
    # with pruner.target_lr the target adapted beside the pruner, and that is what is cut
    cut_from = r_pruner.model if r_pruner.model is not None else target
    if r_pruner.model is not None and states["prune"] != "done":
        _say("[pnp] cutting the target as it adapted beside the pruner (pruner.target_lr); fine-tuning distils from the original")
    # the look-ahead and the fine-tuning distil from the same target: its logits are computed once for both
    shared = stages.shared_teacher_outputs(cfg, data, target, states)
    r_prune = stages.prune(cfg, data, dirs["prune"], states["prune"], copy.deepcopy(cut_from), groups, keep, info,
                           before=r_train.report.get("model"), teacher=target, shared=shared)
    teacher = copy.deepcopy(target) if cfg.finetune.kd_weight > 0 else None
    announce("finetune")
    r_finetune = stages.finetune(cfg, data, dirs["finetune"], states["finetune"], copy.deepcopy(r_prune.model), teacher,
                                 shared=shared)
    results = {"train": r_train, "train_pruner": r_pruner, "prune": r_prune, "finetune": r_finetune}

    report = {
        "status": "done",
        "model": cfg.model.name,
        "data": cfg.data.name,
        "before": r_train.report.get("model"),
        "pruned": r_prune.report.get("after"),
        "after": r_finetune.report.get("model"),
        "readout": r_prune.report.get("readout"),
        "channels_kept": r_prune.report.get("channels_kept"),
        "channels_total": r_prune.report.get("channels_total"),
        "stages": {n: {"time_s": r.report.get("time_s"), "skipped": r.skipped, "dir": str(dirs[n].path)} for n, r in results.items()},
        "wall_time_s": time.perf_counter() - start,
        "tensorboard": str(run_dir),
        "pruned_model": str(dirs["finetune"].path / "model"),
    }
    if is_global_zero():
        report["plots"] = stages.write_plots(
            run_dir, target, report["channels_kept"], report["channels_total"],
            [("baseline", report["before"]), ("pruned", report["pruned"]), ("fine-tuned", report["after"])],
        )
        write_json_atomic(run_dir / REPORT_FILE, report)
        timing = {n: {**r.report, "skipped": r.skipped} for n, r in results.items()}
        _say(_table(report["before"], report["pruned"], report["after"], timing))
        _say_paths(run_dir, report, [Path(p) for p in report["plots"].values()])
    return report


# ---------------------------------------------------------------- console


def _table(baseline=None, pruned=None, finetuned=None, stage_reports: dict | None = None) -> str:
    """The before/after table: accuracy, FLOPs, params, latency per model, then time per stage."""
    from pnp.training.report import format_before_after_table

    durations = {}
    for name, r in (stage_reports or {}).items():
        if r.get("time_s") is not None:
            durations[name + (" (earlier run)" if r.get("skipped") else "")] = r["time_s"]
    return format_before_after_table(
        {"baseline": baseline, "pruned": pruned, "finetuned": finetuned, "durations_s": durations}
    )


def _say_paths(run_dir: Path, report: dict, plots: list[Path]) -> None:
    if not is_global_zero():
        return
    lines = [f"Report:           {run_dir / REPORT_FILE}"]
    if next(run_dir.glob("**/tb"), None) is not None:
        lines.append(f"TensorBoard logs: {run_dir}  (view with: tensorboard --logdir {run_dir})")
    lines += [f"Plot:             {p}" for p in plots]
    model_dir = report.get("pruned_model") or (run_dir / "model" if (run_dir / "model").is_dir() else None)
    if model_dir:
        lines.append(f"Model:            {model_dir}  (load with pnp.core.artifacts.load_pruned)")
    print("\n".join(lines), flush=True)


# ---------------------------------------------------------------- Hydra entry points


def _entry(command: str) -> None:
    import hydra
    from hydra.core.hydra_config import HydraConfig

    register_schemas()
    name = COMMANDS[command]

    started: list[bool] = []

    def task(cfg: DictConfig) -> None:
        started.append(True)
        run_dir = Path(HydraConfig.get().runtime.output_dir)
        interrupted: list[int] = []
        try:
            with interrupts_recorded(interrupted):
                run(command, cfg, run_dir)
        except (KeyboardInterrupt, SystemExit):
            if not interrupted:  # an exit of pnp's own, or of Lightning's for another reason
                raise
            print(f"{name}: {RESUME_HINT}", file=sys.stderr, flush=True)
            sys.exit(interrupted_status(interrupted))
        except Exception as exc:
            message = _user_message(exc)
            if message is None or os.environ.get(DEBUG_VARIABLE):
                raise
            print(f"{name}: error: {message}", file=sys.stderr, flush=True)
            if run_dir.is_dir() and not any(run_dir.iterdir()):
                run_dir.rmdir()  # Hydra made it for this run; leave no empty directory behind
            sys.exit(2)

    try:
        path = str(config_dir())
    except FileNotFoundError as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        sys.exit(2)
    problem = _check_out_dir(sys.argv[1:])
    if problem is not None:
        print(f"{name}: error: {problem}", file=sys.stderr)
        sys.exit(2)
    try:
        hydra.main(config_path=path, config_name=command, version_base="1.3")(task)()
    except SystemExit as exc:
        # Hydra exits 1 both for a config it cannot compose (an unknown key, a bad
        # override: bad input) and for a crash inside the command; only the first
        # happens before the command starts
        if exc.code == 1 and not started:
            sys.exit(2)
        raise


def train() -> None:
    """pnp-train: train a baseline target."""
    _entry("train")


def train_pruner() -> None:
    """pnp-train-pruner: train the pruner against a frozen trained target and read out keep decisions."""
    _entry("train_pruner")


def prune() -> None:
    """pnp-prune: one-shot surgery from a trained pruner or given keep decisions."""
    _entry("prune")


def finetune() -> None:
    """pnp-finetune: fine-tune a pruned model, optionally distilling from the unpruned target."""
    _entry("finetune")


def pipeline() -> None:
    """pnp-pipeline: all four stages in sequence, resuming any finished stage."""
    _entry("pipeline")

