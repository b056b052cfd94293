"""The comparison report: tables (mean ± std over seeds), findings computed from the numbers, plots.

Input is the list of per-run rows that `atas compare` writes to summary.json (one dict per
(method, eps, seed): accuracies as fractions, train_time_s, CO verdicts, per-epoch curves). This
module only reads those rows; it never trains or evaluates anything, so a report can be rebuilt
from summary.json alone:

    >>> rows = json.loads(Path("reports/fmnist/summary.json").read_text())["runs"]
    >>> build_report(rows, "reports/fmnist", command="atas compare ...", machine={...})

Plots are drawn on matplotlib `Figure` objects (Agg canvas, no pyplot): no global backend state is
touched, so this works on a headless machine and inside a user's notebook alike.
"""

from __future__ import annotations

import datetime
import html
import statistics
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from atas.checkpoint import atomic_write_text
from atas.extras import INSTALL, available
from atas.guard import NEAR_CHANCE, describe, is_stuck_only, outcome as guard_outcome
from atas.methods import METHODS
from atas.monitor import COMonitor
from atas.values import parse_fraction

# "ATAS AA within GAP_POINTS points of PGD-AT" is the claim the report checks (ATAS paper, Tables).
GAP_POINTS = 3.0

# Said loudly (report and stdout) when no run was evaluated with AutoAttack.
AA_NOT_RUN = (
    "AUTOATTACK WAS NOT RUN: the robust accuracies here are PGD only, an upper bound that can "
    "overstate robustness by several points (gradient masking, a step size unsuited to the model). "
    "Add aa to --attacks (e.g. --attacks clean,fgsm,pgd,aa) before quoting these numbers."
)

# NEAR_CHANCE (atas.guard): a clean accuracy within this of chance (1 / classes) did not learn; say so.

PROBE_PLOT, ALPHA_PLOT, TIME_PLOT = "probe_pgd.png", "atas_alpha.png", "time_vs_robust.png"
MASK_PLOT = "probe_masking.png"


# --------------------------------------------------------------------------------------------
# What the methods say about themselves (class attributes of atas.methods.base.Method)
# --------------------------------------------------------------------------------------------
def _method_class(name: str):
    """The registered class of `name`; None for a method this process does not know (a report
    rebuilt from summary.json without the plugin that trained it): shown by its name, no claims."""
    try:
        return METHODS.get(name)
    except ValueError:
        return None


def method_label(name: str) -> str:
    """The method's name as its paper writes it (its `label`), else its registry name."""
    cls = _method_class(name)
    return cls.display_label() if cls is not None else name


def _is(name: str, flag: str) -> bool:
    cls = _method_class(name)
    return bool(cls is not None and getattr(cls, flag))


def _reference(by_method: dict) -> str | None:
    """The robust reference in this comparison (PGD-AT: `reference = True`), if there is one."""
    return next((m for m in by_method if _is(m, "reference")), None)


def _logged(name: str) -> dict:
    cls = _method_class(name)
    return cls.logged_stats if cls is not None else {}


def _reference_label() -> str:
    return next((cls.display_label() for cls in METHODS.values() if cls.reference), "the reference")


# --------------------------------------------------------------------------------------------
# Grouping and statistics
# --------------------------------------------------------------------------------------------
def _ok(rows: Iterable[dict]) -> list[dict]:
    """Runs that produced results (a diverged run has `failed` (and `diverged`) set, one that has not finished yet
    under `--report-only` has `missing` set; neither has accuracies)."""
    return [r for r in rows if not r.get("failed") and not r.get("missing")]


def group_runs(rows: list[dict]) -> dict[str, dict[str, list[dict]]]:
    """{eps text: {method: [runs over seeds]}}, in the order the runs were given."""
    out: dict[str, dict[str, list[dict]]] = {}
    for r in rows:
        out.setdefault(r["eps"], {}).setdefault(r["method"], []).append(r)
    return out


def mean_std(given: Iterable[float | None]) -> tuple[float, float | None] | None:
    """(mean, sample std with n-1) of the values (None: not measured, left out); std is None for
    one value; None for none."""
    values = [v for v in given if v is not None]
    if not values:
        return None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def format_pm(values: Iterable[float | None], scale: float = 100.0, digits: int = 1) -> str:
    """'71.3 ± 1.2' (scale 100: fractions shown as %); one value: '71.3 (1 seed)'; none: '—'."""
    ms = mean_std(values)
    if ms is None:
        return "—"
    m, s = ms
    if s is None:
        return f"{m * scale:.{digits}f} (1 seed)"
    return f"{m * scale:.{digits}f} ± {s * scale:.{digits}f}"


def _stuck_run(run: dict) -> bool:
    """A run the monitor flagged only as not learning (constant prediction), never as CO: every
    flagged epoch's reason is stuck-only (atas.guard.is_stuck_only) and the final model shows no
    CO signature."""
    reasons = [x for x in (run.get("curves") or {}).get("co_reason", []) or [] if x]
    return bool(reasons) and all(is_stuck_only(x) for x in reasons) and not run.get("co_final_signature")


# Rule B of `learning_failure`: no robustness at all (PGD and, where evaluated, AutoAttack at most
# ROBUST_ZERO) with a clean accuracy below LOW_CLEAN_CHANCE x chance or LOW_CLEAN_REF x the clean
# accuracy of the comparison's runs that learned. A collapsed (CO) model keeps its clean accuracy
# (CO raises it); the shrunk recipe (ten classes: clean 22-25%, PGD 0%, AutoAttack 0-1%)
# had learnt next to nothing, and rule A (chance + 5 points) let it read as "CO yes, recovered".
ROBUST_ZERO, LOW_CLEAN_CHANCE, LOW_CLEAN_REF = 0.01, 3.0, 0.5


