"""`atas compare`: methods x eps x seeds on one recipe -> trained, evaluated runs and one report.

    atas compare fmnist --methods atas,fgsm_rs,n_fgsm,grad_align,pgd --seeds 3 --eps 0.1,0.2,0.3 \\
        --attacks clean,pgd,aa --n-examples 1000 --out reports/fmnist train.epochs=10

Every (eps, method, seed) is one run folder OUT/runs/<method>_eps<eps>_seed<seed>. Running the same
command again is cheap and safe: a run whose training finished and whose eval.json matches the
requested evaluation is only read; an unfinished run resumes from its checkpoint; an evaluation
that was killed resumes from its state file (eval.state). Every config is built and checked before
anything trains, so a typo fails in a second, not after the first run.

This module is the command (its parser, its checks, its output); the runs are planned, run and
summarised by atas.sweep, and the tables, findings and plots are in atas.report.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from atas.config import ConfigError, check_attacks, load_config
from atas.provenance import load_average, machine_info
from atas.sweep import (
    RoutedOverrides,
    RunSpec,
    _failed_row,
    _test_set_size,
    eval_is_current,
    parse_eps,
    plan_runs,
    route_overrides,
    run_one,
    summarize_run,
    training_status,
)
from atas.tune import DEFAULT_VAL_SIZE

SUMMARY_FORMAT = "atas.compare.summary/1"

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

--tune: a method whose published hyper-parameter was tuned elsewhere (Method.search: ELLE's lam and
ELLE-A's lam_max over 10,100,1000; GradAlign's lam over 0.5,2,8) is first trained once per grid
value (the base seed, without the last --tune-val-size training images) in OUT/tune/, each run is
validated on the held-out images (clean + PGD-10), and the seeds run at the value with the best
validation PGD accuracy (ties: clean). An explicit value (elle.lam=100) skips that method's search.
The grid, each value's validation accuracy and the choice are in summary.json ("search") and in the
report's "Hyper-parameter search" section. Finished search runs are read back on a re-run.

output: OUT/summary.json (every run), OUT/report.md and OUT/report.html (mean +- std over seeds
per eps, CO counts, findings, plots OUT/*.png), and the summary table on stdout.
"""


