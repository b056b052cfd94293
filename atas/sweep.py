"""The sweep behind `atas compare`: plan every run, say what each run folder holds, run one, and
summarise a finished one for summary.json.

Every (eps, method, seed) is one run folder OUT/runs/<method>_eps<eps>_seed<seed>. A run whose
training finished and whose eval.json matches the requested evaluation is only read; an unfinished
run resumes from its checkpoint; an evaluation that was killed resumes from its state file
(eval.state). Every config is built and checked (the methods' own option checks included) before
anything trains.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from atas.config import Config, ConfigError, Frac, load_config, method_override, parse_fraction, split_override
from atas.methods import get_method
from atas.monitor import co_reasons, co_verdict
from atas.rundir import EVAL, EVAL_STATE

# Per-epoch metrics copied into summary.json for the plots (and anyone re-plotting).
CURVE_KEYS = (
    "probe_clean",
    "probe_fgsm",
    "probe_pgd",
    "probe_pgd_margin",
    "probe_pgd_worst",
    "probe_lin_err",
    "co",
    "alpha_mean",
    "alpha_min",
    "alpha_max",
    "train_loss",
    "train_adv_acc",
    "epoch_time_s",
)


# --------------------------------------------------------------------------------------------
# Input: eps, overrides -> one checked Config per run
# --------------------------------------------------------------------------------------------


def _passes(cfg) -> list[float] | None:
    """(forward, backward) passes per optimizer step of the run's method with its options."""
    import warnings

    from atas.methods import get_method
    from atas.values import build_dataclass

    cls = get_method(cfg.method.name)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opts = build_dataclass(cls.Options, dict(cfg.method.args), "method.")
            return list(cls(cfg.method.eps, opts).passes_per_step())
    except Exception:  # noqa: BLE001 - an old run's options the class no longer takes: unknown
        return None


def parse_eps(text: str | Frac) -> Frac:
    """An eps from the command line, parsed once: '8/255' stays '8/255', '0.10' becomes '0.1' (the
    name of its folders and table rows). The Frac is the one the runs' configs hold."""
    if isinstance(text, Frac):
        return text
    return Frac(text) if "/" in text else Frac(parse_fraction(text))


@dataclass
class RoutedOverrides:
    common: list[str]  # for every run
    per_method: dict[str, list[str]]  # method -> its `method.<opt>=v` overrides
    notes: list[str] = field(default_factory=list)


def route_overrides(overrides: list[str], methods: list[str]) -> RoutedOverrides:
    """Split the command line's key=value overrides by the runs they reach (the grammar:
    atas.config.method_override).

    method.<opt>=v goes to every method whose Options has <opt> (an option none has is a typo:
    error); <method>.<opt>=v and method.<method>.<opt>=v go to that method only, as method.<opt>=v,
    after the generic ones so they win; a prefix naming a method not compared is ignored with a
    note. Anything else is common to all runs."""
    from atas.methods import list_methods

    options = {m: [f.name for f in dataclasses.fields(get_method(m).Options)] for m in methods}
    routed = RoutedOverrides([], {m: [] for m in methods})
    targeted: dict[str, list[str]] = {m: [] for m in methods}
    for item in overrides:
        key, value = split_override(item)
        if key == "method.name":
            raise ConfigError("method.name: `atas compare` sets it per run; give the methods with --methods")
        target = method_override(key, list_methods())
        if target is None:
            routed.common.append(item)
        elif target[0] is None:
            _route_generic(target[1], value, methods, options, routed)
        elif target[0] not in list_methods():
            raise ConfigError(f"{key}: {target[0]!r} is not a method; valid: {', '.join(list_methods())}")
        elif target[0] not in methods:
            routed.notes.append(f"{key}: {target[0]} is not in --methods; ignored")
        elif target[1] not in options[target[0]]:
            raise ConfigError(
                f"{key}: method {target[0]} has no option {target[1]!r}; its options: "
                f"{', '.join(options[target[0]]) or '(none)'}"
            )
        else:
            targeted[target[0]].append(f"method.{target[1]}={value}")
    for m in methods:  # the targeted ones last: they win
        routed.per_method[m] += targeted[m]
    return routed