def learning_failure(run: dict, reference_clean: float | None = None) -> str | None:
    """Why a finished run did not learn, or None. A: its final clean accuracy is within NEAR_CHANCE
    of chance. B: robust accuracy about 0 and clean accuracy far below what learning gives (below
    LOW_CLEAN_CHANCE x chance, or LOW_CLEAN_REF x `reference_clean`, the best mean clean accuracy of
    the other methods' runs at its eps that are robust at all)."""
    clean, chance = run.get("clean"), run.get("chance")
    if clean is None or chance is None:
        return None
    if clean <= chance + NEAR_CHANCE:
        return f"clean {100 * clean:.1f}% within {100 * NEAR_CHANCE:.0f} points of chance ({100 * chance:.0f}%)"
    robust = [float(run[k]) for k in ("pgd", "aa") if run.get(k) is not None]
    low = max(LOW_CLEAN_CHANCE * chance, LOW_CLEAN_REF * (reference_clean or 0.0))
    if robust and max(robust) <= ROBUST_ZERO and clean < low:
        return f"robust accuracy {100 * max(robust):.1f}% with clean {100 * clean:.1f}% (below {100 * low:.0f}%)"
    return None


def did_not_learn(run: dict) -> bool:
    """The model learnt (next to) nothing (`learning_failure`; `mark_learning` compares it with its
    peers): no verdict about its robustness (CO or not, recovered or not) means anything."""
    if "did_not_learn" in run:
        return bool(run["did_not_learn"])
    return learning_failure(run) is not None


def mark_learning(rows: list[dict]) -> None:
    """Set each finished run's did_not_learn (the reason, or None) against the other methods' runs
    at its eps, and its outcome (`run_outcome`); summary.json keeps both."""
    for by_method in group_runs(rows).values():
        robust_means = {
            m: _mean(runs, "clean")
            for m, runs in by_method.items()
            if any(max(r.get("pgd") or 0.0, r.get("aa") or 0.0) > ROBUST_ZERO for r in _ok(runs))
        }
        for method, runs in by_method.items():
            others = [v for m, v in robust_means.items() if m != method and v is not None]
            for r in _ok(runs):
                r["did_not_learn"] = learning_failure(r, max(others, default=None))
                r["outcome"] = run_outcome(r)


def run_outcome(run: dict) -> str:
    """One word for how a finished run ended: 'did not learn' (the rule of `did_not_learn`, first:
    whatever the guard did), 'gave up' (the guard), 'recovered' (the guard rolled it back and it is
    not flagged at the end), 'healthy' (never flagged), or 'CO' (flagged at the end: the guard was
    off, or the final evaluation's FGSM > clean signature came after the probe's last look)."""
    if did_not_learn(run):
        return "did not learn"
    found = guard_outcome(run.get("guard_events") or [], None, None)
    if found in ("healthy", "recovered") and run.get("co_detected"):
        return "CO"
    return found


def co_column(runs: list[dict]) -> str:
    """'yes (2/3)': how many seeds were flagged with catastrophic overfitting; 'no (0/3)'. Seeds that
    did not learn are counted apart and never as 'no' ('did not learn (2/2)', 'no (0/1), 1 did not
    learn'); runs the monitor flagged only as stuck (constant prediction) too: '1 stuck'; then the
    guard's outcomes ('1 recovered by the guard': rolled back and healthy at the end)."""
    runs = _ok(runs)
    dead = [r for r in runs if did_not_learn(r)]
    learned = [r for r in runs if not did_not_learn(r)]
    if runs and not learned:
        return f"did not learn ({len(dead)}/{len(runs)})"
    stuck = sum(bool(r.get("co_detected")) and _stuck_run(r) for r in learned)
    # a run the guard gave up on was flagged, though it ends at its last healthy epoch's weights
    k = sum(bool(r.get("co_detected")) or run_outcome(r) == "gave up" for r in learned) - stuck
    recovered = sum(run_outcome(r) == "recovered" for r in learned)
    gave_up = sum(run_outcome(r) == "gave up" for r in learned)
    return (
        f"{'yes' if k else 'no'} ({k}/{len(learned)})"
        + (f", {len(dead)} did not learn" if dead else "")
        + (f", {stuck} stuck" if stuck else "")
        + (f", {recovered} recovered by the guard" if recovered else "")
        + (f", guard gave up on {gave_up}" if gave_up else "")
    )


def _recoveries(run: dict) -> list[dict]:
    return [e for e in run.get("guard_events") or [] if e.get("event") == "recovery"]


def _gave_up(run: dict) -> bool:
    return any(e.get("event") == "gave_up" for e in run.get("guard_events") or [])


def _pgd_label(rows: list[dict]) -> str:
    labels = {str(r["pgd_label"]) for r in _ok(rows) if r.get("pgd_label")}
    return labels.pop() if len(labels) == 1 else "PGD"


def _mean(runs: list[dict], key: str) -> float | None:
    ms = mean_std([r.get(key) for r in _ok(runs)])
    return None if ms is None else ms[0]


# --------------------------------------------------------------------------------------------
# Tables and findings
# --------------------------------------------------------------------------------------------
# The shipped attacks' columns, in the order the tables have always shown them; clean and PGD are
# shown even where not evaluated (as "—"), the others only where some run was evaluated with them.
_FIXED_COLUMNS = ("clean", "fgsm", "pgd", "aa")
_ALWAYS = ("clean", "pgd")


def _accuracy(run: dict, attack: str) -> float | None:
    """A run's accuracy under `attack`: from the row's per-attack `accuracy` (every attack
    evaluated), else from its top-level key (rows written before rows carried `accuracy`)."""
    return (run.get("accuracy") or {}).get(attack, run.get(attack))


def attack_columns(rows: list[dict], always: tuple[str, ...] = _ALWAYS) -> list[tuple[str, str]]:
    """(attack name, column header) of every attack some run was evaluated with: clean, FGSM, PGD,
    AA first (clean and PGD always), then the others (apgd-ce, a plugin's) in the order evaluated."""
    ok = _ok(rows)
    labels: dict[str, str] = {}
    for r in ok:
        for name, label in (r.get("attack_labels") or {}).items():
            labels.setdefault(name, label)
    extra = [name for r in ok for name in (r.get("accuracy") or {}) if name not in _FIXED_COLUMNS]
    names = [n for n in _FIXED_COLUMNS if n in always or any(_accuracy(r, n) is not None for r in ok)]
    names += list(dict.fromkeys(n for n in extra if any(_accuracy(r, n) is not None for r in ok)))
    fixed = {"clean": "clean", "fgsm": "FGSM", "pgd": _pgd_label(rows), "aa": "AA"}
    return [(n, fixed.get(n) or labels.get(n) or n) for n in names]


