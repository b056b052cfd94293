"""Verdicts that never read as success: a run that did not learn is 'did not learn' (never 'CO no' or
'recovered'), every guard outcome is one of healthy / recovered / gave up / did not learn (or CO
without the guard), and `--tune` never chooses a value whose model did not learn."""

from __future__ import annotations

from pathlib import Path

import atas.tune as tune
from atas.report import (
    _notes,
    co_column,
    findings,
    learning_failure,
    mark_learning,
    run_outcome,
    run_table,
    search_blocks,
)
from atas.tune import Search, choose, rejected, run_search


def _run(seed, clean, pgd, aa=0.0, co=False, events=(), chance=0.1):
    return {
        "method": "fgsm_rs",
        "eps": "0.3",
        "eps_value": 0.3,
        "seed": seed,
        "clean": clean,
        "fgsm": None,
        "pgd": pgd,
        "aa": aa,
        "pgd_label": "PGD-50-10",
        "n_examples": 1000,
        "train_time_s": 5.0,
        "epochs": 3,
        "co_detected": co,
        "co_epochs": [2] if co else [],
        "co_final_signature": None,
        "chance": chance,
        "method_args": {},
        "guard_events": list(events),
        "run_dir": f"runs/s{seed}",
        "curves": {"epoch": [1, 2, 3], "probe_pgd": [0.1, 0.1, 0.1]},
    }


RECOVERY = {
    "event": "recovery",
    "epoch": 3,
    "rollback_to": 2,
    "attempt": 1,
    "replayed_epochs": 1,
    "changes": {},
    "remedy": "x",
    "reason": "collapse: ...",
}


def test_runs_at_chance_are_reported_as_did_not_learn_never_co_no_or_recovered():
    # the issue's shrunk recipe: clean 22-25% (four classes here: chance 25%), PGD 0%, one run "recovered"
    dead = [_run(0, 0.25, 0.0, co=True, chance=0.25), _run(1, 0.22, 0.0, events=[RECOVERY], chance=0.25)]
    assert co_column(dead) == "did not learn (2/2)"
    assert [run_outcome(r) for r in dead] == ["did not learn", "did not learn"]
    header, body = run_table(dead)
    cells = [dict(zip(header, row)) for row in body]
    assert [c["guard"] for c in cells] == ["did not learn", "did not learn (e3->e2)"]
    assert all(c["CO epochs (probe)"].startswith("did not learn") for c in cells)
    (fact,) = [f for f in findings(dead)["0.3"] if "catastrophic" in f or "CO" in f]
    assert "cannot say, no run learned" in fact and "shows catastrophic overfitting: no" not in fact
    # one seed learned, one did not: the CO count is over the seed that learned, the other said apart
    mixed = [_run(0, 0.7, 0.3), _run(1, 0.12, 0.0, events=[RECOVERY])]
    assert co_column(mixed) == "no (0/1), 1 did not learn"
    assert "recovered" not in co_column(mixed)


def test_the_issues_shrunk_recipe_ten_classes_clean_22_to_25_percent_did_not_learn():
    """Clean 22-25% on ten classes is more than 5 points above chance, but with PGD and AutoAttack at
    0-1% the model learnt next to nothing: rule B, absolute and against the comparison's other runs."""
    runs = [_run(0, 0.25, 0.0, aa=0.01, co=True), _run(1, 0.22, 0.0, aa=0.0, events=[RECOVERY])]
    assert co_column(runs) == "did not learn (2/2)"
    assert all("robust accuracy" in learning_failure(r) for r in runs)
    collapsed = _run(2, 0.85, 0.0, co=True)  # CO keeps clean accuracy: not rule B
    assert learning_failure(collapsed) is None and run_outcome(collapsed) == "CO"
    # against the others: 35% clean with no robustness, where PGD-AT runs reach 80% clean
    weak = [_run(3, 0.35, 0.0)] + [dict(_run(s, 0.8, 0.4), method="pgd") for s in (4, 5)]
    assert learning_failure(weak[0]) is None
    mark_learning(weak)
    assert (
        weak[0]["did_not_learn"].startswith("robust accuracy 0.0% with clean 35.0%")
        and weak[0]["outcome"] == "did not learn"
    )
    assert weak[1]["did_not_learn"] is None and weak[1]["outcome"] == "healthy"
    facts = " ".join(findings(weak)["0.3"])
    assert "FGSM-RS: 1/1 seeds did not learn (robust accuracy about 0" in facts or "no run learned" in facts