def _route_generic(opt: str, value: str, methods: list[str], options: dict, routed: RoutedOverrides) -> None:
    """method.<opt>=v: to every compared method that has the option; none having it is a typo."""
    takers = [m for m in methods if opt in options[m]]
    if not takers:
        have = "; ".join(f"{m}: {', '.join(options[m]) or '(none)'}" for m in methods)
        raise ConfigError(f"method.{opt}: none of the compared methods has this option ({have})")
    for m in takers:
        routed.per_method[m].append(f"method.{opt}={value}")
    skipped = [m for m in methods if m not in takers]
    if skipped:
        routed.notes.append(
            f"method.{opt} applies to {', '.join(takers)}; not to {', '.join(skipped)} (no such option)"
        )


def run_name(method: str, eps: str, seed: int) -> str:
    return f"{method}_eps{eps.replace('/', '-')}_seed{seed}"


@dataclass
class RunSpec:
    method: str
    eps: str  # as written (folders, tables); cfg.method.eps is the Frac the run uses
    seed: int
    cfg: Config
    run_dir: Path


def method_tree(base: Config, method: str) -> dict:
    """The config tree of `base` running `method` (before the run's own overrides)."""
    tree = base.to_dict()
    if method != base.method.name:
        tree["method"]["args"] = {}  # the recipe's options were written for its own method
    tree["method"]["name"] = method
    return tree


def plan_runs(
    recipe: str,
    methods: list[str],
    eps_list: list[Frac | str] | None,
    n_seeds: int,
    routed: RoutedOverrides,
    out: Path,
    chosen: dict[tuple[str, str], list[str]] | None = None,
) -> list[RunSpec]:
    """Build and validate every run's Config (eps outer, then method, then seed): every run is
    checked, the method's own option checks included, before the first one trains. `chosen` adds
    overrides per (method, eps text): the values a hyper-parameter search picked (atas.tune)."""
    base = load_config(recipe, routed.common)
    eps_values = [parse_eps(e) for e in eps_list] if eps_list else [base.method.eps]
    specs = []
    for eps in eps_values:
        for method in methods:
            tree = method_tree(base, method)
            tree["method"]["eps"] = eps  # the Frac itself, not its text again
            extra = (chosen or {}).get((method, eps.text), [])
            for i in range(n_seeds):
                seed = base.train.seed + i
                cfg = load_config(tree, routed.per_method[method] + extra + [f"train.seed={seed}"])
                specs.append(RunSpec(method, eps.text, seed, cfg, out / "runs" / run_name(method, eps.text, seed)))
    return specs


# --------------------------------------------------------------------------------------------
# What a run folder already holds
# --------------------------------------------------------------------------------------------
def _read_metrics(run_dir: Path) -> list[dict]:
    """The epochs the run's final weights descend from (the guard's events and undone epochs aside)."""
    from atas.guard import epoch_rows

    return epoch_rows(_read_log(run_dir))


def _read_log(run_dir: Path) -> list[dict]:
    from atas.rundir import MetricsLog

    return MetricsLog(run_dir).read()


def training_status(run_dir: Path, cfg: Config) -> str:
    """'fresh' (no checkpoint), 'resume' (checkpoint of an unfinished run), 'diverged' (its loss
    became NaN/inf: run again, it resumes or starts over) or 'done'.

    A folder holding a run of another config (more epochs excepted, as for `atas train --resume`)
    is an error: resuming it would mix two experiments, overwriting it would lose one."""
    from atas.checkpoint import CheckpointError, healthy_path
    from atas.rundir import CHECKPOINT, LABEL_KEYS, check_resumable, read_divergence, run_end, saved_config

    diverged = read_divergence(run_dir) is not None
    # killed in its first epoch under co_action=recover: only the epoch-0 snapshot, which resumes
    started = (run_dir / CHECKPOINT).exists() or healthy_path(run_dir / CHECKPOINT).exists()
    if not started and not diverged:
        return "fresh"
    saved = saved_config(run_dir)
    if saved is not None:
        saved.update({k: getattr(cfg, k) for k in LABEL_KEYS})
        try:
            check_resumable(saved, cfg)
        except CheckpointError as e:
            raise ConfigError(
                f"{run_dir} holds a run with another config: {e} Delete that folder or pick another --out."
            ) from None
    rows = _read_metrics(run_dir)
    if rows and rows[-1]["epoch"] > cfg.train.epochs:
        raise ConfigError(
            f"{run_dir} holds a run trained for {rows[-1]['epoch']} epochs, more than the "
            f"train.epochs={cfg.train.epochs} asked for. Delete that folder or pick another --out."
        )
    if diverged:
        return "diverged"
    return "done" if run_end(_read_log(run_dir), cfg) is not None else "resume"