def add_compare_parser(sub) -> argparse.ArgumentParser:
    c = sub.add_parser(
        "compare",
        help="train and evaluate several methods/seeds/eps on one recipe; write a report",
        description=__doc__.split("\n\n")[0],
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    c.add_argument("recipe", help="shipped recipe name (see `atas recipes`) or a YAML path")
    # key=value after the options reach `overrides` through atas.cli.main's parse_known_args.
    c.add_argument("overrides", nargs="*", help="key=value overrides (see below)")
    c.add_argument("--methods", default="atas,fgsm_rs", help="comma list of method names (default: atas,fgsm_rs)")
    c.add_argument("--seeds", type=int, default=1, help="number of seeds per (method, eps) (default: 1)")
    c.add_argument("--eps", default=None, help="comma list, e.g. 0.1,0.2,0.3 or 8/255,16/255 (default: the recipe's)")
    c.add_argument(
        "--attacks",
        default=None,
        help="comma list for the final evaluation, e.g. clean,pgd,aa (default: the recipe's eval.attacks)",
    )
    c.add_argument(
        "--n-examples",
        type=int,
        default=None,
        help="evaluate on the first N test images (default: the recipe's eval.n_examples)",
    )
    c.add_argument(
        "--out",
        default=None,
        help="report folder (default: reports/<recipe>; an out_dir=DIR override means DIR/<recipe>)",
    )
    c.add_argument(
        "--tune",
        action="store_true",
        help="before the seeds, search the hyper-parameter each compared method declares as not "
        "transferring (ELLE lam, ELLE-A lam_max, GradAlign lam) on a validation split, one run "
        "per grid value per eps, and run the seeds at the best value (see below)",
    )
    c.add_argument(
        "--tune-val-size",
        type=int,
        default=None,
        help=f"with --tune: training images held out (the last N) to choose on (default: {DEFAULT_VAL_SIZE})",
    )
    c.add_argument(
        "--tune-n-examples",
        type=int,
        default=None,
        help="with --tune: validate each value on the first N held-out images (default: up to 1000)",
    )
    c.add_argument(
        "--report-only",
        action="store_true",
        help="train and evaluate nothing: write the report from the runs that have finished, "
        "listing the others as not finished (look at a sweep while it runs)",
    )
    return c


# --------------------------------------------------------------------------------------------
# The command line's names, checked before anything trains
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


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------
def cmd_compare(args) -> int:
    # Everything a user can get wrong is checked here, before the first run trains.
    methods, routed, eps_list, out = _checked_request(args)
    specs = plan_runs(args.recipe, methods, eps_list, args.seeds, routed, out)
    tuning = _plan_tuning(args, methods, eps_list, routed, out)
    attacks = check_attacks(specs[0].cfg.eval.attacks, installed=True)
    if not args.report_only:  # an impossible size fails now, not after training
        _check_test_set_size(specs[0])
    # Folder conflicts fail here too (a seed of a search is checked once its value is chosen).
    statuses = [None if (s.method, s.eps) in tuning.searched else training_status(s.run_dir, s.cfg) for s in specs]
    for note in routed.notes:
        print(f"note: {note}")
    _announce(specs, statuses, tuning, out)
    load_at_start = load_average()
    if tuning.searches:
        specs, statuses = _run_tuning(args, tuning, methods, eps_list, routed, out, statuses)
    eta = Eta([st in ("fresh", "resume", "diverged") for st in statuses]) if not args.report_only else None
    rows = []
    for i, (spec, status) in enumerate(zip(specs, statuses), start=1):
        start = time.monotonic()
        rows.append(_run_or_read(args, i, len(specs), spec, status, out))
        if eta is not None and (line := eta.done(i - 1, time.monotonic() - start)):
            print(f"[{i}/{len(specs)}] {line}", flush=True)
    _write_outputs(args, methods, specs, attacks, routed, rows, out, load_at_start, tuning)
    return 0


class Eta:
    """The overall time left of `atas compare`: the mean wall time of the runs that trained so far,
    times the runs still to train. A run already done (read back) costs nothing and is not counted."""

    def __init__(self, to_train: list[bool]):
        self.to_train = list(to_train)
        self.seconds: list[float] = []

    def done(self, index: int, seconds: float) -> str | None:
        """Record run `index` (0-based) as finished after `seconds`; the progress line, or None
        when there is nothing to estimate (no run trained yet, or none left)."""
        if self.to_train[index]:
            self.seconds.append(seconds)
        left = sum(self.to_train[index + 1 :])
        if not self.seconds or not left:
            return None
        mean = sum(self.seconds) / len(self.seconds)
        return (
            f"about {_duration(mean * left)} left for {left} run(s) to train "
            f"(mean {_duration(mean)} a run so far, {_duration(sum(self.seconds))} spent)"
        )


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


@dataclass
class _Tuning:
    """`--tune`: the searches (atas.tune), their validation size and how many images they score on."""

    searches: list = field(default_factory=list)
    val_size: int | None = None
    n_examples: int | None = None

    @property
    def searched(self) -> set[tuple[str, str]]:
        return {(s.method, s.eps) for s in self.searches if not s.skipped}


def _plan_tuning(args, methods: list[str], eps_list, routed: RoutedOverrides, out: Path) -> _Tuning:
    if not args.tune:
        if args.tune_val_size is not None or args.tune_n_examples is not None:
            raise ConfigError("--tune-val-size / --tune-n-examples set the hyper-parameter search: add --tune")
        return _Tuning()
    from atas.tune import check_tune_sizes, plan_searches

    val_size = DEFAULT_VAL_SIZE if args.tune_val_size is None else args.tune_val_size
    n = check_tune_sizes(load_config(args.recipe, routed.common), val_size, args.tune_n_examples)
    eps_texts = [e.text for e in eps_list] if eps_list else None
    searches = plan_searches(args.recipe, methods, eps_texts, routed, out, val_size, routed.notes)
    if not searches:
        routed.notes.append(f"--tune: none of {', '.join(methods)} declares a hyper-parameter search; nothing to tune")
    return _Tuning(searches, val_size, n)


def _announce(specs: list[RunSpec], statuses: list, tuning: _Tuning, out: Path) -> None:
    after = sum(st is None for st in statuses)
    search_specs = [sp for search in tuning.searches for sp in search.specs]
    search_todo = sum(training_status(sp.run_dir, sp.cfg) != "done" for sp in search_specs)
    print(
        f"atas compare: {len(specs)} runs ({sum(st not in ('done', None) for st in statuses)} to train or resume"
        + (f", {after} more after the hyper-parameter search" if after else "")
        + ")"
        + (f", a search of {len(search_specs)} runs first ({search_todo} to train or resume)" if search_specs else "")
        + f" -> {out}",
        flush=True,
    )


def _run_tuning(
    args, tuning: _Tuning, methods: list[str], eps_list, routed: RoutedOverrides, out: Path, statuses: list
) -> tuple[list[RunSpec], list]:
    """Run the searches, then plan the seeds again with the values they chose."""
    from atas.tune import run_search

    assert tuning.n_examples is not None  # set with the searches (check_tune_sizes)
    for search in tuning.searches:
        run_search(search, tuning.n_examples, args.report_only, out, routed.notes)
    chosen = {(s.method, s.eps): s.override() for s in tuning.searches if s.chosen is not None}
    specs = plan_runs(args.recipe, methods, eps_list, args.seeds, routed, out, chosen)
    pending = {(s.method, s.eps) for s in tuning.searches if not s.skipped and not s.finished}
    statuses = [
        st if st is not None or (sp.method, sp.eps) in pending else training_status(sp.run_dir, sp.cfg)
        for sp, st in zip(specs, statuses)
    ]
    return specs, statuses


def _checked_request(args) -> tuple[list[str], RoutedOverrides, list | None, Path]:
    """The command line, checked: methods, overrides routed to their runs, eps values, the folder."""
    methods = check_methods(_split(args.methods))
    if args.seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {args.seeds}")
    if args.n_examples is not None and args.n_examples < 1:
        raise ConfigError(f"--n-examples must be >= 1, got {args.n_examples}")
    routed = route_overrides(args.overrides, methods)
    if args.eps and any(o.split("=", 1)[0].strip() == "method.eps" for o in routed.common):
        raise ConfigError("give eps either with --eps or as method.eps=..., not both")
    # Parsed once: the Frac of each eps is the one its runs' configs hold.
    eps_list = list({e.text: e for e in map(parse_eps, _split(args.eps))}.values()) if args.eps else None
    if args.attacks is not None:
        routed.common.append(f"eval.attacks={','.join(check_attacks(args.attacks, installed=True))}")
    if args.n_examples is not None:
        routed.common.append(f"eval.n_examples={args.n_examples}")
    out_dirs = [o.split("=", 1)[1].strip() for o in routed.common if o.split("=", 1)[0].strip() == "out_dir"]
    if out_dirs and args.out:
        raise ConfigError("give the report folder either with --out or as out_dir=..., not both")
    out = Path(args.out or Path(out_dirs[-1] if out_dirs else "reports") / Path(args.recipe).stem)
    return methods, routed, eps_list, out


def _check_test_set_size(spec: RunSpec) -> None:
    n_wanted, d = spec.cfg.eval.n_examples, spec.cfg.data
    if n_wanted is None:
        return
    size = _test_set_size(d.name, d.data_dir, d.download, d.test_subset)
    if n_wanted > size:
        raise ConfigError(
            f"--n-examples / eval.n_examples is {n_wanted} but the {d.name} test set has {size} "
            f"images; give at most {size}"
        )


def _run_or_read(args, i: int, n: int, spec: RunSpec, status: str | None, out: Path) -> dict:
    """One run's row of summary.json: trained / resumed / evaluated as needed, or (--report-only)
    read back, or marked diverged or not finished."""
    from atas.rundir import TrainingDiverged, read_divergence

    head = f"[{i}/{n}] {spec.method} eps={spec.eps} seed={spec.seed}"
    if status is None:  # --report-only, and the search that picks this run's value has not finished
        print(f"{head}: hyper-parameter search not finished (--report-only)", flush=True)
        return {
            "method": spec.method,
            "eps": spec.eps,
            "eps_value": float(spec.cfg.method.eps),
            "seed": spec.seed,
            "missing": "hyper-parameter search not finished",
            "run_dir": os.path.relpath(spec.run_dir, out),
        }
    if args.report_only and status == "diverged":
        info = read_divergence(spec.run_dir)
        assert info is not None  # the status "diverged" is read from this very file
        print(f"{head}: diverged at epoch {info['epoch']} (loss {info['loss']}) (--report-only)", flush=True)
        return _failed_row(
            spec, out, f"diverged at epoch {info['epoch']}, step {info['step']} (loss {info['loss']})", info
        )
    if args.report_only and (status != "done" or not eval_is_current(spec.run_dir, spec.cfg)):
        missing = {"fresh": "not started", "resume": "training unfinished"}.get(status, "not evaluated")
        print(f"{head}: {missing} (--report-only)", flush=True)
        return {
            "method": spec.method,
            "eps": spec.eps,
            "eps_value": float(spec.cfg.method.eps),
            "seed": spec.seed,
            "missing": missing,
            "run_dir": os.path.relpath(spec.run_dir, out),
        }
    try:
        action = run_one(spec)
    except TrainingDiverged as e:  # one diverged run must not cost the rest of the sweep
        print(f"{head}: FAILED: {e}", flush=True)
        return _failed_row(spec, out, str(e), e.record())
    row = summarize_run(spec, out)
    accs = " ".join(f"{k} {100 * v:.1f}%" for k, v in row["accuracy"].items() if v is not None)
    print(f"{head}: {action}; {accs}; train {row['train_time_s']:.1f} s; {_verdict(row)}", flush=True)
    return row


def _verdict(row: dict) -> str:
    """The run's verdict in words: a run the guard gave up on was flagged, whatever its final
    weights (the last healthy epoch's) look like, and never reads as 'CO no'."""
    outcome = row["outcome"]
    if outcome == "did not learn":
        return "did not learn"
    if outcome == "gave up":
        end: dict = next((e for e in reversed(row.get("guard_events") or []) if e.get("event") == "gave_up"), {})
        return "CO flagged, the guard gave up" + (
            f" (final weights: epoch {end['rollback_to']}, its last healthy one)" if "rollback_to" in end else ""
        )
    if outcome == "recovered":
        return "CO flagged, recovered by the guard (not flagged at the end)"
    return f"CO {'yes' if row['co_detected'] else 'no'}; {outcome}"


def _write_outputs(
    args,
    methods: list[str],
    specs: list[RunSpec],
    attacks: list[str],
    routed: RoutedOverrides,
    rows: list[dict],
    out: Path,
    load_at_start: float | None,
    tuning: _Tuning,
) -> None:
    """summary.json (with the command, its equivalent and the machine), the report, the table."""
    from atas.checkpoint import atomic_write_text
    from atas.factories import resolve_device
    from atas.report import AA_NOT_RUN, build_report, findings, format_summary_table, mark_learning

    mark_learning(rows)  # did not learn / outcome, against the other methods' runs
    eps = list(dict.fromkeys(s.eps for s in specs))
    equivalent = [
        "atas",
        "compare",
        args.recipe,
        "--methods",
        ",".join(methods),
        "--seeds",
        str(args.seeds),
        "--eps",
        ",".join(eps),
        "--attacks",
        ",".join(attacks),
    ]
    if args.n_examples is not None:
        equivalent += ["--n-examples", str(args.n_examples)]
    if args.tune:
        equivalent += ["--tune", "--tune-val-size", str(tuning.val_size), "--tune-n-examples", str(tuning.n_examples)]
    command = {
        "command": shlex.join(sys.argv),
        "equivalent": shlex.join(equivalent + ["--out", str(out)] + list(args.overrides)),
    }
    machine = machine_info(str(resolve_device(specs[0].cfg.train.device)), load_at_start)
    summary = {
        "format": SUMMARY_FORMAT,
        "date": datetime.datetime.now(datetime.timezone.utc).astimezone().isoformat(timespec="seconds"),
        **command,
        "machine": machine,
        "recipe": args.recipe,
        "methods": methods,
        "eps": eps,
        "seeds": sorted({s.seed for s in specs}),
        "attacks": attacks,
        "n_examples": args.n_examples,
        "notes": routed.notes,
        "runs": rows,
    }
    if args.tune:  # per (method, eps): the grid, each value's validation accuracy, the value chosen
        summary["search"] = [s.summary(tuning.val_size, tuning.n_examples, specs[0].seed) for s in tuning.searches]
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    report = build_report(rows, out, command, machine, search=summary.get("search"))

    print()
    print(format_summary_table(rows))
    if "aa" not in attacks:
        print(f"\n{AA_NOT_RUN}")
    for eps_text, facts in findings(rows).items():
        for fact in facts:
            print(f"eps {eps_text}: {fact}")
    print(f"\nreport: {report} (and {report.with_suffix('.html')}); runs: {out / 'runs'}")
