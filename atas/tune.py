"""`atas compare --tune`: a small hyper-parameter search on a validation split, before the seeds run.

A method whose published hyper-parameter was tuned in another setting (ELLE's lambda on CIFAR-10
at eps <= 26/255, GradAlign's at eps <= 16/255) declares it with its grid (`Method.search`). For
each (method, eps) of the comparison:

  1. one run per grid value, seed = the comparison's base seed, trained on the training split less
     its last V images (data.val_size=V), in OUT/tune/<method>_eps<eps>_<option><value>/;
  2. each evaluated on the first n (default up to 1000) of the V held-out images: clean accuracy and
     PGD-10 (one restart, the evaluation's step: the threat model's measured default unless
     eval.pgd_* says otherwise), written to the run's val.json;
  3. the value with the best validation PGD accuracy wins (ties: clean accuracy, then the first in
     the grid); a value whose run diverged is out, and so is one whose model did not learn
     (validation clean accuracy within atas.guard.NEAR_CHANCE of chance) or predicts a constant
     (clean = PGD accuracy, at most 0.25: nothing to attack, so its "robust" accuracy is the share
     of one class). When no value is left the method is untuned: summary.json's search says why
     ("untuned"), the report says so, and its seeds run with the method's default;
  4. the comparison's seeds run with `<method>.<option>=<chosen>` on the full training split.

The test set is never looked at to choose. Finished search runs are read back when the command is
run again, as the seeds are. An explicit value (`elle.lam=100`, `method.lam=100`, or the recipe's
`method.elle.lam`) skips the search for that method, with a note. The guard (train.co_action=recover)
acts in the search runs as in the seeds: the value searched is the one a run starts with.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from atas.config import Config, ConfigError, load_config

DEFAULT_VAL_SIZE = 5000  # Fashion-MNIST: 1/12 of its 60000 training images


def value_text(value: float) -> str:
    """How a grid value is written in folder names, tables and overrides: 1000.0 -> '1000', 0.5 -> '0.5'."""
    return f"{value:g}"


def search_name(method: str, eps: str, option: str, value: float) -> str:
    return f"{method}_eps{eps.replace('/', '-')}_{option}{value_text(value)}"


@dataclass
class Search:
    """The search of one (method, eps): its runs, then what they measured and the value chosen."""

    method: str
    eps: str
    option: str
    grid: tuple[float, ...]
    specs: list = field(default_factory=list)  # atas.sweep.RunSpec, one per grid value
    skipped: str | None = None  # why no search runs (an explicit value was given)
    results: list[dict] = field(default_factory=list)
    chosen: float | None = None
    untuned: str | None = None  # why no value was chosen (all failed or did not learn)

    @property
    def finished(self) -> bool:
        """Every value has a validation result or a recorded failure (nothing still to train)."""
        return (
            self.skipped is None
            and len(self.results) == len(self.grid)
            and not any(r.get("missing") for r in self.results)
        )

    def override(self) -> list[str]:
        """What the seeds run with: the chosen value, or nothing (skipped, or every value failed)."""
        return [] if self.chosen is None else [f"method.{self.option}={value_text(self.chosen)}"]

    def summary(self, val_size: int, n_examples: int, seed: int) -> dict:
        return {
            "method": self.method,
            "eps": self.eps,
            "option": self.option,
            "grid": list(self.grid),
            "val_size": val_size,
            "n_examples": n_examples,
            "seed": seed,
            "skipped": self.skipped,
            "results": self.results,
            "chosen": self.chosen,
            "untuned": self.untuned,
        }


def searched_option(method: str) -> tuple[str, tuple[float, ...]] | None:
    """(option, grid) that `method` declares in `search`, or None."""
    from atas.methods import get_method

    search = get_method(method).search
    if not search:
        return None
    if len(search) > 1:
        raise ConfigError(
            f"method {method} declares a search over {len(search)} options ({', '.join(search)}); "
            "--tune searches one option per method (a grid over several multiplies the runs)"
        )
    ((option, grid),) = search.items()
    grid = tuple(float(v) for v in grid)
    if not grid:
        raise ConfigError(f"method {method} declares an empty grid for {option}; give it at least one value")
    return option, grid


def explicit_value(option: str, overrides: list[str], base: Config, method: str) -> str | None:
    """The value of `option` the user gave this method (its routed `method.<option>=v` overrides, or
    the recipe's method.<method>.<option>), or None: then it is searched."""
    for item in reversed(overrides):
        key, value = item.split("=", 1)
        if key.strip() == f"method.{option}":
            return value.strip()
    recipe = (base.method.per_method.get(method) or {}).get(option)
    return None if recipe is None else str(recipe)


@functools.cache
def _train_set_size(name: str, data_dir: str | None, download: bool) -> int:
    from atas.data import dataset_info, image_folder, load_tensors

    if dataset_info(name).resident:
        return len(load_tensors(name, "train", data_dir, download)[1])
    return len(image_folder(name, "train", data_dir))


def check_tune_sizes(base: Config, val_size: int, n_examples: int | None) -> int:
    """Check --tune-val-size and --tune-n-examples against the training split (before anything
    trains); returns the number of validation images each value is evaluated on."""
    from atas.data import check_subset, check_val_size
    from atas.evaluation.run import VAL_N_EXAMPLES

    if val_size < 1:
        raise ConfigError(f"--tune-val-size must be >= 1 (training images held out to choose on), got {val_size}")
    d = base.data
    available = check_subset(d.subset, _train_set_size(d.name, d.data_dir, d.download))
    try:
        check_val_size(val_size, available)
    except ConfigError:
        raise ConfigError(
            f"--tune-val-size={val_size} but the training split has {available} images"
            f"{' (data.subset)' if d.subset else ''}; give at most {available - 1} "
            "(the search trains on the rest)"
        ) from None
    if n_examples is None:
        return min(VAL_N_EXAMPLES, val_size)
    if not 1 <= n_examples <= val_size:
        raise ConfigError(
            f"--tune-n-examples={n_examples}: the search evaluates on the {val_size} held-out images "
            f"of --tune-val-size; give 1..{val_size}"
        )
    return n_examples


def plan_searches(
    recipe: str, methods: list[str], eps_list: list[str] | None, routed, out: Path, val_size: int, notes: list[str]
) -> list[Search]:
    """Every search's checked run configs (eps outer, then method, then grid value); searches skipped
    for an explicit value are kept (so summary and report say so) and noted in `notes`."""
    from atas.sweep import RunSpec, method_tree

    base = load_config(recipe, routed.common)
    searches = []
    for eps in eps_list or [base.method.eps.text]:
        for method in methods:
            declared = searched_option(method)
            if declared is None:
                continue
            option, grid = declared
            search = Search(method, eps, option, grid)
            searches.append(search)
            given = explicit_value(option, routed.per_method[method], base, method)
            if given is not None:
                search.skipped = f"{option}={given} given explicitly"
                note = (
                    f"{method}.{option}={given} is given: its hyper-parameter search "
                    f"({option} over {', '.join(map(value_text, grid))}) is skipped"
                )
                if note not in notes:  # one note per method, not per eps
                    notes.append(note)
                continue
            tree = method_tree(base, method)
            for value in grid:
                cfg = load_config(
                    tree,
                    routed.per_method[method]
                    + [
                        f"method.{option}={value_text(value)}",
                        f"method.eps={eps}",
                        f"train.seed={base.train.seed}",
                        f"data.val_size={val_size}",
                    ],
                )
                search.specs.append(
                    RunSpec(method, eps, base.train.seed, cfg, out / "tune" / search_name(method, eps, option, value))
                )
    return searches


def val_is_current(run_dir: Path, cfg: Config, n_examples: int) -> bool:
    """RUN/val.json exists, is newer than the checkpoint and measured what is asked now."""
    from atas.evaluation.run import VAL_FILE, validation_request
    from atas.rundir import CHECKPOINT

    path, ckpt = run_dir / VAL_FILE, run_dir / CHECKPOINT
    if not path.exists() or (ckpt.exists() and path.stat().st_mtime_ns < ckpt.stat().st_mtime_ns):
        return False
    try:
        return json.loads(path.read_text()).get("request") == validation_request(cfg, n_examples)
    except ValueError:
        return False


def run_value(spec, option: str, n_examples: int, report_only: bool, out: Path) -> tuple[dict, str]:
    """Train (as needed) and validate one grid value's run: (its result row, what was done)."""
    import atas.evaluation.run
    from atas.evaluation.run import VAL_FILE
    from atas.export import load_model
    from atas.factories import resolve_device
    from atas.guard import option_changes
    from atas.rundir import EVAL, EVAL_STATE, TrainingDiverged
    from atas.sweep import _read_log, train_as_needed, training_status

    value = float(spec.cfg.method.args[option])
    row = {"value": value, "run_dir": os.path.relpath(spec.run_dir, out)}
    if report_only:
        status = training_status(spec.run_dir, spec.cfg)
        if status != "done" or not val_is_current(spec.run_dir, spec.cfg, n_examples):
            missing = {"fresh": "not started", "resume": "training unfinished"}.get(status, "not validated")
            return {**row, "missing": missing}, f"{missing} (--report-only)"
        done = []
    else:
        try:
            model, done = train_as_needed(spec, stale=(VAL_FILE, EVAL, EVAL_STATE))
        except TrainingDiverged as e:  # one diverged value is a result of the search, not its end
            return {**row, "failed": str(e)}, f"FAILED: {e}"
        if model is not None or not val_is_current(spec.run_dir, spec.cfg, n_examples):
            if model is None:
                model, _, _ = load_model(spec.run_dir, resolve_device(spec.cfg.train.device))
            atas.evaluation.run.evaluate_validation(model, spec.cfg, spec.run_dir, n_examples)
            done.append("validated")
    result = json.loads((spec.run_dir / VAL_FILE).read_text())["results"]
    from atas.data import dataset_info

    row.update(
        clean=result["clean"]["accuracy"],
        pgd=result["pgd"]["accuracy"],
        pgd_label=result["pgd"]["label"],
        n_examples=result["clean"]["n"],
        guard_changes=option_changes(_read_log(spec.run_dir)),
        chance=1.0 / dataset_info(spec.cfg.data.name).num_classes,
    )
    return row, ", ".join(done) or "finished before: read back"


# A constant prediction: clean and PGD accuracy within this of each other, and clean at most
# CONSTANT_MAX (the monitor's stuck rule, atas.monitor.COMonitor.stuck_tol / stuck_max).
CONSTANT_TOL, CONSTANT_MAX = 0.01, 0.25


def rejected(row: dict) -> str | None:
    """Why a validated value cannot be chosen ('did not learn' / 'constant prediction'), or None."""
    from atas.guard import NEAR_CHANCE

    clean, pgd, chance = row.get("clean"), row.get("pgd"), row.get("chance", 0.1)
    if clean is None or pgd is None:
        return None
    if clean <= chance + NEAR_CHANCE:
        return f"did not learn (validation clean {100 * clean:.1f}%, chance {100 * chance:.0f}%)"
    if abs(clean - pgd) <= CONSTANT_TOL and clean <= CONSTANT_MAX:
        return f"constant prediction (validation clean {100 * clean:.1f}% = PGD {100 * pgd:.1f}%)"
    return None


def choose(results: list[dict]) -> float | None:
    """The value with the best validation PGD accuracy; ties: the better clean accuracy, then the
    first in the grid. Values whose run failed or has not finished are out, and so are models that
    did not learn or predict a constant (`rejected`); None if none is left."""
    scored = [r for r in results if r.get("pgd") is not None and rejected(r) is None]
    if not scored:
        return None
    return max(scored, key=lambda r: (r["pgd"], r["clean"]))["value"]  # max keeps the first of equals


def run_search(search: Search, n_examples: int, report_only: bool, out: Path, notes: list[str]) -> None:
    """Run (or read back) every value of `search`, fill its results and choice, print a line each."""
    head = f"search {search.method} eps={search.eps}"
    if search.skipped:
        print(f"{head}: skipped ({search.skipped})", flush=True)
        return
    for spec in search.specs:
        row, action = run_value(spec, search.option, n_examples, report_only, out)
        search.results.append(row)
        accs = (
            f"; validation clean {100 * row['clean']:.1f}% {row['pgd_label']} {100 * row['pgd']:.1f}%"
            if row.get("pgd") is not None
            else ""
        )
        print(f"{head} {search.option}={value_text(row['value'])}: {action}{accs}", flush=True)
    if not search.finished:
        print(f"{head}: not finished (--report-only); its seeds wait for it", flush=True)
        return
    for row in search.results:
        why = rejected(row)
        if why:
            row["rejected"] = why
    search.chosen = choose(search.results)
    if search.chosen is None:
        whys = [f"{value_text(r['value'])}: " + (r.get("rejected") or "failed") for r in search.results]
        search.untuned = (
            f"no value of {search.option} can be chosen: every one failed or did not learn ({'; '.join(whys)})"
        )
        notes.append(
            f"{search.method} eps {search.eps}: UNTUNED, {search.untuned}; its seeds run with the method's default"
        )
        print(f"{head}: UNTUNED ({search.untuned}); the seeds run with the method's default", flush=True)
    else:
        print(f"{head}: chose {search.option}={value_text(search.chosen)}", flush=True)
