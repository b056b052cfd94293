"""`atas` command line: train, eval, export, recipes (and compare).

    atas train RECIPE [key=value ...] [--run-dir DIR] [--overwrite]
    atas train --resume RUN_DIR
    atas eval CHECKPOINT|RUN_DIR|EXPORT_DIR [--attacks clean,fgsm,pgd,aa] [--n-examples N]
    atas export RUN_DIR|CHECKPOINT --out DIR
    atas recipes

Errors a user can fix (bad config, missing data, unusable checkpoint) print one clear message and
exit with status 2, no traceback.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="atas", description="Fast adversarial training with adaptive step size.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model from a recipe (or resume a run)")
    t.add_argument("recipe", nargs="?", help="shipped recipe name (see `atas recipes`) or a YAML path")
    t.add_argument("overrides", nargs="*", help="key=value overrides, e.g. method.eps=8/255 train.epochs=10")
    t.add_argument("--run-dir", help="run folder (default: <out_dir>/<name>)")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    t.add_argument("--overwrite", action="store_true",
                   help="replace a run already in the run folder (its checkpoints, metrics and eval.json go)")

    e = sub.add_parser("eval", help="evaluate a checkpoint, run folder or exported model")
    e.add_argument("checkpoint")
    e.add_argument("--attacks", default=None, help="comma list of: clean,fgsm,pgd,aa,apgd-ce,apgd-t")
    e.add_argument("--n-examples", type=int, default=None, help="first N test images (default: all)")
    e.add_argument("--batch-size", type=int, default=None)
    e.add_argument("--pgd-steps", type=int, default=None)
    e.add_argument("--pgd-restarts", type=int, default=None)
    e.add_argument("--eps", default=None, help="evaluation eps (default: the training eps), e.g. 8/255")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--device", default="auto")
    e.add_argument("--data-dir", default=None)
    e.add_argument("--out", default=None, help="JSON result path (default: beside the checkpoint)")
    e.add_argument("--no-progress", action="store_true")

    x = sub.add_parser("export", help="write model.safetensors + card.json")
    x.add_argument("source", help="run folder or checkpoint")
    x.add_argument("--out", required=True, help="export folder")

    sub.add_parser("recipes", help="list the shipped recipes")

    from atas.compare import add_compare_parser

    add_compare_parser(sub)
    return p


def cmd_train(args) -> int:
    from atas.config import load_config
    from atas import distributed
    from atas.trainer import load_run_config, train

    if args.resume:
        if args.recipe and "=" in args.recipe:  # `atas train --resume DIR key=value`
            args.overrides.insert(0, args.recipe)
            args.recipe = None
        saved = load_run_config(args.resume)
        cfg = load_config(saved.to_dict(), args.overrides)
    else:
        if not args.recipe:
            raise SystemExit("atas train: give a recipe (see `atas recipes`) or --resume RUN_DIR")
        cfg = load_config(args.recipe, args.overrides)
    try:
        run = train(cfg, run_dir=args.resume or args.run_dir, resume=bool(args.resume), overwrite=args.overwrite)
    finally:
        # Under torchrun, leave the process group before the end-of-run evaluation (rank 0 only)
        # and before exit: a rank that exits with gloo's threads still running aborts
        # ("terminate called without an active exception") and torchrun fails the job.
        distributed.cleanup()
    if cfg.eval.at_end and distributed.is_main_process():
        from atas.evaluate import format_table
        from atas.runner import evaluate_run

        result = evaluate_run(run.model, cfg, run.run_dir)
        print(format_table(result))
        print(f"run folder: {run.run_dir}")
    return 0


def cmd_eval(args) -> int:
    from atas.config import Frac, check_eps
    from atas.evaluate import format_table
    from atas.export import load_model, resolve_artifact
    from atas.runner import evaluate_run
    from atas.trainer import resolve_device

    device = resolve_device(args.device)
    model, cfg, _ = load_model(args.checkpoint, device)
    e = cfg.eval
    if args.attacks: e.attacks = args.attacks
    if args.n_examples is not None: e.n_examples = args.n_examples
    if args.batch_size: e.batch_size = args.batch_size
    if args.pgd_steps: e.pgd_steps = args.pgd_steps
    if args.pgd_restarts: e.pgd_restarts = args.pgd_restarts
    if args.data_dir: cfg.data.data_dir = args.data_dir
    eps = None
    if args.eps is not None:
        eps = Frac(args.eps)
        check_eps(eps, "--eps")
    source = resolve_artifact(args.checkpoint)
    out = Path(args.out) if args.out else source.with_name("eval.json")
    result = evaluate_run(model, cfg, out.parent, eps=eps, seed=args.seed, out=out,
                          progress=not args.no_progress)
    print(format_table(result))
    print(f"saved: {out}")
    return 0


def cmd_export(args) -> int:
    from atas.export import export_model

    out = export_model(args.source, args.out)
    print(f"exported to {out}/model.safetensors and {out}/card.json")
    return 0


def cmd_recipes(args) -> int:
    from atas.config import RECIPE_DIR

    for path in sorted(RECIPE_DIR.glob("*.yaml")):
        desc = (yaml.safe_load(path.read_text()) or {}).get("description", "")
        print(f"{path.stem:28s} {desc}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from atas.checkpoint import CheckpointError
    from atas.config import ConfigError
    from atas.data import DataNotFoundError

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
    try:
        return handlers[args.command](args)
    except (ConfigError, DataNotFoundError, CheckpointError) as e:
        print(f"atas {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; the last completed epoch's checkpoint is intact (resume with --resume RUN_DIR)",
              file=sys.stderr)
        return 130
