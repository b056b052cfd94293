"""`atas compare`: methods x eps x seeds on one recipe -> trained, evaluated runs and one report.

    atas compare fmnist --methods atas,fgsm_rs,n_fgsm,grad_align,pgd --seeds 3 --eps 0.1,0.2,0.3 \\
        --attacks clean,pgd,aa --n-examples 1000 --out reports/fmnist train.epochs=10

Every (eps, method, seed) is one run folder OUT/runs/<method>_eps<eps>_seed<seed>. Running the same
command again is cheap and safe: a run whose training finished and whose eval.json matches the
requested evaluation is only read; an unfinished run resumes from its checkpoint; an evaluation
that was killed resumes from its state file (eval.state). Every config is built and checked before
anything trains, so a typo fails in a second, not after the first run.

This module is the orchestration only; the tables, findings and plots are in atas.report.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import functools
import json
import os
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

from atas.config import Config, ConfigError, Frac, load_config, method_override, parse_fraction, split_override
from atas.methods import get_method
from atas.provenance import load_average, machine_info

SUMMARY_FORMAT = "atas.compare.summary/1"
# Per-epoch metrics copied into summary.json for the plots (and anyone re-plotting).
CURVE_KEYS = ("probe_clean", "probe_fgsm", "probe_pgd", "probe_pgd_margin", "probe_pgd_worst", "probe_lin_err", "co",
              "alpha_mean", "alpha_min", "alpha_max", "train_loss", "train_adv_acc", "epoch_time_s")

EPILOG = """\
overrides (key=value, before or after the options):
  section.key=value      applies to every run, e.g. train.epochs=10 optim.lr=0.05
  method.<opt>=value     a method option; applies to every compared method whose Options has <opt>
                         and is skipped (with a note) for the others, e.g. method.warmup_epochs=1
                         reaches ATAS only. An option no compared method has is an error.
  <method>.<opt>=value   applies only to that method's runs, e.g. pgd.steps=10 atas.c=0.02
                         (also written method.pgd.steps=10). Wins over method.<opt>.
  The recipe's own method options apply only to the recipe's method; method.name is set by
  --methods, method.eps by --eps, train.seed by --seeds (seeds are train.seed + 0..N-1).
  out_dir=DIR           the report goes to DIR/<recipe> (as --out DIR/<recipe>); not with --out.

attacks: the recipe's eval.attacks unless --attacks is given. Without aa (AutoAttack) the report
and the printed summary say loudly that the robust accuracies are PGD only, which can overstate
robustness; an evaluation where AutoAttack is more than a few points below PGD warns (WEAK ATTACK).

re-running the same command trains nothing that has finished: runs whose eval.json matches the
requested attacks / n-examples / PGD settings are read back; unfinished runs resume from their
checkpoint; a killed evaluation resumes from eval.state.