@functools.cache
def _test_set_size(name: str, data_dir: str | None, download: bool, test_subset: int | None) -> int:
    from atas.data import TestSplit

    n = len(TestSplit(name, data_dir, download))
    return min(n, test_subset) if test_subset else n


def eval_is_current(run_dir: Path, cfg: Config) -> bool:
    """eval.json exists, is newer than the checkpoint, and used the requested attacks, number of
    examples, eps and PGD settings."""
    from atas.rundir import CHECKPOINT

    path, ckpt = run_dir / EVAL, run_dir / CHECKPOINT
    if not path.exists() or (ckpt.exists() and path.stat().st_mtime_ns < ckpt.stat().st_mtime_ns):
        return False
    try:
        result = json.loads(path.read_text())
        results, n = result["results"], result["n_examples"]
    except (ValueError, KeyError, TypeError):
        return False
    e, eps = cfg.eval, float(cfg.method.eps)
    if set(results) != set(e.attacks) or abs(float(result.get("eps", -1)) - eps) > 1e-12:
        return False
    wanted_n = (
        e.n_examples
        if e.n_examples is not None
        else _test_set_size(cfg.data.name, cfg.data.data_dir, cfg.data.download, cfg.data.test_subset)
    )
    if n != wanted_n:
        return False
    if "pgd" in results:
        from atas.evaluation import pgd_step

        s = results["pgd"].get("settings", {})
        alpha, schedule, loss, _ = pgd_step(eps, e.pgd_alpha, e.pgd_schedule, e.pgd_loss)
        same_alpha = abs(s.get("alpha", -1) - alpha) <= 1e-12
        # files from before schedules and losses: constant, ce
        same_schedule = (s.get("schedule", "constant"), s.get("loss", "ce")) == (schedule, loss)
        if (s.get("steps"), s.get("restarts")) != (e.pgd_steps, e.pgd_restarts) or not (same_alpha and same_schedule):
            return False
    return True


# --------------------------------------------------------------------------------------------
# One run, and what the report keeps of it
# --------------------------------------------------------------------------------------------
def train_as_needed(spec: RunSpec, stale: tuple[str, ...] = (EVAL, EVAL_STATE)):
    """Train a fresh run, resume an unfinished (or diverged) one, leave a finished one: (the trained
    model or None when nothing trained, what was done). `stale`: the run's files that belong to the
    model before this training, deleted before it starts."""
    import atas.trainer
    from atas.checkpoint import healthy_path
    from atas.rundir import CHECKPOINT, LABEL_KEYS, saved_config

    status = training_status(spec.run_dir, spec.cfg)
    if status == "diverged":  # tried again: from its last checkpoint, or from the start
        status = (
            "resume"
            if (spec.run_dir / CHECKPOINT).exists() or healthy_path(spec.run_dir / CHECKPOINT).exists()
            else "fresh"
        )
    if status == "done":
        return None, []
    cfg = spec.cfg
    if status == "resume":  # the trainer compares every key; keep the run's own labels
        saved = saved_config(spec.run_dir) or {}
        cfg = dataclasses.replace(cfg, **{k: saved[k] for k in LABEL_KEYS if k in saved})
    for name in stale:
        (spec.run_dir / name).unlink(missing_ok=True)
    # The sweep evaluates as it needs (run_one): the training's own end-of-run evaluation is not run.
    model = atas.trainer.train(cfg, run_dir=spec.run_dir, resume=status == "resume", evaluate=False).model
    return model, ["trained" if status == "fresh" else "resumed training"]


def run_one(spec: RunSpec) -> str:
    """Train (or resume) and evaluate as needed; returns what was done, for the log line."""
    from atas.evaluation.run import evaluate_run
    from atas.export import load_model
    from atas.factories import resolve_device

    model, done = train_as_needed(spec)
    if model is not None or not eval_is_current(spec.run_dir, spec.cfg):
        if model is None:  # finished training, evaluation missing, stale or killed: the checkpoint's model
            model, _, _ = load_model(spec.run_dir, resolve_device(spec.cfg.train.device))
        from atas.selection import handed_on

        evaluate_run(model, spec.cfg, spec.run_dir, weights=handed_on(spec.run_dir, spec.cfg))
        done.append("evaluated")
    return ", ".join(done) or "finished before: read back"