def summary_tables(rows: list[dict]) -> list[tuple[str, list[str], list[list[str]]]]:
    """Per eps: (eps, header, table rows) with mean ± std over seeds. A column per attack
    evaluated (`attack_columns`): FGSM, AA and any other attack appear only where some run was
    evaluated with it."""
    columns = attack_columns(rows)
    with_cost = any(r.get("peak_memory_mb") is not None for r in _ok(rows))  # runs from before atas.cost: none
    tables = []
    for eps, by_method in group_runs(rows).items():
        reference = _reference(by_method)
        pgd_time = _mean(by_method[reference], "train_time_s") if reference is not None else None
        header = (
            ["method", "seeds"]
            + [f"{label} (%)" for _, label in columns]
            + ["train time (s)"]
            + ([f"time vs {method_label(reference)}"] if pgd_time and reference is not None else [])
            + (["peak memory (MB)", "passes fwd/bwd"] if with_cost else [])
            + ["CO"]
        )
        body = []
        for method, runs in by_method.items():
            ok = _ok(runs)
            n_diverged = sum(bool(r.get("failed") and r.get("diverged")) for r in runs)
            n_failed = sum(bool(r.get("failed")) for r in runs) - n_diverged
            n_missing = sum(bool(r.get("missing")) for r in runs)
            why = ", ".join(
                t
                for t in (
                    f"{n_failed} failed" if n_failed else "",
                    f"{n_diverged} diverged" if n_diverged else "",
                    f"{n_missing} not finished" if n_missing else "",
                )
                if t
            )
            seeds = f"{len(ok)}" if len(ok) == len(runs) else f"{len(ok)} of {len(runs)} ({why})"
            time_mean = _mean(ok, "train_time_s")
            ratio = f"{time_mean / pgd_time:.2f}×" if pgd_time and time_mean is not None else "—"
            body.append(
                [method_label(method), seeds]
                + [format_pm([_accuracy(r, name) for r in ok]) for name, _ in columns]
                + [format_pm([r.get("train_time_s") for r in ok], scale=1.0)]
                + ([ratio] if pgd_time else [])
                + (
                    [format_pm([r.get("peak_memory_mb") for r in ok], scale=1.0, digits=0), _passes(ok)]
                    if with_cost
                    else []
                )
                + [co_column(runs)]
            )
        tables.append((eps, header, body))
    return tables


def _passes(runs: list[dict]) -> str:
    """Forward/backward passes per optimizer step (atas.cost), once if every run agrees."""
    seen = list(dict.fromkeys(tuple(r["passes_per_step"]) for r in runs if r.get("passes_per_step")))
    return " | ".join(f"{f:g}/{b:g}" for f, b in seen) or "—"


def _md_table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


def format_summary_table(rows: list[dict]) -> str:
    """Markdown: one table per eps, mean ± std over seeds (what `atas compare` prints at the end)."""
    parts = []
    for eps, header, body in summary_tables(rows):
        parts.append(f"### eps = {eps}\n\n{_md_table(header, body)}")
    return "\n\n".join(parts)


def _seed_list(runs: list[dict]) -> str:
    return ", ".join(str(r["seed"]) for r in runs)


def findings(rows: list[dict]) -> dict[str, list[str]]:
    """Per eps, the claims the comparison exists to check, stated as facts from the numbers.

    A miss is reported as a miss: 'no' with the numbers that make it one."""
    out: dict[str, list[str]] = {}
    for eps, by_method in group_runs(rows).items():
        facts = [_co_fact(method, runs) for method, runs in by_method.items() if _is(method, "prone_to_co")]
        reference = _reference(by_method)
        for method in by_method:
            if _is(method, "claims_reference_robustness"):
                facts += _gap_facts(
                    method, by_method[method], reference, by_method[reference] if reference is not None else []
                )
        facts += _learning_facts(by_method)
        out[eps] = facts
    return out


def _co_fact(method: str, all_runs: list[dict]) -> str:
    """Whether a method prone to catastrophic overfitting showed it: yes (which seeds) or no."""
    finished = _ok(all_runs)
    name = method_label(method)
    if not finished:
        why = "all failed" if all(r.get("failed") for r in all_runs) else "not finished yet"
        return f"{name}: no run finished ({why}), so nothing can be said about its CO."
    runs = [r for r in finished if not did_not_learn(r)]
    dead = len(finished) - len(runs)
    if not runs:
        return (
            f"{name} shows catastrophic overfitting: cannot say, no run learned ({dead}/{dead} seeds did not "
            "learn: see below)."
        )
    besides = f"; {dead} more seed(s) did not learn" if dead else ""
    # flagged at the end, or flagged during training and given up on by the guard (its final
    # weights are the last healthy epoch's, but the method did overfit)
    flagged = [r for r in runs if (r.get("co_detected") and not _stuck_run(r)) or run_outcome(r) == "gave up"]
    recovered = [r for r in runs if r not in flagged and run_outcome(r) == "recovered"]
    if recovered:
        besides += f"; {len(recovered)} more flagged during training and recovered by the guard"
    if flagged:
        return (
            f"{name} shows catastrophic overfitting: yes, {len(flagged)}/{len(runs)} seeds "
            f"flagged (seed {_seed_list(flagged)}{besides})."
        )
    return f"{name} shows catastrophic overfitting: no (0/{len(runs)} seeds flagged{besides})."


