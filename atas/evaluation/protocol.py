"""The evaluation protocol: the batch driver, its checks, and the resumable state.

The protocol the field trusts (docs/algorithm.md, section 5): raw, unpadded test images with pixels in
[0, 1], normalisation inside the model, the model in eval() mode, PGD-50 with 10 restarts keeping
the worst case per sample, and standard AutoAttack. Everything below checks itself: every
adversarial batch must stay in the eps-ball and in [0, 1] (a violation is a bug and raises
`EvaluationError`), and suspicious situations (train mode, probabilities instead of logits, an
attack that is "weaker" than a cheaper one) are warned about loudly and recorded in the result.

    >>> result = evaluate(model, x_test, y_test, eps=8/255, eps_label="8/255", attacks=("clean", "pgd", "aa"))
    >>> print(format_table(result)); save_result(result, "runs/x/eval.json")

Attacks run one after the other over the whole set, batch by batch. With `state_path` the per-sample
verdicts are written after every batch, so a killed evaluation (AutoAttack takes hours) resumes where
it stopped and, because every batch is seeded from (seed, attack, batch index), ends with exactly the
numbers an uninterrupted run gives.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
import warnings
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

import atas.evaluation.autoattack  # noqa: F401  (registers aa, apgd-ce, apgd-t)
from atas.checkpoint import DiskFullError, atomic_write_text
from atas.evaluation.attacks import ATTACKS, AttackSetup, EvaluationWarning, check_adversarial, pgd_step
from atas.provenance import device_name, versions
from atas.threat import LinfBall
from atas.values import coerce

__all__ = [
    "WEAK_PGD_POINTS",
    "attack_names",
    "evaluate",
    "evaluation_request",
    "format_table",
    "request_digest",
    "save_result",
]

# AutoAttack more than this many points below PGD: PGD is a weak attack on this model.
WEAK_PGD_POINTS = 3.0

_STATE_FORMAT = "atas.evaluate.state/1"


# ----------------------------------------------------------------------------------------------
# evaluate


def evaluate(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    attacks: Sequence[str] = ("clean", "fgsm", "pgd"),
    *,
    pgd_steps: int = 50,
    pgd_restarts: int = 10,
    pgd_alpha: float | str | None = None,
    pgd_schedule: str | None = None,
    pgd_loss: str | None = None,
    batch_size: int = 256,
    n_examples: int | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: bool = True,
    state_path: str | os.PathLike | None = None,
    eps_label: str | None = None,
) -> dict:
    """Accuracy of `model` on (x, y) under each attack in `attacks`, L-inf radius eps.

    Args:
        model: maps [B, C, H, W] in [0, 1] to logits [B, K]. Put in eval() for the evaluation (a
            warning if it was in train mode) and restored to its exact previous modes afterwards.
        x: [N, C, H, W] test images, uint8 (divided by 255 here) or float in [0, 1]. Unpadded,
            unaugmented, unnormalised. y: [N] labels.
        eps: radius in pixel units (8/255, not 8). eps_label: how the user wrote it ("8/255"),
            kept for the report; default: "k/255" when eps is such a fraction, else the float.
        attacks: names from ATTACKS: "clean"; "fgsm"; "pgd" (PGD-pgd_steps-pgd_restarts, step
            pgd_alpha with schedule pgd_schedule on loss pgd_loss, see `pgd_step`; default: the
            threat model's PGD_DEFAULTS; the step used is recorded in the result's settings); "aa"
            (standard AutoAttack: APGD-CE, APGD-T, FAB-T, Square, cascaded on still-robust points
            by pyautoattack's own run_standard_evaluation);
            "apgd-ce", "apgd-t" (one AutoAttack component alone, as configured inside standard
            AA; labelled is_autoattack=False because they are NOT AutoAttack).
        batch_size: batch of every attack and the chunk handed to AutoAttack (a kill loses at
            most one chunk when state_path is given).
        n_examples: evaluate the FIRST n examples (deterministic); None = all.
        seed: every batch of every attack is seeded from (seed, attack, batch index); AutoAttack
            gets `seed` itself.
        device: where the batches go; default: the device of the model's parameters.
        progress: tqdm bars. state_path: JSON file to resume from and to write after every batch.

    Returns: {"eps", "eps_label", "n_examples", "seed", "batch_size", "results": {name:
        {"label", "accuracy" (fraction), "n_correct", "n", "settings", "is_autoattack"}},
        "per_sample": {name: [bool] robust/correct}, "versions", "device", "timing" (seconds spent
        on each attack, those of a killed call this one resumed included), "warnings": [str],
        "request" (every setting that changes the numbers, weights and data by sha256: see
        `evaluation_request`), "request_sha256" (its 12-digit name)}.
    """
    names = attack_names(attacks)
    if isinstance(eps, str):
        raise TypeError(
            f"eps must be a number in pixel units, got the string {eps!r}: parse it "
            "once at the boundary (e.g. atas.config / fractions.Fraction)"
        )
    eps_given, eps = eps, float(eps)
    LinfBall(eps)  # validates 0 < eps <= 1 (catches eps=8 meant as 8/255)
    if int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    x, y = _prepare_data(x, y, n_examples)
    n = x.shape[0]
    pgd_spec = pgd_step(eps, pgd_alpha, pgd_schedule, pgd_loss) if "pgd" in names else None
    request = _request(
        names,
        eps,
        n,
        int(seed),
        int(batch_size),
        pgd_steps,
        pgd_restarts,
        pgd_spec,
        fingerprint_model(model),
        _fingerprint_data(x, y),
    )
    dev = _resolve_device(model, device)
    messages: list[str] = []

    def warn(msg: str) -> None:
        if msg not in messages:
            messages.append(msg)
            warnings.warn(msg, EvaluationWarning, stacklevel=3)

    modes = [(m, m.training) for m in model.modules()]
    if any(training for _, training in modes):
        warn(
            "model was passed in train mode; it is evaluated in eval() mode (BatchNorm running "
            "statistics, no dropout) and its modes are restored afterwards"
        )
    model.eval()
    settings = {"format": _STATE_FORMAT, "eps": eps, "n_examples": n, "batch_size": int(batch_size), "seed": int(seed)}
    if state_path is not None:  # only needed to refuse resuming with another model or data set
        settings["model_sha256"] = request["model_sha256"]
        settings["data_sha256"] = request["data_sha256"]
    try:
        rng_devices = (
            [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else []
        )
        with torch.random.fork_rng(devices=rng_devices):  # the caller's RNG streams are untouched
            n_classes = _preflight(model, x[:batch_size], dev, warn)
            setup = AttackSetup(model, eps, seed, batch_size, n_classes, dev, warn, pgd_steps, pgd_restarts, pgd_spec)
            results, per_sample, timing = _run_attacks(names, setup, x, y, _State(state_path, settings, warn), progress)
    finally:
        for m, training in modes:
            m.train(training)
    _sanity_across_attacks(results, warn)
    if eps_label is None:  # an atas.config.Frac remembers how the user wrote it ("0.2", "8/255")
        eps_label = getattr(eps_given, "text", None) or _default_label(eps)
    return {
        "eps": eps,
        "eps_label": eps_label,
        "n_examples": n,
        "seed": int(seed),
        "batch_size": int(batch_size),
        "results": results,
        "per_sample": per_sample,
        "versions": versions(),
        "device": device_name(dev),
        "timing": timing,
        "warnings": messages,
        "request": request,
        "request_sha256": request_digest(request),
    }


def evaluation_request(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    attacks: Sequence[str] | str = ("clean", "fgsm", "pgd"),
    *,
    pgd_steps: int = 50,
    pgd_restarts: int = 10,
    pgd_alpha: float | str | None = None,
    pgd_schedule: str | None = None,
    pgd_loss: str | None = None,
    batch_size: int = 256,
    n_examples: int | None = None,
    seed: int = 0,
) -> dict:
    """Every setting that changes the numbers `evaluate` would return for these arguments: the
    attacks and the settings they run with (PGD's steps, restarts, step, schedule and loss, as
    resolved), eps, the number of images, the seed, the batch size (it decides which random start
    each image gets), and the sha256 of the weights and of the images and labels. Two evaluations
    with the same request give the same numbers; `request_digest` names it. `evaluate` records it
    in its result ("request", "request_sha256"): call this to know a result's name before it runs."""
    names = attack_names(attacks)
    eps = float(eps)
    x, y = _prepare_data(x, y, n_examples)
    pgd_spec = pgd_step(eps, pgd_alpha, pgd_schedule, pgd_loss) if "pgd" in names else None
    return _request(
        names,
        eps,
        x.shape[0],
        int(seed),
        int(batch_size),
        pgd_steps,
        pgd_restarts,
        pgd_spec,
        fingerprint_model(model),
        _fingerprint_data(x, y),
    )


def _request(
    names: list[str],
    eps: float,
    n: int,
    seed: int,
    batch_size: int,
    pgd_steps: int,
    pgd_restarts: int,
    pgd_spec: tuple | None,
    model_sha256: str,
    data_sha256: str,
) -> dict:
    request: dict[str, Any] = {
        "attacks": list(names),
        "eps": eps,
        "n_examples": n,
        "seed": seed,
        "batch_size": batch_size,
    }
    if pgd_spec is not None:  # PGD's settings matter only where PGD runs
        alpha, schedule, loss, _ = pgd_spec
        request["pgd"] = {
            "steps": int(pgd_steps),
            "restarts": int(pgd_restarts),
            "alpha": float(alpha),
            "schedule": schedule,
            "loss": loss,
        }
    request.update(model_sha256=model_sha256, data_sha256=data_sha256)
    return request


def request_digest(request: dict) -> str:
    """A short, stable name for an evaluation request (12 hex digits of the sha256 of its JSON)."""
    text = json.dumps(_jsonable(request), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _run_attacks(
    names: list[str], setup: AttackSetup, x: torch.Tensor, y: torch.Tensor, state: _State, progress: bool
) -> tuple[dict, dict, dict]:
    """Each attack over the whole set, one after the other: (results, per-sample verdicts, seconds)."""
    n = x.shape[0]
    results: dict[str, dict] = {}
    per_sample: dict[str, list[bool]] = {}
    timing: dict[str, float] = {}
    for name in names:
        attack = ATTACKS.get(name)
        attack_settings, run_batch = attack.build(name, setup)
        flags, seconds = _run_attack(
            name,
            attack_settings,
            run_batch,
            setup.model,
            x,
            y,
            setup.eps,
            setup.seed,
            setup.batch_size,
            setup.device,
            state,
            progress,
        )
        timing[name] = round(seconds, 3)
        per_sample[name] = flags
        n_correct = int(sum(flags))
        results[name] = {
            "label": attack.title(attack_settings),
            "accuracy": n_correct / n,
            "n_correct": n_correct,
            "n": n,
            "settings": attack_settings,
            "is_autoattack": attack.is_autoattack,
        }
    return results, per_sample, timing


def attack_names(attacks: Sequence[str] | str) -> list[str]:
    """Attack names, lower-cased, each once, in the given order; a comma-separated string is split
    here (the one place the attack list is parsed). ValueError for an unknown name or none."""
    if isinstance(attacks, str):
        attacks = coerce(attacks, list[str], "attacks")  # the one comma-list parser (atas.values)
    names: list[str] = []
    for a in attacks:
        name = str(a).strip().lower()
        if not name:
            continue
        if name not in ATTACKS:
            ATTACKS.load_plugins()
        if name not in ATTACKS:
            raise ValueError(f"unknown attack {a!r}; valid attacks: {', '.join(ATTACKS.names())}")
        if name not in names:
            names.append(name)
    if not names:
        raise ValueError(f"no attack given; valid attacks: {', '.join(ATTACKS.names())}")
    return names


def _prepare_data(x, y, n_examples: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate and cut to the first n_examples; x stays in its dtype on the CPU (uint8 CIFAR-10
    is 30 MB); batches are converted to float on the device as they are used."""
    x, y = torch.as_tensor(x), torch.as_tensor(y)
    if x.dim() != 4 or x.shape[0] == 0:
        raise ValueError(f"x must be [N, C, H, W] with N >= 1, got shape {tuple(x.shape)}")
    if y.dim() != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(f"y must be [N] with N = {x.shape[0]}, got shape {tuple(y.shape)}")
    if n_examples is not None:
        if int(n_examples) != n_examples or not 1 <= n_examples <= x.shape[0]:
            raise ValueError(f"n_examples must be in 1..{x.shape[0]}, got {n_examples}")
        x, y = x[: int(n_examples)], y[: int(n_examples)]
    if x.dtype != torch.uint8:
        if not x.is_floating_point():
            raise ValueError(f"x must be uint8 or float in [0, 1], got {x.dtype}")
        if x.numel() and (float(x.min()) < 0.0 or float(x.max()) > 1.0):
            raise ValueError(
                f"float x must lie in [0, 1] (got min {float(x.min()):.4g}, max "
                f"{float(x.max()):.4g}): normalisation belongs inside the model"
            )
    return x.detach().cpu(), y.detach().cpu().long()


def _to_device(x: torch.Tensor, dev: torch.device) -> torch.Tensor:
    if x.dtype == torch.uint8:
        return x.to(dev).float().div_(255.0)
    return x.to(dev, torch.float32)


def _resolve_device(model: nn.Module, device) -> torch.device:
    if device is not None:
        return torch.device(device)
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


def _preflight(model: nn.Module, x: torch.Tensor, dev: torch.device, warn) -> int:
    """One clean forward: output shape, and the probabilities-instead-of-logits trap."""
    with torch.no_grad():
        out = model(_to_device(x, dev))
    if out.dim() != 2 or out.shape[1] < 2:
        raise ValueError(f"model must return logits [B, K] with K >= 2, got shape {tuple(out.shape)}")
    out = out.float()
    if bool((out >= 0).all()) and bool(((out.sum(1) - 1).abs() < 1e-4).all()):
        warn(
            "model outputs look like probabilities (non-negative, rows sum to 1): pass logits. "
            "Attacks on softmax outputs see vanishing gradients and report inflated robustness"
        )
    return int(out.shape[1])


class _Progress:
    """A tqdm bar counting attack units (PGD steps, else batches), with a stage note."""

    def __init__(self, bar: tqdm, where: str):
        self.bar, self.where, self.done = bar, where, 0

    def step(self, k: int = 1) -> None:
        self.done += k
        self.bar.update(k)

    def stage(self, text: str = "") -> None:
        self.bar.set_postfix_str(f"{self.where} {text}".strip(), refresh=True)


def _batch_seed(seed: int, name: str, batch: int) -> int:
    """Independent, reproducible seed per (seed, attack, batch): a resumed run redraws nothing."""
    return int(np.random.SeedSequence([int(seed), zlib.crc32(name.encode()), batch]).generate_state(1)[0])


def _run_attack(
    name: str,
    attack_settings: dict,
    run_batch: Callable,
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    seed: int,
    batch_size: int,
    dev: torch.device,
    state: _State,
    progress: bool,
) -> tuple[list[bool], float]:
    """(per-sample verdicts, seconds spent on this attack): a resumed attack's seconds include
    those its earlier, killed calls spent (kept in the state file), so its time is the real one."""
    n = x.shape[0]
    n_batches = math.ceil(n / batch_size)
    flags = state.resume(name, attack_settings)
    t0 = time.perf_counter() - state.seconds(name)
    done = len(flags) // batch_size if len(flags) < n else n_batches
    attack = ATTACKS.get(name)
    label, units = attack.label, attack.units_per_batch(attack_settings)
    bar = tqdm(
        total=n_batches * units,
        initial=done * units,
        desc=f"{label:>8}",
        unit="step" if units > 1 else "batch",
        disable=not progress,
        leave=True,
    )
    try:
        for b in range(done, n_batches):
            lo, hi = b * batch_size, min((b + 1) * batch_size, n)
            xb, yb = _to_device(x[lo:hi], dev), y[lo:hi].to(dev)
            torch.manual_seed(_batch_seed(seed, name, b))  # inside evaluate's fork_rng
            tracker = _Progress(bar, f"batch {b + 1}/{n_batches}")
            tracker.stage()
            x_adv, robust = run_batch(xb, yb, tracker)
            if attack.perturbs:
                check_adversarial(x_adv, xb, eps, name)
            with torch.no_grad():  # the verdict is always our own forward on the returned x_adv
                correct = model(x_adv).argmax(1) == yb
            if robust is not None:  # worst case: robust only if the attack AND the recheck agree
                correct &= robust.to(correct.device)
            flags.extend(bool(c) for c in correct.cpu().tolist())
            state.save(name, attack_settings, flags, time.perf_counter() - t0)
            bar.update(max(0, units - tracker.done))
            bar.set_postfix_str(f"batch {b + 1}/{n_batches} acc={100 * sum(flags) / len(flags):.2f}%")
    finally:
        bar.close()
    return flags, time.perf_counter() - t0


class _State:
    """Per-sample verdicts done so far, in a JSON file rewritten atomically after every batch:
    {"format", "settings": {global}, "attacks": {name: {"settings", "correct": "0110..."}}}."""

    def __init__(self, path, settings: dict, warn):
        self.path = None if path is None else Path(path)
        self.settings = _jsonable(settings)
        self.attacks: dict[str, dict] = {}
        self.warn = warn
        if self.path is None or not self.path.exists():
            return
        try:
            saved = json.loads(self.path.read_text())
            saved_settings, attacks = saved["settings"], dict(saved["attacks"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            warn(f"state file {self.path} is unreadable ({e!r}); starting fresh")
            return
        if saved_settings != self.settings:
            # Another model, data or settings (e.g. the same run evaluated again after more
            # epochs): nothing to resume, and nothing to warn about; the file is overwritten.
            return
        self.attacks = attacks

    def resume(self, name: str, attack_settings: dict) -> list[bool]:
        entry = self.attacks.get(name)
        if entry is None:
            return []
        n, bs = self.settings["n_examples"], self.settings["batch_size"]
        correct = entry.get("correct", "")
        ok = (
            entry.get("settings") == _jsonable(attack_settings)
            and isinstance(correct, str)
            and set(correct) <= {"0", "1"}
            and len(correct) <= n
            and (len(correct) % bs == 0 or len(correct) == n)
        )
        if not ok:
            self.warn(
                f"state file {self.path}: saved progress of {name!r} does not match its "
                "current settings; rerunning it from the start"
            )
            self.attacks.pop(name, None)  # and its seconds with it
            return []
        return [c == "1" for c in correct]

    def seconds(self, name: str) -> float:
        """Seconds the verdicts resumed for `name` cost (0 for a fresh attack or an older state file)."""
        seconds = self.attacks.get(name, {}).get("seconds", 0.0)
        return float(seconds) if isinstance(seconds, (int, float)) and seconds >= 0 else 0.0

    def save(self, name: str, attack_settings: dict, flags: list[bool], seconds: float = 0.0) -> None:
        if self.path is None:
            return
        self.attacks[name] = {
            "settings": _jsonable(attack_settings),
            "correct": "".join("1" if f else "0" for f in flags),
            "seconds": round(seconds, 3),
        }
        try:
            atomic_write_text(
                self.path, json.dumps({"format": _STATE_FORMAT, "settings": self.settings, "attacks": self.attacks})
            )
        except DiskFullError as e:
            intact = (
                "the progress saved after the previous batch is intact"
                if self.path.exists()
                else "no progress was saved yet"
            )
            raise DiskFullError(
                e.path, intact, "free space and run the same evaluation again: it resumes from there"
            ) from None


def _sanity_across_attacks(results: dict, warn) -> None:
    acc = {k: v["accuracy"] for k, v in results.items()}
    loud = "SANITY CHECK FAILED: "
    if "clean" in acc and "fgsm" in acc and acc["fgsm"] > acc["clean"]:
        warn(
            loud + f"FGSM accuracy {100 * acc['fgsm']:.2f}% > clean accuracy "
            f"{100 * acc['clean']:.2f}%: the signature of catastrophic overfitting (the single "
            "gradient step no longer finds adversarial examples); trust PGD / AutoAttack, not FGSM"
        )
    for k in ("pgd", "apgd-ce", "apgd-t", "aa"):
        if "clean" in acc and k in acc and acc[k] > acc["clean"]:
            warn(
                loud + f"{results[k]['label']} accuracy {100 * acc[k]:.2f}% > clean accuracy "
                f"{100 * acc['clean']:.2f}%, impossible for a deterministic model: the model is "
                "randomised / non-deterministic, or there is a bug"
            )
    if "aa" in acc and "pgd" in acc and acc["aa"] > acc["pgd"]:
        warn(
            loud + f"AutoAttack accuracy {100 * acc['aa']:.2f}% > {results['pgd']['label']} "
            f"accuracy {100 * acc['pgd']:.2f}%: AutoAttack should be the stronger attack; "
            "suspect a randomised or non-deterministic model, or too few examples to compare"
        )
    for k in ("pgd",):
        if "aa" in acc and k in acc and 100 * (acc[k] - acc["aa"]) > WEAK_PGD_POINTS:
            gap = 100 * (acc[k] - acc["aa"])
            s = results[k].get("settings", {})
            how = (
                f" (step {s['alpha']:.4g} = eps*{s['alpha_over_eps']:g}, {s['schedule']}, {s.get('loss', 'ce')} loss)"
                if k == "pgd" and "alpha_over_eps" in s
                else ""
            )
            warn(
                f"WEAK ATTACK: {results[k]['label']}{how} accuracy {100 * acc[k]:.2f}% is {gap:.1f} "
                f"points above AutoAttack {100 * acc['aa']:.2f}% (more than {WEAK_PGD_POINTS:g}): "
                f"{results[k]['label']} overstates robustness on this model (gradient masking, or a step "
                "size unsuited to it); report AutoAttack, not this number"
            )
    for k in ("apgd-ce", "apgd-t"):
        if "aa" in acc and k in acc and acc["aa"] > acc[k]:
            warn(
                loud + f"AutoAttack accuracy {100 * acc['aa']:.2f}% > {k.upper()} alone "
                f"{100 * acc[k]:.2f}%, although AutoAttack runs {k.upper()} first: "
                "non-deterministic model or bug"
            )


# ----------------------------------------------------------------------------------------------
# fingerprints, the table, the file


def fingerprint_model(model: nn.Module) -> str:
    h = hashlib.sha256()
    for key, t in model.state_dict().items():
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{key}|{t.dtype}|{t.numel()};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _fingerprint_data(x: torch.Tensor, y: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in (x, y):
        t = t.contiguous().reshape(-1)
        h.update(f"{t.dtype}|{tuple(t.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _default_label(eps: float) -> str:
    k = eps * 255
    if abs(k - round(k)) < 1e-6 * max(1.0, k):
        return f"{round(k)}/255"
    return f"{eps:g}"


def _jsonable(obj: Any) -> Any:
    """What the object becomes after a JSON round trip (tuples -> lists, ...), for comparisons."""
    return json.loads(json.dumps(obj))


def _settings_text(settings: dict) -> str:
    parts = []
    for k, v in settings.items():
        if k in ("eps", "norm", "note", "pyautoattack", "seed", "step_rule", "random_start") or isinstance(v, dict):
            continue
        if isinstance(v, float):
            v = f"{v:.5g}"
        elif isinstance(v, list):
            v = "+".join(map(str, v))
        parts.append(f"{k}={v}")
    return " ".join(parts)


def format_table(result: dict) -> str:
    """A fixed-width table: attack, accuracy %, n_correct/n, settings; then any warnings."""
    head = (
        f"eps {result['eps_label']} ({result['eps']:.6g}) | n = {result['n_examples']} | "
        f"seed {result['seed']} | {result['device']}"
    )
    rows = [f"{'attack':<30} {'accuracy':>9} {'n_correct/n':>13}  settings", "-" * 80]
    for res in result["results"].values():
        rows.append(
            f"{res['label']:<30} {100 * res['accuracy']:>7.2f} % "
            f"{res['n_correct']:>6}/{res['n']:<6}  {_settings_text(res['settings'])}"
        )
    lines = [head, *rows]
    if result.get("warnings"):
        lines.append(f"{len(result['warnings'])} warning(s):")
        lines += [f"  ! {w}" for w in result["warnings"]]
    return "\n".join(lines)


def save_result(result: dict, path: str | os.PathLike, *, named: bool = True) -> None:
    """Write `result` (from `evaluate`) as indented JSON, atomically. named: `path` is the caller's
    choice (a device or FIFO there is written in place); False for a file atas names itself, which
    must be a regular file (atas.checkpoint.check_own_file)."""
    atomic_write_text(path, json.dumps(result, indent=2) + "\n", named=named)
