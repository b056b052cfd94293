"""`atas compare`: methods x seeds x eps on one recipe, each run evaluated, one table."""
from __future__ import annotations

import json
from pathlib import Path


def add_compare_parser(sub) -> None:
    c = sub.add_parser("compare", help="train and evaluate several methods/seeds/eps on one recipe")
    c.add_argument("recipe")
    c.add_argument("overrides", nargs="*", help="key=value overrides applied to every run")
    c.add_argument("--methods", default="atas,fgsm_rs")
    c.add_argument("--seeds", type=int, default=1, help="number of seeds (0..n-1)")
    c.add_argument("--eps", default=None, help="comma list, e.g. 0.1,0.2,0.3 (default: the recipe's)")
    c.add_argument("--out", default=None, help="report folder (default: reports/<recipe>)")


def cmd_compare(args) -> int:
    from atas.config import load_config
    from atas.evaluate import format_table
    from atas.runner import evaluate_run
    from atas.trainer import CHECKPOINT, train

    base = load_config(args.recipe, args.overrides)
    out = Path(args.out or Path("reports") / Path(args.recipe).stem)
    eps_list = [e.strip() for e in args.eps.split(",")] if args.eps else [base.method.eps.text]
    rows = []
    for eps in eps_list:
        for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
            for seed in range(args.seeds):
                cfg = load_config(args.recipe, args.overrides + [f"method.name={method}", f"method.eps={eps}",
                                                                 f"train.seed={seed}"])
                run_dir = out / "runs" / f"{method}_eps{eps.replace('/', '-')}_seed{seed}"
                eval_path = run_dir / "eval.json"
                if not eval_path.exists():
                    resume = (run_dir / CHECKPOINT).exists()
                    run = train(cfg, run_dir=run_dir, resume=resume)
                    evaluate_run(run.model, cfg, run_dir)
                result = json.loads(eval_path.read_text())
                print(f"== {method} eps={eps} seed={seed}")
                print(format_table(result))
                rows.append({"method": method, "eps": eps, "seed": seed,
                             **{k: v["accuracy"] for k, v in result["results"].items()}})
    (out / "summary.json").write_text(json.dumps(rows, indent=2))
    return 0