output: OUT/summary.json (every run), OUT/report.md and OUT/report.html (mean +- std over seeds
per eps, CO counts, findings, plots OUT/*.png), and the summary table on stdout.
"""


def add_compare_parser(sub) -> argparse.ArgumentParser:
    c = sub.add_parser("compare", help="train and evaluate several methods/seeds/eps on one recipe; write a report",
                       description=__doc__.split("\n\n")[0], epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("recipe", help="shipped recipe name (see `atas recipes`) or a YAML path")
    # key=value after the options reach `overrides` through atas.cli.main's parse_known_args.
    c.add_argument("overrides", nargs="*", help="key=value overrides (see below)")
    c.add_argument("--methods", default="atas,fgsm_rs", help="comma list of method names (default: atas,fgsm_rs)")
    c.add_argument("--seeds", type=int, default=1, help="number of seeds per (method, eps) (default: 1)")
    c.add_argument("--eps", default=None, help="comma list, e.g. 0.1,0.2,0.3 or 8/255,16/255 (default: the recipe's)")
    c.add_argument("--attacks", default=None,
                   help="comma list for the final evaluation, e.g. clean,pgd,aa (default: the recipe's eval.attacks)")
    c.add_argument("--n-examples", type=int, default=None,
                   help="evaluate on the first N test images (default: the recipe's eval.n_examples)")
    c.add_argument("--out", default=None,
                   help="report folder (default: reports/<recipe>; an out_dir=DIR override means DIR/<recipe>)")
    c.add_argument("--report-only", action="store_true",
                   help="train and evaluate nothing: write the report from the runs that have finished, "
                        "listing the others as not finished (look at a sweep while it runs)")
    return c


# --------------------------------------------------------------------------------------------
# Input: names, eps, overrides -> one checked Config per run
# --------------------------------------------------------------------------------------------
def _split(text: str) -> list[str]:
    return list(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))


def check_methods(names: list[str]) -> list[str]:
    from atas.methods import list_methods

    if not names:
        raise ConfigError(f"--methods is empty; valid: {', '.join(list_methods())}")
    unknown = [m for m in names if m not in list_methods()]
    if unknown:
        raise ConfigError(f"unknown method(s) {', '.join(unknown)} in --methods; valid: {', '.join(list_methods())}")
    return names


def check_attacks(attacks: "list[str] | str") -> list[str]:
    """--attacks: registered names; AutoAttack's package must be there before anything trains."""
    from atas.config import check_attacks as registered

    names = registered(attacks)
    if "aa" in names:
        from atas.extras import require

        require("pyautoattack", "attack 'aa' (standard AutoAttack)")
    return names


def parse_eps(text: "str | Frac") -> Frac:
    """An eps from the command line, parsed once: '8/255' stays '8/255', '0.10' becomes '0.1' (the
    name of its folders and table rows). The Frac is the one the runs' configs hold."""
    if isinstance(text, Frac):
        return text
    return Frac(text) if "/" in text else Frac(parse_fraction(text))


@dataclass
class RoutedOverrides:
    common: list[str]                       # for every run
    per_method: dict[str, list[str]]        # method -> its `method.<opt>=v` overrides
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
            raise ConfigError(f"{key}: method {target[0]} has no option {target[1]!r}; its options: "
                              f"{', '.join(options[target[0]]) or '(none)'}")
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
        routed.notes.append(f"method.{opt} applies to {', '.join(takers)}; not to {', '.join(skipped)} "
                            "(no such option)")


def run_name(method: str, eps: str, seed: int) -> str:
    return f"{method}_eps{eps.replace('/', '-')}_seed{seed}"


@dataclass
class RunSpec:
    method: str
    eps: str
    seed: int
    cfg: Config
    run_dir: Path


def plan_runs(recipe: str, methods: list[str], eps_list: "list[Frac | str] | None", n_seeds: int,
              routed: RoutedOverrides, out: Path) -> list[RunSpec]:
    """Build and validate every run's Config (eps outer, then method, then seed): every run is
    checked, the method's own option checks included, before the first one trains."""
    base = load_config(recipe, routed.common)
    eps_values = [parse_eps(e) for e in eps_list] if eps_list else [base.method.eps]
    base_tree = base.to_dict()
    specs = []
    for eps in eps_values:
        for method in methods:
            tree = copy.deepcopy(base_tree)
            if method != base.method.name:
                tree["method"]["args"] = {}  # the recipe's options were written for its own method
            tree["method"]["name"], tree["method"]["eps"] = method, eps  # the Frac itself, not its text again
            for i in range(n_seeds):
                seed = base.train.seed + i
                cfg = load_config(tree, routed.per_method[method] + [f"train.seed={seed}"])
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
    from atas.trainer import MetricsLog

    return MetricsLog(run_dir).read()


def _training_finished(rows: list[dict], cfg: Config, gave_up: bool = False) -> bool:
    if not rows:
        return False
    if gave_up:
        return True
    last = rows[-1]
    return (last["epoch"] >= cfg.train.epochs
            or (cfg.train.co_action == "stop" and bool(last.get("co")))
            or (cfg.train.max_steps is not None and last["step"] >= cfg.train.max_steps))


# Top-level config keys that only label a run: an edited recipe description must not make a
# finished run look like another experiment.
COSMETIC_KEYS = ("name", "description", "out_dir")


def _saved_config(run_dir: Path) -> dict | None:
    import yaml

    path = run_dir / "config.yaml"
    return (yaml.safe_load(path.read_text()) or {}) if path.exists() else None


def training_status(run_dir: Path, cfg: Config) -> str:
    """'fresh' (no checkpoint), 'resume' (checkpoint of an unfinished run), 'diverged' (its loss
    became NaN/inf: run again, it resumes or starts over) or 'done'.

    A folder holding a run of another config (more epochs excepted, as for `atas train --resume`)
    is an error: resuming it would mix two experiments, overwriting it would lose one."""
    from atas.checkpoint import CheckpointError
    from atas.trainer import CHECKPOINT, check_resumable, read_divergence

    diverged = read_divergence(run_dir) is not None
    if not (run_dir / CHECKPOINT).exists() and not diverged:
        return "fresh"
    saved = _saved_config(run_dir)
    if saved is not None:
        saved.update({k: getattr(cfg, k) for k in COSMETIC_KEYS})
        try:
            check_resumable(saved, cfg)
        except CheckpointError as e:
            raise ConfigError(f"{run_dir} holds a run with another config: {e} Delete that folder or pick "
                              "another --out.") from None
    rows = _read_metrics(run_dir)
    if rows and rows[-1]["epoch"] > cfg.train.epochs:
        raise ConfigError(f"{run_dir} holds a run trained for {rows[-1]['epoch']} epochs, more than the "
                          f"train.epochs={cfg.train.epochs} asked for. Delete that folder or pick another --out.")
    from atas.guard import gave_up

    if diverged:
        return "diverged"
    return "done" if _training_finished(rows, cfg, gave_up(_read_log(run_dir))) else "resume"


@functools.lru_cache(maxsize=None)
def _test_set_size(name: str, data_dir: str | None, download: bool, test_subset: int | None) -> int:
    from atas.data import TestSplit

    n = len(TestSplit(name, data_dir, download))
    return min(n, test_subset) if test_subset else n


def eval_is_current(run_dir: Path, cfg: Config) -> bool:
    """eval.json exists, is newer than the checkpoint, and used the requested attacks, number of
    examples, eps and PGD settings."""
    from atas.trainer import CHECKPOINT

    path, ckpt = run_dir / "eval.json", run_dir / CHECKPOINT
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
    wanted_n = e.n_examples if e.n_examples is not None else _test_set_size(
        cfg.data.name, cfg.data.data_dir, cfg.data.download, cfg.data.test_subset)
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
def run_one(spec: RunSpec) -> str:
    """Train (or resume) and evaluate as needed; returns what was done, for the log line."""
    from atas.export import load_model
    from atas.evaluation.run import evaluate_run
    from atas.trainer import resolve_device, train

    from atas.trainer import CHECKPOINT

    status = training_status(spec.run_dir, spec.cfg)
    if status == "diverged":  # tried again: from its last checkpoint, or from the start
        status = "resume" if (spec.run_dir / CHECKPOINT).exists() else "fresh"
    model, done = None, []
    if status != "done":
        cfg = spec.cfg
        if status == "resume":  # the trainer compares every key; keep the run's own labels
            saved = _saved_config(spec.run_dir) or {}
            cfg = dataclasses.replace(cfg, **{k: saved[k] for k in COSMETIC_KEYS if k in saved})
        for stale in ("eval.json", "eval.state"):  # they belong to the model before this training
            (spec.run_dir / stale).unlink(missing_ok=True)
        model = train(cfg, run_dir=spec.run_dir, resume=status == "resume").model
        done.append("trained" if status == "fresh" else "resumed training")
    if model is not None or not eval_is_current(spec.run_dir, spec.cfg):
        if model is None:  # finished training, evaluation missing, stale or killed: the checkpoint's model
            model, _, _ = load_model(spec.run_dir, resolve_device(spec.cfg.train.device))
        evaluate_run(model, spec.cfg, spec.run_dir)
        done.append("evaluated")
    return ", ".join(done) or "finished before: read back"


def _failed_row(spec: RunSpec, out: Path, why: str, diverged: dict) -> dict:
    """summary.json's row of a run whose loss became NaN/inf: where (diverged), no accuracies."""
    return {"method": spec.method, "eps": spec.eps, "eps_value": float(spec.cfg.method.eps), "seed": spec.seed,
            "failed": why, "diverged": diverged, "run_dir": os.path.relpath(spec.run_dir, out)}


def co_verdict(metrics: list[dict], accuracy: dict[str, float]) -> tuple[bool, list[int], bool | None]:
    """(CO detected, epochs the probe monitor flagged, final-evaluation signature FGSM > clean or
    None when FGSM or clean was not evaluated). Either sign counts as CO.

    The monitor is replayed on the logged probe curve rather than read from the `co` column, so
    every run of a report is judged by the same (current) rule, whichever version trained it."""
    from atas.monitor import COMonitor

    monitor = COMonitor()
    monitor.replay(metrics)
    epochs = list(monitor.flagged_epochs)
    signature = accuracy["fgsm"] > accuracy["clean"] if "fgsm" in accuracy and "clean" in accuracy else None
    return bool(epochs) or bool(signature), epochs, signature


def co_reasons(metrics: list[dict]) -> list[str]:
    """The monitor's reason per epoch ('' where it did not flag), replayed like `co_verdict`."""
    from atas.monitor import COMonitor

    monitor = COMonitor()
    return [monitor.update(r)["reason"] for r in metrics]


def summarize_run(spec: RunSpec, out: Path) -> dict:
    """What summary.json keeps of one finished run (accuracies as fractions)."""
    from atas.data import dataset_info

    from atas.guard import all_epochs, events

    metrics = _read_metrics(spec.run_dir)
    result = json.loads((spec.run_dir / "eval.json").read_text())
    accuracy = {k: v["accuracy"] for k, v in result["results"].items()}
    co, co_epochs, signature = co_verdict(metrics, accuracy)

    curves = {"epoch": [r["epoch"] for r in metrics]}
    curves.update({k: [r.get(k) for r in metrics] for k in CURVE_KEYS if any(k in r for r in metrics)})
    if "co" in curves:  # the plot marks the epochs of the verdict above, and says why
        curves["co"] = [e in co_epochs for e in curves["epoch"]]
        curves["co_reason"] = co_reasons(metrics)
    return {
        "method": spec.method, "eps": spec.eps, "eps_value": float(spec.cfg.method.eps), "seed": spec.seed,
        "clean": accuracy.get("clean"), "fgsm": accuracy.get("fgsm"), "pgd": accuracy.get("pgd"),
        "aa": accuracy.get("aa"),
        "pgd_label": result["results"].get("pgd", {}).get("label"),
        "n_examples": result["n_examples"], "chance": 1.0 / dataset_info(spec.cfg.data.name).num_classes,
        # Training only: the per-epoch probe and the final evaluation are not in epoch_time_s.
        # ... of every epoch trained, the ones the guard replayed included: that is what the run cost.
        "train_time_s": sum(float(r.get("epoch_time_s", 0.0)) for r in all_epochs(_read_log(spec.run_dir))),
        "epochs": len(metrics), "epochs_planned": spec.cfg.train.epochs,
        "co_detected": co, "co_epochs": co_epochs, "co_final_signature": signature,
        "eval_warnings": result.get("warnings", []),
        "method_args": spec.cfg.method.args,
        # The training-eps schedule the run started with, and the guard's events (atas.guard).
        "eps_ramp_epochs": spec.cfg.method.args.get("eps_ramp_epochs", 0),
        "guard_events": events(_read_log(spec.run_dir)),
        "run_dir": os.path.relpath(spec.run_dir, out),
        "curves": curves,
    }


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------
def cmd_compare(args) -> int:
    from atas.checkpoint import atomic_write_text
    from atas.report import AA_NOT_RUN, build_report, findings, format_summary_table
    from atas.trainer import TrainingDiverged, read_divergence, resolve_device

    # Everything a user can get wrong is checked here, before the first run trains.
    methods = check_methods(_split(args.methods))
    if args.seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {args.seeds}")
    if args.n_examples is not None and args.n_examples < 1:
        raise ConfigError(f"--n-examples must be >= 1, got {args.n_examples}")
    routed = route_overrides(args.overrides, methods)
    if args.eps and any(o.split("=", 1)[0].strip() == "method.eps" for o in routed.common):
        raise ConfigError("give eps either with --eps or as method.eps=..., not both")
    eps_list = list({e.text: e for e in map(parse_eps, _split(args.eps))}.values()) if args.eps else None
    if args.attacks is not None:
        routed.common.append(f"eval.attacks={','.join(check_attacks(args.attacks))}")
    if args.n_examples is not None:
        routed.common.append(f"eval.n_examples={args.n_examples}")
    out_dirs = [o.split("=", 1)[1].strip() for o in routed.common if o.split("=", 1)[0].strip() == "out_dir"]
    if out_dirs and args.out:
        raise ConfigError("give the report folder either with --out or as out_dir=..., not both")
    out = Path(args.out or Path(out_dirs[-1] if out_dirs else "reports") / Path(args.recipe).stem)
    specs = plan_runs(args.recipe, methods, eps_list, args.seeds, routed, out)
    attacks = check_attacks(specs[0].cfg.eval.attacks)
    n_wanted, d = specs[0].cfg.eval.n_examples, specs[0].cfg.data
    if n_wanted is not None and not args.report_only:  # an impossible size fails now, not after training
        size = _test_set_size(d.name, d.data_dir, d.download, d.test_subset)
        if n_wanted > size:
            raise ConfigError(f"--n-examples / eval.n_examples is {n_wanted} but the {d.name} test set has {size} "
                              f"images; give at most {size}")
    statuses = [training_status(s.run_dir, s.cfg) for s in specs]  # folder conflicts fail here too
    for note in routed.notes:
        print(f"note: {note}")
    print(f"atas compare: {len(specs)} runs ({sum(st != 'done' for st in statuses)} to train or resume) "
          f"-> {out}", flush=True)

    rows, load_at_start = [], load_average()
    for i, spec, status in zip(range(1, len(specs) + 1), specs, statuses):
        head = f"[{i}/{len(specs)}] {spec.method} eps={spec.eps} seed={spec.seed}"
        if args.report_only and status == "diverged":
            info = read_divergence(spec.run_dir)
            print(f"{head}: diverged at epoch {info['epoch']} (loss {info['loss']}) (--report-only)", flush=True)
            rows.append(_failed_row(spec, out, f"diverged at epoch {info['epoch']}, step {info['step']} "
                                               f"(loss {info['loss']})", info))
            continue
        if args.report_only and (status != "done" or not eval_is_current(spec.run_dir, spec.cfg)):
            missing = {"fresh": "not started", "resume": "training unfinished"}.get(status, "not evaluated")
            print(f"{head}: {missing} (--report-only)", flush=True)
            rows.append({"method": spec.method, "eps": spec.eps, "eps_value": float(spec.cfg.method.eps),
                         "seed": spec.seed, "missing": missing, "run_dir": os.path.relpath(spec.run_dir, out)})
            continue
        try:
            action = run_one(spec)
        except TrainingDiverged as e:  # one diverged run must not cost the rest of the sweep
            print(f"{head}: FAILED: {e}", flush=True)
            rows.append(_failed_row(spec, out, str(e), e.record()))
            continue
        row = summarize_run(spec, out)
        rows.append(row)
        accs = " ".join(f"{k} {100 * row[k]:.1f}%" for k in ("clean", "fgsm", "pgd", "aa") if row[k] is not None)
        print(f"{head}: {action}; {accs}; train {row['train_time_s']:.1f} s; "
              f"CO {'yes' if row['co_detected'] else 'no'}", flush=True)

    equivalent = ["atas", "compare", args.recipe, "--methods", ",".join(methods), "--seeds", str(args.seeds),
                  "--eps", ",".join(dict.fromkeys(s.eps for s in specs)), "--attacks", ",".join(attacks)]
    if args.n_examples is not None:
        equivalent += ["--n-examples", str(args.n_examples)]
    command = {"command": shlex.join(sys.argv), "equivalent": shlex.join(equivalent + ["--out", str(out)]
                                                                         + list(args.overrides))}
    machine = machine_info(str(resolve_device(specs[0].cfg.train.device)), load_at_start)
    summary = {"format": SUMMARY_FORMAT,
               "date": datetime.datetime.now(datetime.timezone.utc).astimezone().isoformat(timespec="seconds"),
               **command, "machine": machine, "recipe": args.recipe, "methods": methods,
               "eps": list(dict.fromkeys(s.eps for s in specs)), "seeds": sorted({s.seed for s in specs}),
               "attacks": attacks, "n_examples": args.n_examples, "notes": routed.notes, "runs": rows}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    report = build_report(rows, out, command, machine)

    print()
    print(format_summary_table(rows))
    if "aa" not in attacks:
        print(f"\n{AA_NOT_RUN}")
    for eps, facts in findings(rows).items():
        for fact in facts:
            print(f"eps {eps}: {fact}")
    print(f"\nreport: {report} (and {report.with_suffix('.html')}); runs: {out / 'runs'}")
    return 0