def _gap_facts(method: str, runs: list[dict], reference: str | None, reference_runs: list[dict]) -> list[str]:
    """A method claiming the reference's robustness at less cost (ATAS vs PGD-AT): is it within
    GAP_POINTS points, and at what time ratio."""
    name = method_label(method)
    if reference is None:
        ref = _reference_label()
        return [f"{ref} is not in this comparison: no {name}-vs-{ref} gap or time ratio."]
    ref = method_label(reference)
    mine, theirs = _ok(runs), _ok(reference_runs)
    if not (mine and theirs):
        return []
    use_aa = all(r.get("aa") is not None for r in mine + theirs)
    key = "aa" if use_aa else "pgd"
    metric = "AA" if use_aa else _pgd_label(mine + theirs)
    a, p = _mean(mine, key), _mean(theirs, key)
    ta, tp = _mean(mine, "train_time_s"), _mean(theirs, "train_time_s")
    ratio = f"{ta / tp:.2f}" if tp and ta is not None else "n/a"
    if a is None or p is None:
        facts = [f"{name} vs {ref}: no {metric} accuracy to compare."]
    else:
        gap = 100 * (p - a)  # points the method is below the reference (negative: above)
        side = f"{abs(gap):.1f} points {'below' if gap >= 0 else 'above'} {ref}"
        facts = [
            f"{name} {metric} within {GAP_POINTS:g} points of {ref}: {'yes' if gap <= GAP_POINTS else 'no'} "
            f"({name} {100 * a:.1f}% vs {ref} {100 * p:.1f}%, {side}), time ratio {ratio} "
            f"({name} {ta:.1f} s vs {ref} {tp:.1f} s)."
        ]
    if not use_aa:
        facts.append(
            f"AutoAttack was not evaluated for every {name} and {ref} run (add aa to --attacks); "
            f"the gap above is on {metric}, a weaker attack."
        )
    return facts


def _learning_facts(by_method: dict) -> list[str]:
    """A model that learnt nothing makes every claim vacuous: say which runs did not learn."""
    facts = []
    for method, runs in by_method.items():
        runs = _ok(runs)
        clean, chance = _mean(runs, "clean"), runs[0].get("chance") if runs else None
        if clean is not None and chance is not None and clean <= chance + NEAR_CHANCE:
            facts.append(
                f"{method_label(method)} clean accuracy {100 * clean:.1f}% is near chance "
                f"({100 * chance:.0f}%): these runs did not learn, so the statements above say nothing."
            )
            continue
        dead = [r for r in runs if did_not_learn(r)]
        if dead:  # one seed stuck at a constant prediction drags the mean: say which
            near = [r for r in dead if r["clean"] <= r["chance"] + NEAR_CHANCE]
            weak = [r for r in dead if r not in near]
            why = ([f"clean accuracy near chance, seed {_seed_list(near)}"] if near else []) + (
                [f"robust accuracy about 0 with a clean accuracy far below learning's, seed {_seed_list(weak)}"]
                if weak
                else []
            )
            facts.append(
                f"{method_label(method)}: {len(dead)}/{len(runs)} seeds did not learn ({'; '.join(why)}); "
                "its means above include them."
            )
    return facts


def run_table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Every run on its own line: what the means above are made of (clean, FGSM, PGD and AA always,
    then any other attack evaluated)."""
    columns = attack_columns(rows, always=_FIXED_COLUMNS)
    header = [
        "method",
        "eps",
        "seed",
        *(label for _, label in columns),
        "time (s)",
        "peak memory (MB)",
        "weights",
        "eps ramp",
        "CO epochs (probe)",
        "final-eval CO sign",
        "guard",
        "run folder",
    ]

    def pct(v):
        return "—" if v is None else f"{100 * v:.1f}"

    body = []
    for r in rows:
        if r.get("failed") or r.get("missing"):
            what = (
                "failed: " + r["failed"]
                if r.get("failed") and not r.get("diverged")
                else _diverged_cell(r["diverged"])
                if r.get("failed")
                else "not finished: " + r["missing"]
            )
            body.append(
                [
                    method_label(r["method"]),
                    r["eps"],
                    str(r["seed"]),
                    what,
                    *["—"] * (len(header) - 5),
                    r.get("run_dir", ""),
                ]
            )
            continue
        sig = r.get("co_final_signature")
        co_epochs = ", ".join(map(str, r.get("co_epochs") or [])) or "none"
        body.append(
            [
                method_label(r["method"]),
                r["eps"],
                str(r["seed"]),
                *(pct(_accuracy(r, name)) for name, _ in columns),
                f"{r.get('train_time_s', 0.0):.1f}",
                "—" if r.get("peak_memory_mb") is None else f"{r['peak_memory_mb']:.0f}",
                r.get("weights") or "—",
                _ramp(r),
                f"did not learn (flagged: {co_epochs})" if did_not_learn(r) else co_epochs,
                "not evaluated" if sig is None else ("yes" if sig else "no"),
                _guard_cell(r),
                r.get("run_dir", ""),
            ]
        )
    return header, body


def _diverged_cell(info: dict) -> str:
    return f"diverged at epoch {info.get('epoch')} (loss {info.get('loss')})"


def _ramp(run: dict) -> str:
    n = run.get("eps_ramp_epochs", (run.get("method_args") or {}).get("eps_ramp_epochs", 0)) or 0
    return f"{n} epochs" if n else "none"


def _guard_cell(run: dict) -> str:
    """The run's outcome (`run_outcome`), with each recovery as 'epoch -> rollback target'."""
    cells = [f"e{e['epoch']}->e{e['rollback_to']}" for e in _recoveries(run)]
    return run_outcome(run) + (f" ({', '.join(cells)})" if cells else "")


def schedule_note(rows: list[dict]) -> str:
    """The training-eps schedule of every run, one line: the comparison is fair only if it is the same."""
    ramps: dict[str, set] = {}
    for r in _ok(rows):
        ramps.setdefault(_ramp(r), set()).add(method_label(r["method"]))
    if len(ramps) == 1:
        ((ramp, _),) = ramps.items()
        return f"Training-eps schedule: the same for every run (eps ramp: {ramp})."
    return (
        "Training-eps schedule DIFFERS between runs: "
        + "; ".join(f"eps ramp {ramp}: {', '.join(sorted(methods))}" for ramp, methods in ramps.items())
        + "."
    )