def _failed_row(spec: RunSpec, out: Path, why: str, diverged: dict) -> dict:
    """summary.json's row of a run whose loss became NaN/inf: where (diverged), no accuracies."""
    return {
        "method": spec.method,
        "eps": spec.eps,
        "eps_value": float(spec.cfg.method.eps),
        "seed": spec.seed,
        "failed": why,
        "diverged": diverged,
        "run_dir": os.path.relpath(spec.run_dir, out),
    }


def column_labels(results: dict) -> dict[str, str]:
    """{attack name: its column header} for an evaluation's results: the attack's `column` where it
    has one ("AA"), else the label the result carries ("PGD-50-10", a plugin's own label)."""
    from atas.evaluation import ATTACKS

    def header(name: str, result: dict) -> str:
        attack = ATTACKS[name] if name in ATTACKS else None
        return (attack.column if attack is not None and attack.column else None) or result.get("label") or name

    return {name: header(name, r) for name, r in results.items()}


def summarize_run(spec: RunSpec, out: Path) -> dict:
    """What summary.json keeps of one finished run (accuracies as fractions)."""
    from atas.cost import run_cost
    from atas.data import dataset_info
    from atas.guard import all_epochs, events, ramp_end

    metrics = _read_metrics(spec.run_dir)
    result = json.loads((spec.run_dir / EVAL).read_text())
    accuracy = {k: v["accuracy"] for k, v in result["results"].items()}
    hold = ramp_end(spec.cfg.method.args, _read_log(spec.run_dir))
    co, co_epochs, signature = co_verdict(metrics, accuracy, hold)

    curves = {"epoch": [r["epoch"] for r in metrics]}
    curves.update({k: [r.get(k) for r in metrics] for k in CURVE_KEYS if any(k in r for r in metrics)})
    if "co" in curves:  # the plot marks the epochs of the verdict above, and says why
        curves["co"] = [e in co_epochs for e in curves["epoch"]]
        curves["co_reason"] = co_reasons(metrics, hold)
    row = {
        "method": spec.method,
        "eps": spec.eps,
        "eps_value": float(spec.cfg.method.eps),
        "seed": spec.seed,
        "clean": accuracy.get("clean"),
        "fgsm": accuracy.get("fgsm"),
        "pgd": accuracy.get("pgd"),
        "aa": accuracy.get("aa"),
        "pgd_label": result["results"].get("pgd", {}).get("label"),
        # Every attack evaluated, in the order run (the four above included): the report's columns
        # come from here, so an attack of a plugin is reported as the shipped ones are.
        "accuracy": accuracy,
        "attack_labels": column_labels(result["results"]),
        "n_examples": result["n_examples"],
        "chance": 1.0 / dataset_info(spec.cfg.data.name).num_classes,
        # Training only: the per-epoch probe and the final evaluation are not in epoch_time_s.
        # ... of every epoch trained, the ones the guard replayed included: that is what the run cost.
        "train_time_s": sum(float(r.get("epoch_time_s", 0.0)) for r in all_epochs(_read_log(spec.run_dir))),
        # Peak memory (GPU: max allocated during the training loops; CPU: the process's peak RSS) and
        # forward/backward passes per optimizer step (atas.cost); which weights eval.json measured.
        **{
            k: v
            for k, v in run_cost(all_epochs(_read_log(spec.run_dir))).items()
            if k in ("peak_memory_mb", "memory_kind", "passes_per_step")
        },
        # a run trained before passes were logged: they follow from the method and its options
        **({} if "passes_fwd" in (metrics[-1] if metrics else {}) else {"passes_per_step": _passes(spec.cfg)}),
        "weights": result.get("weights"),
        "epochs": len(metrics),
        "epochs_planned": spec.cfg.train.epochs,
        "co_detected": co,
        "co_epochs": co_epochs,
        "co_final_signature": signature,
        "eval_warnings": result.get("warnings", []),
        "method_args": spec.cfg.method.args,
        # The training-eps schedule the run started with, and the guard's events (atas.guard).
        "eps_ramp_epochs": spec.cfg.method.args.get("eps_ramp_epochs", 0),
        "guard_events": events(_read_log(spec.run_dir)),
        # healthy / recovered / gave up / did not learn / CO (atas.report.run_outcome, from the fields above)
        "run_dir": os.path.relpath(spec.run_dir, out),
        "curves": curves,
    }
    from atas.report import run_outcome

    row["outcome"] = run_outcome(row)
    return row
