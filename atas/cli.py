"""`atas` command line: train, eval, export, recipes (and compare).

    atas train RECIPE [key=value ...] [--run-dir DIR] [--overwrite]
    atas train --resume RUN_DIR
    atas eval CHECKPOINT|RUN_DIR|EXPORT_DIR [--attacks clean,fgsm,pgd,aa] [--n-examples N]
    atas export RUN_DIR|CHECKPOINT --out DIR
    atas recipes
    atas --version

Exit status: 0 done; 2 an error the user can fix (bad config, missing or corrupt data, unusable
checkpoint or export, a missing optional package), printed as one clear message, no traceback;
3 the training loss became NaN/inf (the last good checkpoint is kept); 130 interrupted. Every error
of atas is an `atas.AtasError` and carries its exit status (`main` turns it into one line).
`--debug` anywhere on the line, or ATAS_DEBUG=1 in the environment, also prints the traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
import warnings
from pathlib import Path

import yaml

from atas.errors import AtasError


def _parser() -> argparse.ArgumentParser:
    import platform

    import torch

    from atas.provenance import __version__

    p = argparse.ArgumentParser(prog="atas", description="Fast adversarial training with adaptive step size.")
    p.add_argument(
        "--version",
        action="version",
        version=f"atas {__version__} (torch {torch.__version__}, Python {platform.python_version()})",
    )
    p.add_argument(
        "--debug",
        action="store_true",
        help="on an error, also print the traceback (anywhere on the line; or ATAS_DEBUG=1)",
    )
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model from a recipe (or resume a run)")
    t.add_argument("recipe", nargs="?", help="shipped recipe name (see `atas recipes`) or a YAML path")
    t.add_argument("overrides", nargs="*", help="key=value overrides, e.g. method.eps=8/255 train.epochs=10")
    t.add_argument("--run-dir", help="run folder (default: <out_dir>/<name>)")
    t.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR from its last checkpoint; a run that ended (finished, stopped, "
        "or given up by the guard) trains nothing unless train.epochs=N raises its epochs",
    )
    t.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a run already in the run folder (its checkpoints, metrics and eval.json go)",
    )

    e = sub.add_parser(
        "eval",
        help="evaluate a checkpoint, run folder or exported model, or any model",
        description="Evaluate a trained model. The result goes to a file of its own beside the "
        "checkpoint, eval-<attacks>-n<N>[-eps<eps>]-<digest>.json, where <digest> names "
        "every setting that changes the numbers (attacks and their settings, eps, n, "
        "seed, batch size, the weights' and the images' sha256): no other evaluation, "
        "the eval.json written at the end of training included, is overwritten (give "
        "--out to choose; a file there holding another evaluation is kept beside it). "
        "With --model MODULE:FUNCTION, any model: see docs/own-code.md.",
    )
    e.add_argument("checkpoint", nargs="?", help="run folder, checkpoint or export (or use --model)")
    e.add_argument(
        "--model",
        metavar="MODULE:FUNCTION",
        help="evaluate your own model: FUNCTION() builds it (with --weights, --data, --eps)",
    )
    e.add_argument("--weights", help="state dict for --model: .safetensors or a torch file (never unpickled)")
    e.add_argument("--data", help="dataset of --model's test split, e.g. fmnist, cifar10")
    e.add_argument("--mean", help="--model expects normalised inputs: per-channel mean, e.g. 0.49,0.48,0.45")
    e.add_argument("--std", help="per-channel std for --mean")
    e.add_argument(
        "--attacks",
        default=None,
        help="comma list of: clean,fgsm,pgd,aa,apgd-ce,apgd-t (default: the run's eval.attacks; "
        "clean,pgd,aa with --model)",
    )
    e.add_argument(
        "--n-examples",
        type=int,
        default=None,
        help="evaluate the first N test images, 1 <= N <= test set size (default: the run's "
        "eval.n_examples, e.g. 1000 for the fmnist recipe; the whole test set if that is unset)",
    )
    e.add_argument("--batch-size", type=int, default=None)
    e.add_argument("--pgd-steps", type=int, default=None)
    e.add_argument("--pgd-restarts", type=int, default=None)
    e.add_argument(
        "--pgd-alpha",
        default=None,
        help="PGD step: pixels (0.01, 2/255) or a multiple of eps (eps/4) (default: the run's "
        "eval.pgd_alpha, else the threat model's measured default)",
    )
    e.add_argument(
        "--pgd-schedule",
        default=None,
        choices=("constant", "cosine"),
        help="PGD step schedule (default: the run's eval.pgd_schedule, else the default's)",
    )
    e.add_argument(
        "--pgd-loss",
        default=None,
        choices=("ce", "margin"),
        help="PGD loss (default: the run's eval.pgd_loss, else the default's)",
    )
    e.add_argument("--eps", default=None, help="evaluation eps (default: the training eps), e.g. 8/255")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--device", default="auto")
    e.add_argument("--data-dir", default=None)
    e.add_argument(
        "--out",
        default=None,
        help="JSON result path (default: eval-<attacks>-n<N>-<digest>.json beside the checkpoint, or "
        "eval-<model>-<data>-<attacks>-n<N>-eps<eps>-<digest>.json here with --model; never the "
        "run's own eval.json unless given here; an evaluation with other settings already there "
        "is kept as <name>-<its digest>.json; a device or FIFO is written in place)",
    )
    e.add_argument("--no-progress", action="store_true")
    weights_help = (
        "which weights of a run with weight averaging (train.wa_tau): selected (default: the run's "
        "train.select rule), raw or averaged"
    )
    e.add_argument("--which-weights", default="selected", choices=("selected", "raw", "averaged"), help=weights_help)

    x = sub.add_parser("export", help="write model.safetensors + card.json")
    x.add_argument("source", help="run folder or checkpoint")
    x.add_argument("--out", required=True, help="export folder")
    x.add_argument("--which-weights", default="selected", choices=("selected", "raw", "averaged"), help=weights_help)

    r = sub.add_parser(
        "recipes", help="list the shipped recipes and the registered methods, models, datasets and attacks"
    )

    from atas.compare import add_compare_parser

    c = add_compare_parser(sub)
    for command in (t, e, x, r, c):
        command.add_argument(
            "--import",
            dest="imports",
            action="append",
            default=[],
            metavar="MODULE",
            help="import MODULE first (the methods, models, datasets or attacks it registers "
            "become usable); repeatable",
        )
    return p


def cmd_train(args) -> int:
    from atas import distributed
    from atas.config import ConfigError, load_config
    from atas.evaluation.run import VAL_FILE, check_final_eval_extras
    from atas.rundir import load_run_config
    from atas.trainer import train

    if args.resume:
        if args.recipe and "=" in args.recipe:  # `atas train --resume DIR key=value`
            args.overrides.insert(0, args.recipe)
            args.recipe = None
        saved = load_run_config(args.resume)
        cfg = load_config(saved.to_dict(), args.overrides)
    else:
        if not args.recipe:
            raise ConfigError("give a recipe (see `atas recipes`) or --resume RUN_DIR")
        cfg = load_config(args.recipe, args.overrides)
    if cfg.eval.at_end:
        check_final_eval_extras(cfg)
    args.run_dir_hint = str(args.resume or args.run_dir or Path(cfg.out_dir) / cfg.name)
    _say_data_source(cfg)
    _sigterm_interrupts()
    try:  # the end-of-training evaluation is the library's (atas.evaluation.run.evaluate_trained)
        run = train(cfg, run_dir=args.resume or args.run_dir, resume=bool(args.resume), overwrite=args.overwrite)
    finally:
        # Under torchrun, leave the process group before exit: a rank that exits with gloo's
        # threads still running aborts ("terminate called without an active exception") and
        # torchrun fails the job.
        distributed.cleanup()
    if run.evaluation is not None:
        from atas.evaluation import format_table

        print(format_table(run.evaluation))
    if run.validation is not None:
        val = run.validation["results"]
        print(
            f"validation ({val['clean']['n']} of the {cfg.data.val_size} held-out training images): "
            + ", ".join(f"{v['label']} {100 * v['accuracy']:.1f}%" for v in val.values())
            + f" -> {Path(run.run_dir) / VAL_FILE}"
        )
    if cfg.eval.at_end and distributed.is_main_process():
        print(f"run folder: {run.run_dir}")
    return 0


def _say_data_source(cfg) -> None:
    """One line naming the copy of the data a run reads (the cache, the system's, data.data_dir):
    without data.data_dir the first copy found is used, and which one it was must not be a guess."""
    from atas import distributed
    from atas.data import DataNotFoundError, data_source

    if not distributed.is_main_process():
        return
    try:
        folder = data_source(cfg.data.name, "train", cfg.data.data_dir)
    except DataNotFoundError:
        return  # training says what is missing, or downloads it (data.download=true)
    print(f"data: {cfg.data.name} from {folder or 'its own loader (no data.data_dir given)'}", flush=True)


def _eval_device(name: str):
    """--device of `atas eval`, refused in its own words (the training's check names train.device)."""
    from atas.factories import resolve_device

    return resolve_device(name, "--device")


def cmd_eval_external(args) -> int:
    """`atas eval --model MODULE:FUNCTION --weights FILE --data NAME --eps E`: any model, atas's evaluation."""
    from atas.checkpoint import check_output, check_own_file, is_special_file
    from atas.config import ConfigError, Frac, check_attacks, check_eps
    from atas.data import dataset_info
    from atas.evaluation import format_table, save_result
    from atas.evaluation.protocol import evaluation_request, request_digest
    from atas.evaluation.run import keep_earlier, load_test_set, model_eval_file_name
    from atas.external import file_sha256, load_weights, model_from_factory
    from atas.external_eval import InputAdapter, _data_identity, benchmark

    missing = [flag for flag, value in (("--data", args.data), ("--eps", args.eps)) if value is None]
    if missing or args.checkpoint:
        raise ConfigError(
            "--model evaluates your own model: give --data and --eps (and --weights), and no run folder"
            if missing
            else f"give either a run folder ({args.checkpoint}) or --model, not both"
        )
    eps = Frac(args.eps)
    check_eps(eps, "--eps")
    try:
        dataset_info(args.data)
    except ValueError as e:  # the registry lists the valid names
        raise ConfigError(f"--data {args.data}: {e}") from None
    attacks = check_attacks(args.attacks or "clean,pgd,aa", installed=True)
    if args.out:
        check_output(args.out)  # before the model is even built
    device = _eval_device(args.device)
    model = model_from_factory(args.model)
    if args.weights:
        load_weights(model, args.weights)
    if (args.mean is None) != (args.std is None):
        raise ConfigError("--mean and --std go together")
    norm = None
    if args.mean is not None:
        norm = tuple(
            tuple(_number(v, flag) for v in text.split(","))
            for flag, text in (("--mean", args.mean), ("--std", args.std))
        )
    model = model.to(device)
    settings = _pgd_flags(args)
    x, y = load_test_set(args.data, args.n_examples, args.data_dir)
    # Named, as `atas eval RUN` names its files, by what is evaluated and how (the request's digest:
    # the weights' and the images' sha256, every attack setting): nothing replaces another result.
    wrapped = InputAdapter(model, norm[0], norm[1]).to(device) if norm else model
    request = evaluation_request(
        wrapped, x, y, float(eps), attacks, batch_size=args.batch_size or 256, seed=args.seed, **settings
    )
    out = check_output(
        args.out
        or model_eval_file_name(
            args.model, args.data, ",".join(attacks), args.n_examples, eps, args.weights, request_digest(request)
        )
    )
    if not args.out:  # the name atas chose: a regular file, never a link or a device (check_own_file)
        check_own_file(out)
    result = benchmark(
        model,
        (x, y),
        eps,
        attacks,
        normalization=norm,
        batch_size=args.batch_size or 256,
        seed=args.seed,
        progress=not args.no_progress,
        **settings,
    )
    result["model"] = {
        "factory": args.model,
        "weights": args.weights,
        "weights_sha256": file_sha256(args.weights) if args.weights else None,
        **result["model"],
    }
    result["data"] = {
        **_data_identity(args.data, args.data_dir),
        "split": "test",
        "images": f"the first {result['n_examples']}",
        "sha256": result["request"]["data_sha256"],
    }
    if not is_special_file(out):
        keep_earlier(Path(out), result)
    save_result(result, out, named=bool(args.out))
    print(format_table(result))
    print(f"saved: {out}")
    return 0


def _number(text: str, flag: str) -> float:
    from atas.config import ConfigError

    try:
        return float(text)
    except ValueError:
        raise ConfigError(
            f"{flag}: {text!r} is not a number; give one per channel, e.g. {flag} 0.49,0.48,0.45"
        ) from None


def _pgd_flags(args) -> dict:
    """--pgd-* of `atas eval --model`, as evaluate's keywords (left out: the defaults)."""
    from atas.config import ConfigError

    for flag, value in (
        ("--pgd-steps", args.pgd_steps),
        ("--pgd-restarts", args.pgd_restarts),
        ("--batch-size", args.batch_size),
        ("--n-examples", args.n_examples),
    ):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} must be >= 1, got {value}")
    names = ("pgd_steps", "pgd_restarts", "pgd_alpha", "pgd_schedule", "pgd_loss")
    return {k: getattr(args, k) for k in names if getattr(args, k) is not None}


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's kill, `kill PID`), handled like Ctrl-C."""


def _sigterm_interrupts() -> None:
    import signal

    def handler(signum, frame):
        raise Terminated()

    signal.signal(signal.SIGTERM, handler)


def cmd_eval(args) -> int:
    if args.model:
        return cmd_eval_external(args)
    if not args.checkpoint:
        from atas.config import ConfigError

        raise ConfigError("give a run folder / checkpoint / export to evaluate, or --model MODULE:FUNCTION")
    from atas.checkpoint import check_output
    from atas.config import Frac, check_attacks, check_eps, validate_eval
    from atas.evaluation import format_table
    from atas.evaluation.run import eval_file_name, evaluate_run
    from atas.export import checkpoint_record, load_model, resolve_artifact

    attacks = None if args.attacks is None else check_attacks(args.attacks, installed=True)  # "" is an error
    device = _eval_device(args.device)
    if args.out:
        check_output(args.out)  # before the model is even loaded
    model, cfg, extra = load_model(args.checkpoint, device, weights=args.which_weights)
    e = cfg.eval
    given = {
        "attacks": attacks,
        **{
            key: getattr(args, key)
            for key in (
                "n_examples",
                "batch_size",
                "pgd_steps",
                "pgd_restarts",
                "pgd_alpha",
                "pgd_schedule",
                "pgd_loss",
            )
        },
    }
    for key, value in given.items():  # an option given on the command line replaces the run's eval.<key>
        if value is not None:
            setattr(e, key, value)
    if args.data_dir:
        cfg.data.data_dir = args.data_dir
    validate_eval(cfg)
    eps = None
    if args.eps is not None:
        eps = Frac(args.eps)
        check_eps(eps, "--eps")
    source = resolve_artifact(args.checkpoint)
    weights = checkpoint_record(args.checkpoint, cfg, extra)
    if weights and weights["warning"]:  # an evaluation of a run still in training, before it starts
        say_warning(weights["warning"])
    # Without --out: a file of its own beside the checkpoint, named by every setting of the request
    # (eval_file_name), so no other evaluation, of these weights or others, is replaced.
    result = evaluate_run(
        model,
        cfg,
        source.parent,
        eps=eps,
        seed=args.seed,
        out=args.out,
        by_settings=True,
        progress=not args.no_progress,
        checkpoint=weights,
        named_out=bool(args.out),
    )
    print(format_table(result))
    print(f"saved: {args.out or source.parent / eval_file_name(cfg, eps, result['request_sha256'])}")
    return 0


def cmd_export(args) -> int:
    from atas.export import export_model

    out = export_model(args.source, args.out, weights=args.which_weights)  # its warnings: say_warning
    extra = " and robustbench.json" if (Path(out) / "robustbench.json").exists() else ""
    print(f"exported to {out}/model.safetensors and {out}/card.json{extra}")
    if not extra:  # what a RobustBench entry would need
        note = json.loads((Path(out) / "card.json").read_text()).get("robustbench_note")
        if note:
            print(f"RobustBench entry: none, {note}")
    return 0


def cmd_recipes(args) -> int:
    from atas.config import RECIPE_DIR

    for path in sorted(RECIPE_DIR.glob("*.yaml")):
        desc = (yaml.safe_load(path.read_text()) or {}).get("description", "")
        print(f"{path.stem:28s} {desc}")
    _print_registries()
    return 0


def _print_registries() -> None:
    """What a recipe, `--methods` or `--attacks` may name: every registry, plugins included."""
    from atas.data import DATASETS
    from atas.evaluation import ATTACKS
    from atas.methods import METHODS
    from atas.models import MODELS

    print("\nmethods (method.name, --methods):")
    for name in METHODS.names():
        cls = METHODS.get(name)
        print(f"  {name:14s} {cls.display_label():12s} {cls.cost}")
    for title, registry in (
        ("models (model.arch)", MODELS),
        ("datasets (data.name)", DATASETS),
        ("attacks (eval.attacks, --attacks)", ATTACKS),
    ):
        print(f"{title}: {', '.join(registry.names())}")


def say_warning(message: object) -> None:
    """The one place the command line prints a warning: one line `atas: warning: ...` on stderr,
    not Python's `file:line: UserWarning: ...` with the source line echoed under it."""
    print(f"atas: warning: {' '.join(str(message).split())}", file=sys.stderr, flush=True)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    say_warning(message)


def _fail(command: str, error: BaseException, status: int, debug: bool) -> int:
    if debug:
        traceback.print_exception(error)
    print(f"atas {command}: error: {error}", file=sys.stderr)
    return status


def _stdout_closed() -> int:
    """The reader of our stdout went away (`atas recipes | head`): stop quietly, as `cat` does.
    stdout is pointed at /dev/null so the interpreter's final flush cannot fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return 128 + 13  # killed by SIGPIPE, the status a shell reports for `cat big | head`


def main(argv: list[str] | None = None) -> int:

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("ATAS_DEBUG", "").strip() not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    parser = _parser()
    # parse_known_args so that overrides may also follow an option: `atas train R --run-dir D k=v`
    args, extra = parser.parse_known_args(argv)
    stray = [e for e in extra if e.startswith("-") or "=" not in e or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    handlers = {"train": cmd_train, "eval": cmd_eval, "export": cmd_export, "recipes": cmd_recipes}
    from atas.compare import cmd_compare

    handlers["compare"] = cmd_compare
    with warnings.catch_warnings():  # restored on return: main() may run inside another program
        warnings.showwarning = _show_warning
        warnings.filterwarnings("default", category=UserWarning)  # each warning once per command
        return _run(args, handlers, debug)


def _run(args, handlers: dict, debug: bool) -> int:

    try:
        if getattr(args, "imports", None) is not None:
            from atas.external import import_plugins

            import_plugins(args.imports)
        status = handlers[args.command](args)
        sys.stdout.flush()  # a closed pipe shows up here, inside the handler, not at exit
        return status
    except AtasError as e:  # the one place an error of atas becomes one line and an exit status
        if e.exit_status is None:  # a bug (an attack that left the eps-ball): its traceback is the report
            raise
        return _fail(args.command, e, e.exit_status, debug)
    except PermissionError as e:  # a file or folder this user may not read or write: the user can fix that
        where = f" {e.filename}" if e.filename else ""
        return _fail(
            args.command,
            PermissionError(f"permission denied:{where}; run as a user who may access it (ls -ld{where or ' PATH'})"),
            2,
            debug,
        )
    except BrokenPipeError:
        return _stdout_closed()
    except KeyboardInterrupt as e:
        how = "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted"
        print(
            f"{how}; the last completed epoch's checkpoint is intact (resume with atas train --resume "
            f"{getattr(args, 'run_dir_hint', 'RUN_DIR')})",
            file=sys.stderr,
        )
        return 143 if isinstance(e, Terminated) else 130