def _value(v) -> str:
    return f"{v:g}" if isinstance(v, (int, float)) else str(v)


def search_blocks(search: list[dict]) -> list[tuple]:
    """The 'Hyper-parameter search' section of `atas compare --tune`: how the values were chosen and,
    per (method, eps), every grid value's validation accuracy with the one chosen marked."""
    if not search:
        return []
    first = search[0]
    blocks: list[tuple] = [("h2", "Hyper-parameter search")]
    blocks.append(
        (
            "p",
            "A hyper-parameter tuned in another setting (Method.search) was chosen per method and eps "
            f"on a validation split: one run per grid value (seed {first.get('seed')}), trained without "
            f"the last {first.get('val_size')} training images and validated on the first "
            f"{first.get('n_examples')} of them; the value with the best validation PGD accuracy was "
            "chosen (ties: clean accuracy, then the first in the grid; a value whose model did not learn "
            "or predicts a constant is out, and with none left the method is untuned), and the seeds "
            "above ran with it on the full training set. The test set played no part in the choice.",
        )
    )
    labels = {r.get("pgd_label") for s in search for r in s.get("results") or [] if r.get("pgd_label")}
    pgd = labels.pop() if len(labels) == 1 else "PGD"
    header = ["method", "eps", "option", "grid", "value", "val clean (%)", f"val {pgd} (%)", "chosen", "run folder"]
    body = []
    for s in search:
        grid = ", ".join(_value(v) for v in s.get("grid") or [])
        common = [method_label(s["method"]), s["eps"], s["option"], grid]
        if s.get("skipped"):
            body.append(common + ["—", "—", "—", f"not searched: {s['skipped']}", ""])
            continue
        if s.get("results") and s.get("chosen") is None and all(r.get("missing") is None for r in s["results"]):
            verdict = "untuned: the method's default"
        else:
            verdict = ""
        for r in s.get("results") or []:
            if r.get("failed") or r.get("missing"):
                what = "failed: " + r["failed"] if r.get("failed") else "not finished: " + r["missing"]
                cells = [what, "—"]
            else:
                cells = [f"{100 * r['clean']:.1f}", f"{100 * r['pgd']:.1f}"]
            changed = r.get("guard_changes") or {}
            mark = "yes" if s.get("chosen") is not None and r["value"] == s["chosen"] else verdict
            if r.get("rejected"):  # out of the choice: the model did not learn
                mark = (mark + "; " if mark else "") + "out: " + r["rejected"]
            if changed:  # the guard raised the value during that run (train.co_action=recover)
                mark = (
                    (mark + "; " if mark else "")
                    + "guard changed "
                    + ", ".join(f"{k} to {_value(v)}" for k, v in changed.items())
                )
            body.append(common + [_value(r["value"])] + cells + [mark, r.get("run_dir", "")])
    blocks.append(("table", header, body))
    return blocks


def guard_lines(rows: list[dict]) -> list[str]:
    """Every decision of the guard (train.co_action=recover), one line each."""
    return [
        f"{method_label(r['method'])} eps {r['eps']} seed {r['seed']}: {describe(e)}"
        for r in _ok(rows)
        for e in r.get("guard_events") or []
    ]


# --------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------
def _figure(n_panels: int, width: float = 4.6, height: float = 3.6, integer_x: bool = True):
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(max(6.4, width * n_panels), height), layout="constrained")
    axes = fig.subplots(1, n_panels, squeeze=False)[0]
    if integer_x:  # epochs
        for ax in axes:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return fig, axes