def test_every_guard_outcome_is_one_of_the_four_or_co_without_the_guard():
    gave_up = {"event": "gave_up", "epoch": 4, "reason": "collapse", "why": "3 recoveries already"}
    runs = [
        _run(0, 0.8, 0.4),
        _run(1, 0.8, 0.4, events=[RECOVERY]),
        _run(2, 0.8, 0.0, co=True, events=[gave_up]),
        _run(3, 0.11, 0.11),
        _run(4, 0.8, 0.0, co=True),
    ]
    assert [run_outcome(r) for r in runs] == ["healthy", "recovered", "gave up", "did not learn", "CO"]
    # recovered means healthy at the end: a run the final evaluation flags is not 'recovered'
    assert run_outcome(_run(5, 0.8, 0.1, co=True, events=[RECOVERY])) == "CO"
    assert co_column(runs) == "yes (2/4), 1 did not learn, 1 recovered by the guard, guard gave up on 1"


def test_choose_never_picks_a_model_that_did_not_learn_or_predicts_a_constant():
    # the issue's GradAlign search: three candidates at chance; the first would "win" on PGD
    at_chance = [
        {"value": 0.5, "clean": 0.12, "pgd": 0.12, "chance": 0.1},
        {"value": 2.0, "clean": 0.095, "pgd": 0.0, "chance": 0.1},
        {"value": 8.0, "clean": 0.105, "pgd": 0.01, "chance": 0.1},
    ]
    assert choose(at_chance) is None
    assert rejected(at_chance[0]).startswith("did not learn")
    constant = {"value": 10.0, "clean": 0.2, "pgd": 0.2, "chance": 0.1}  # nearly won the ELLE search at eps 0.3
    learned = {"value": 100.0, "clean": 0.7, "pgd": 0.15, "chance": 0.1}
    assert rejected(constant).startswith("constant prediction") and choose([constant, learned]) == 100.0
    assert rejected(learned) is None


def test_a_search_whose_candidates_all_failed_marks_the_method_untuned(monkeypatch, capsys):
    rows = iter(
        [
            {"value": 0.5, "clean": 0.12, "pgd": 0.0, "chance": 0.1, "pgd_label": "PGD-10"},
            {"value": 2.0, "clean": 0.095, "pgd": 0.0, "chance": 0.1, "pgd_label": "PGD-10"},
            {"value": 8.0, "failed": "loss became NaN"},
        ]
    )
    monkeypatch.setattr(tune, "run_value", lambda spec, option, n, report_only, out: (next(rows), "trained"))
    search = Search("grad_align", "0.3", "lam", (0.5, 2.0, 8.0), specs=[object()] * 3)
    notes: list[str] = []
    run_search(search, 32, False, Path("."), notes)
    assert search.chosen is None and search.override() == []
    assert "did not learn" in search.untuned and "8: failed" in search.untuned
    assert "UNTUNED" in capsys.readouterr().out and "UNTUNED" in notes[0]
    summary = search.summary(64, 32, 0)
    assert summary["untuned"] == search.untuned and summary["chosen"] is None
    assert [r.get("rejected", "")[:13] for r in summary["results"]] == ["did not learn", "did not learn", ""]
    report_notes = _notes([], [], [summary])
    assert any(n.startswith("UNTUNED: GradAlign at eps 0.3 ran with the method's default lam") for n in report_notes)
    (_, header, body) = search_blocks([summary])[-1]
    marks = [dict(zip(header, row))["chosen"] for row in body]
    assert all(m.startswith("untuned") for m in marks) and "out: did not learn" in marks[0]