def _colors(methods: list[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return {m: cmap(i % 10) for i, m in enumerate(methods)}


def _methods(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(r["method"] for r in rows))


def _mean_curve(runs: list[dict], key: str) -> tuple[list[int], list[float]]:
    """Mean over seeds per epoch (seeds that reached that epoch)."""
    per_epoch: dict[int, list[float]] = {}
    for r in runs:
        c = r.get("curves") or {}
        for e, v in zip(c.get("epoch", []), c.get(key, [])):
            if v is not None:
                per_epoch.setdefault(e, []).append(v)
    epochs = sorted(per_epoch)
    return epochs, [statistics.fmean(per_epoch[e]) for e in epochs]


def _plot_seeds_and_mean(ax, by_method: dict, colors: dict, key: str, scale: float = 1.0) -> None:
    """One curve `key` per run (thin), its mean over seeds (thick), 'x' on the epochs the monitor
    flagged; points that are None are skipped."""
    for method, runs in by_method.items():
        color = colors[method]
        for r in runs:
            c = r["curves"]
            pts = [
                (e, scale * v, flag)
                for e, v, flag in zip(c["epoch"], c[key], c.get("co") or [False] * len(c[key]))
                if v is not None
            ]
            ax.plot([e for e, _, _ in pts], [v for _, v, _ in pts], color=color, lw=0.8, alpha=0.35)
            co = [(e, v) for e, v, flag in pts if flag]
            if co:
                ax.scatter(*zip(*co), marker="x", s=60, color=color, linewidths=2, zorder=3)
        epochs, mean = _mean_curve(runs, key)
        ax.plot(epochs, [scale * v for v in mean], color=color, lw=2.2, label=method_label(method))


def plot_probe_curves(rows: list[dict], path: str | Path) -> Path | None:
    """Probe PGD accuracy per epoch, one panel per eps: thick = mean over seeds, thin = each seed,
    'x' = an epoch the CO monitor flagged. CO reads as a line falling to ~0 with x marks on it."""
    rows = [r for r in _ok(rows) if (r.get("curves") or {}).get("probe_pgd")]
    if not rows:
        return None
    groups = group_runs(rows)
    colors = _colors(_methods(rows))
    fig, axes = _figure(len(groups))
    for ax, (eps, by_method) in zip(axes, groups.items()):
        _plot_seeds_and_mean(ax, by_method, colors, "probe_pgd", scale=100)
        ax.set_title(f"eps = {eps}")
        ax.set_xlabel("epoch")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("probe PGD accuracy (%)")
    axes[0].scatter([], [], marker="x", color="black", label="CO flagged")
    axes[0].legend(fontsize=8)
    fig.suptitle("Probe PGD accuracy during training\n(catastrophic overfitting = collapse to ~0, marked x)")
    fig.savefig(path, dpi=110)
    return Path(path)


def plot_probe_masking(rows: list[dict], path: str | Path) -> Path | None:
    """The CO monitor's masked-gradient signal per epoch, one panel per eps: worst-case probe
    accuracy (cross-entropy and margin PGD) over FGSM probe accuracy; thick = mean over seeds,
    thin = each seed, dotted = the monitor's threshold, 'x' = an epoch the monitor flagged. A
    healthy run sits near 1; a run whose robustness is an artefact of masked gradients sinks."""

    def with_ratio(r):
        c = r["curves"]
        ratio = [w / f if w is not None and f else None for w, f in zip(c["probe_pgd_worst"], c["probe_fgsm"])]
        return {**r, "curves": {**c, "masking": ratio}}

    rows = [
        with_ratio(r)
        for r in _ok(rows)
        if any(v is not None for v in (r.get("curves") or {}).get("probe_pgd_worst", []))
    ]
    if not rows:
        return None
    groups = group_runs(rows)
    colors = _colors(_methods(rows))
    fig, axes = _figure(len(groups))
    for ax, (eps, by_method) in zip(axes, groups.items()):
        _plot_seeds_and_mean(ax, by_method, colors, "masking")
        ax.axhline(COMonitor.mask_ratio, color="black", ls=":", lw=1)
        ax.set_title(f"eps = {eps}")
        ax.set_xlabel("epoch")
        ax.set_ylim(0, 1.1)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("worst-case probe PGD / probe FGSM accuracy")
    axes[0].scatter([], [], marker="x", color="black", label="CO flagged")
    axes[0].legend(fontsize=8)
    fig.suptitle(
        "Masked gradients: worst-case (CE + margin) PGD over FGSM probe accuracy\n"
        f"(dotted: the monitor's threshold {COMonitor.mask_ratio:g}; x: flagged)"
    )
    fig.savefig(path, dpi=110)
    return Path(path)


def plot_alpha(rows: list[dict], path: str | Path) -> Path | None:
    """ATAS step size per epoch, one panel per eps: mean over seeds of the epoch's mean alpha, band =
    smallest .. largest per-sample alpha over seeds; dashed: eps; dotted: the configured clamp."""
    # The method that logs a per-sample step size alpha (ATAS: Method.logged_stats).
    rows = [r for r in _ok(rows) if "alpha" in _logged(r["method"]) and (r.get("curves") or {}).get("alpha_mean")]
    if not rows:
        return None
    method = rows[0]["method"]
    rows = [r for r in rows if r["method"] == method]
    label = method_label(method)
    groups = group_runs(rows)
    fig, axes = _figure(len(groups))
    for ax, (eps, by_method) in zip(axes, groups.items()):
        runs = by_method[method]
        epochs, mean = _mean_curve(runs, "alpha_mean")
        lo: dict[int, float] = {}
        hi: dict[int, float] = {}
        for r in runs:
            c = r["curves"]
            for e, a, b in zip(c["epoch"], c.get("alpha_min", []), c.get("alpha_max", [])):
                if a is not None and b is not None:
                    lo[e], hi[e] = min(lo.get(e, a), a), max(hi.get(e, b), b)
        band = [e for e in epochs if e in lo]
        ax.fill_between(
            band, [lo[e] for e in band], [hi[e] for e in band], color="C0", alpha=0.2, label="min .. max over samples"
        )
        ax.plot(epochs, mean, color="C0", lw=2, marker="o", ms=3, label="mean alpha")
        ax.axhline(runs[0].get("eps_value", float("nan")), color="gray", ls="--", lw=1, label="eps")
        for bound in ("alpha_min", "alpha_max"):  # the configured clamp, where alpha saturates
            args = runs[0].get("method_args") or {}
            value = args.get(bound)
            if value is not None:
                unit = runs[0].get("eps_value", 1.0) if args.get("alpha_unit") == "eps" else 1.0
                ax.axhline(
                    parse_fraction(value) * unit,
                    color="C3",
                    ls=":",
                    lw=1,
                    label="alpha_min / alpha_max" if bound == "alpha_min" else None,
                )
        ax.set_title(f"eps = {eps}")
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"{label} step size alpha (pixel units)")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{label} adaptive step size during training")
    fig.savefig(path, dpi=110)
    return Path(path)


def plot_time_vs_robust(rows: list[dict], path: str | Path) -> Path | None:
    """Final robust accuracy (AA where every run has it, else PGD) against training time: one
    point per run, colour = method, marker = eps."""
    rows = _ok(rows)
    key = "aa" if rows and all(r.get("aa") is not None for r in rows) else "pgd"
    rows = [r for r in rows if r.get(key) is not None and r.get("train_time_s") is not None]
    if not rows:
        return None
    colors = _colors(_methods(rows))
    markers = dict(zip(group_runs(rows), "os^Dvp*hX"))
    with_memory = [r for r in rows if r.get("peak_memory_mb") is not None]
    fig, axes = _figure(2 if with_memory else 1, width=6.0, height=4.2, integer_x=False)
    panels = [("train_time_s", "training time (s, sum of epoch times)", rows)]
    if with_memory:  # the second cost the benchmark reports (atas.cost: what the number measures)
        kinds = {r.get("memory_kind") for r in with_memory}
        what = (
            "GPU max allocated"
            if kinds == {"cuda_max_allocated"}
            else "CPU: the process's peak RSS"
            if kinds == {"cpu_peak_rss_process"}
            else "mixed devices"
        )
        panels.append(("peak_memory_mb", f"peak memory (MB, {what})", with_memory))
    for ax, (x_key, x_label, points) in zip(axes, panels):
        for (method, eps), _ in {(r["method"], r["eps"]): None for r in points}.items():
            runs = [r for r in points if r["method"] == method and r["eps"] == eps]
            ax.scatter(
                [r[x_key] for r in runs],
                [100 * r[key] for r in runs],
                color=colors[method],
                marker=markers.get(eps, "o"),
                s=40,
                edgecolors="black",
                linewidths=0.5,
            )
        ax.set_xlabel(x_label)
        ax.set_ylabel(f"final {'AutoAttack' if key == 'aa' else _pgd_label(rows)} accuracy (%)")
        ax.grid(alpha=0.3)
    ax = axes[0]
    for method, color in colors.items():
        ax.scatter([], [], color=color, marker="o", label=method_label(method))
    for eps, marker in markers.items():
        ax.scatter([], [], color="gray", marker=marker, label=f"eps {eps}")
    ax.legend(fontsize=8)
    ax.set_title("Robustness vs training cost (one point per run)")
    fig.savefig(path, dpi=110)
    return Path(path)


# --------------------------------------------------------------------------------------------
# The document: one list of blocks rendered twice (Markdown and HTML), so both say the same
# --------------------------------------------------------------------------------------------
def _notes(rows: list[dict], ok: list[dict], search: list[dict] | None = None) -> list[str]:
    """What the numbers are and how far to trust them; the loud warnings first."""
    n_examples = sorted({int(r["n_examples"]) for r in ok if r.get("n_examples")})
    epochs = sorted({int(e) for e in (r.get("epochs_planned") or r.get("epochs") for r in ok) if e})
    notes = [
        "Accuracies in % on the first "
        + (" / ".join(str(n) for n in n_examples) or "?")
        + " test images"
        + (f" (one image = {100 / n_examples[0]:.2f} points)" if len(n_examples) == 1 else "")
        + "; mean ± sample std (n-1) over seeds.",
        "Train time: sum of the per-epoch training time (epoch_time_s), excluding the per-epoch probe and "
        "the final evaluation" + (f"; {', '.join(map(str, epochs))} epochs" if epochs else "") + ".",
        "CO: seeds with catastrophic overfitting, flagged by the per-epoch probe monitor (probe PGD accuracy "
        "collapsing while FGSM accuracy rises) or by the final evaluation (FGSM accuracy above clean).",
        "AA is standard AutoAttack (fra31, via pyautoattack); '—' where it was not evaluated.",
    ]
    if ok:
        notes.append(schedule_note(rows))
        n_guard = len(guard_lines(rows))
        notes.append(
            f"The guard (train.co_action=recover) acted {n_guard} time(s): see 'Guard' below; train time "
            "includes the epochs it replayed."
            if n_guard
            else "The guard (train.co_action=recover, where on) never had to act."
        )
    for item in search or []:
        if item.get("chosen") is not None:
            notes.append(
                f"{method_label(item['method'])} at eps {item['eps']} ran with {item['option']} = "
                f"{_value(item['chosen'])}, chosen on a validation split (see 'Hyper-parameter search')."
            )
        elif item.get("skipped"):
            notes.append(
                f"{method_label(item['method'])} at eps {item['eps']}: {item['option']} not searched "
                f"({item['skipped']})."
            )
        elif item.get("untuned") or (item.get("results") and all(r.get("missing") is None for r in item["results"])):
            notes.insert(
                0,
                f"UNTUNED: {method_label(item['method'])} at eps {item['eps']} ran with the method's "
                f"default {item['option']}: "
                + (item.get("untuned") or "every value of the search failed")
                + " (see 'Hyper-parameter search').",
            )
    if ok and not any(r.get("aa") is not None for r in ok):
        notes.insert(0, AA_NOT_RUN)
    weak = [r for r in ok if any(w.startswith("WEAK ATTACK") for w in r.get("eval_warnings") or [])]
    if weak:
        notes.insert(
            0,
            f"WEAK ATTACK in {len(weak)} run(s) ({', '.join(r.get('run_dir', '?') for r in weak)}): "
            "AutoAttack is more than a few points below PGD there; PGD overstates their robustness.",
        )
    no_probe = [r for r in ok if not (r.get("curves") or {}).get("probe_pgd")]
    if no_probe:
        notes.append(
            f"{len(no_probe)} run(s) trained without the per-epoch probe (train.probe_size=0): their CO "
            "verdict rests on the final evaluation alone, and only if FGSM was evaluated."
        )
    missing = [r for r in rows if r.get("missing")]
    if missing:
        notes.insert(
            0,
            f"PARTIAL: {len(missing)} of {len(rows)} planned runs have not finished (marked 'not "
            "finished' in the table of every run); means and verdicts are over the seeds that have.",
        )
    return notes


def _plot_blocks(images: dict[str, Path | None]) -> list[tuple]:
    blocks: list[tuple] = []
    captions = {
        PROBE_PLOT: "Probe PGD accuracy per epoch (thick: mean over seeds; thin: each seed; x: CO flagged).",
        MASK_PLOT: "The CO monitor's masked-gradient signal per epoch: worst-case (cross-entropy and margin) "
        "PGD probe accuracy over FGSM probe accuracy; dotted: its threshold (x: CO flagged).",
        ALPHA_PLOT: "ATAS step size per epoch (mean; band: min..max over samples and seeds; dashed: eps; "
        "dotted: the alpha_min/alpha_max clamp).",
        TIME_PLOT: "Final robust accuracy vs training time (left) and vs peak memory (right, where "
        "recorded), one point per run.",
    }
    drawn = [(name, p) for name, p in images.items() if p is not None]
    if drawn:
        blocks.append(("h2", "Plots"))
        for name, p in drawn:
            blocks.append(("p", captions.get(name, name)))
            blocks.append(("img", Path(p).name, Path(p).stem.replace("_", " ")))
    missing = [name for name, p in images.items() if p is None]
    if missing:
        blocks.append(
            (
                "p",
                "Not drawn (no data for them): "
                + ", ".join(missing)
                + (" (no ATAS run)" if ALPHA_PLOT in missing else "")
                + ".",
            )
        )
    return blocks


def _blocks(
    rows: list[dict],
    command: str | dict,
    machine: dict,
    images: dict[str, Path | None],
    date: str,
    search: list[dict] | None = None,
) -> list[tuple]:
    ok = _ok(rows)
    cmd = command if isinstance(command, dict) else {"command": command}
    blocks: list[tuple] = [("h1", "atas compare report")]
    blocks.append(("p", "Command line:"))
    blocks.append(("code", cmd["command"]))
    if cmd.get("equivalent") and cmd["equivalent"] != cmd["command"]:
        blocks.append(("p", "The same comparison as an `atas` command:"))
        blocks.append(("code", cmd["equivalent"]))
    items = [f"date: {date}"] + [f"{k}: {v}" for k, v in machine.items() if v not in (None, "")]
    blocks.append(("list", items))
    blocks.append(("h2", "Results"))
    blocks.append(("list", _notes(rows, ok, search)))
    facts = findings(rows)
    for eps, header, body in summary_tables(rows):
        blocks.append(("h3", f"eps = {eps}"))
        blocks.append(("table", header, body))
        if facts.get(eps):
            blocks.append(("list", facts[eps]))
    blocks += search_blocks(search or [])
    blocks += _plot_blocks(images)
    if guard_lines(rows):
        blocks.append(("h2", "Guard"))
        blocks.append(("p", "Each recovery: the flagged epoch, the epoch rolled back to, the remedy, the verdict."))
        blocks.append(("list", guard_lines(rows)))
    header, body = run_table(rows)
    blocks.append(("h2", "Runs"))
    blocks.append(("table", header, body))
    warned = [(r, w) for r in ok for w in r.get("eval_warnings") or []]
    if warned:
        blocks.append(("h2", "Evaluation warnings"))
        blocks.append(
            ("list", [f"{method_label(r['method'])} eps {r['eps']} seed {r['seed']}: {w}" for r, w in warned])
        )
    return blocks


def _render_md(blocks: list[tuple]) -> str:
    out = []
    for kind, *rest in blocks:
        if kind in ("h1", "h2", "h3"):
            out.append("#" * int(kind[1]) + " " + rest[0])
        elif kind == "p":
            out.append(rest[0])
        elif kind == "code":
            out.append("```\n" + rest[0] + "\n```")
        elif kind == "list":
            out.append("\n".join(f"- {item}" for item in rest[0]))
        elif kind == "table":
            out.append(_md_table(rest[0], [[c.replace("|", "\\|") for c in row] for row in rest[1]]))
        elif kind == "img":
            out.append(f"![{rest[1]}]({rest[0]})")
    return "\n\n".join(out) + "\n"


_CSS = (
    "body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}"
    "table{border-collapse:collapse;margin:0.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;"
    "text-align:right}td:first-child,th:first-child{text-align:left}th{background:#f3f3f3}"
    "pre{background:#f6f6f6;padding:0.6em;overflow-x:auto;white-space:pre-wrap}img{max-width:100%}"
)


def _render_html(blocks: list[tuple]) -> str:
    e = html.escape
    out = [
        "<!DOCTYPE html>",
        "<html><head><meta charset=\"utf-8\"><title>atas compare report</title>",
        f"<style>{_CSS}</style></head><body>",
    ]
    for kind, *rest in blocks:
        if kind in ("h1", "h2", "h3"):
            out.append(f"<{kind}>{e(rest[0])}</{kind}>")
        elif kind == "p":
            out.append(f"<p>{e(rest[0])}</p>")
        elif kind == "code":
            out.append(f"<pre><code>{e(rest[0])}</code></pre>")
        elif kind == "list":
            out.append("<ul>" + "".join(f"<li>{e(item)}</li>" for item in rest[0]) + "</ul>")
        elif kind == "table":
            head = "".join(f"<th>{e(h)}</th>" for h in rest[0])
            body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in rest[1])
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif kind == "img":
            out.append(f"<p><img src=\"{e(rest[0])}\" alt=\"{e(rest[1])}\"></p>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def build_report(
    rows: list[dict], out_dir: str | Path, command: str | dict, machine: dict, search: list[dict] | None = None
) -> Path:
    """Write report.md, report.html and the PNG plots into out_dir; returns the report.md path.

    rows: summary.json's runs. command: the command line (or {"command", "equivalent"}).
    machine: what ran it (cpu, cores, torch, gpu, ...), listed as given. search: summary.json's
    "search" (`atas compare --tune`), shown as the 'Hyper-parameter search' section."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    if available("matplotlib"):  # an optional dependency (`atas[plots]`)
        images = {
            PROBE_PLOT: plot_probe_curves(rows, out_dir / PROBE_PLOT),
            MASK_PLOT: plot_probe_masking(rows, out_dir / MASK_PLOT),
            ALPHA_PLOT: plot_alpha(rows, out_dir / ALPHA_PLOT),
            TIME_PLOT: plot_time_vs_robust(rows, out_dir / TIME_PLOT),
        }
    else:
        print(f"report: no plots, matplotlib is not installed: {INSTALL['matplotlib']}", file=sys.stderr)
        images = dict.fromkeys((PROBE_PLOT, MASK_PLOT, ALPHA_PLOT, TIME_PLOT))
    for name, p in images.items():  # a stale plot from an earlier report must not be shown
        if p is None and (out_dir / name).exists():
            (out_dir / name).unlink()
    date = datetime.datetime.now(datetime.timezone.utc).astimezone().isoformat(timespec="seconds")
    blocks = _blocks(rows, command, machine, images, date, search)
    md = out_dir / "report.md"
    atomic_write_text(md, _render_md(blocks))  # regular files only, never through a link (check_own_file)
    atomic_write_text(out_dir / "report.html", _render_html(blocks))
    return md
