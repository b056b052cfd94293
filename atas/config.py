"""Typed, layered configuration: dataclass defaults -> YAML recipe -> `key=value` overrides.

One unit system: pixels in [0, 1]. A perturbation size written `8/255` is parsed here, once, as
an exact fraction (never `eval`) and keeps the text the user wrote, so reports can say "8/255".
The resolved config is saved in the run folder and in every checkpoint.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from atas.data import dataset_info
from atas.evaluation import ATTACKS, pgd_step
from atas.extras import INSTALL, MissingDependencyError, available
from atas.methods import METHODS, get_method, list_methods
from atas.models import list_models

# The typed values live in their own leaf module; re-exported here, where they were first defined.
from atas.values import (  # noqa: F401
    ConfigError,
    Frac,
    NotFiniteError,
    build_dataclass,
    coerce,
    parse_fraction,
    to_plain as _to_plain,
)

RECIPE_DIR = Path(__file__).parent / "recipes"
CO_ACTIONS = ("none", "stop", "keep_best", "recover")
SCHEDULES = ("multistep", "cyclic", "onecycle", "cosine", "constant")


def check_eps(eps: float, key: str = "method.eps") -> None:
    """eps is in pixel units [0, 1]; catch the classic `8` written for `8/255`."""
    if eps <= 0:
        raise ConfigError(f"{key} must be > 0, got {eps}")
    if eps > 1:
        hint = f" Did you mean {key}={eps:g}/255?" if eps <= 255 else ""
        raise ConfigError(f"{key}={eps:g} is larger than the whole pixel range [0, 1].{hint}")


# --------------------------------------------------------------------------------------------
# The config tree. Defaults reproduce the official ATAS CIFAR-10 settings where one applies.
# --------------------------------------------------------------------------------------------
@dataclass
class DataConfig:
    name: str = "cifar10"
    data_dir: str | None = None  # None: the dataset's default search path (see atas.data)
    download: bool = False  # torchvision download, needs internet
    train_pad: int | None = None  # None: the dataset's default (CIFAR 4, as the official code)
    flip: bool | None = None  # None: the dataset's default
    subset: int | None = None  # keep only the first n training images (quick runs, tests)
    test_subset: int | None = None  # keep only the first n test images
    # Hold out the LAST n images of the training split (after data.subset) as a validation split:
    # never trained on (the run trains on the first len-n, with per-sample indices 0..len-n-1) and
    # evaluated by `atas train` at the end (val.json) and by `atas compare --tune`. 0: none.
    val_size: int = 0
    # Which images val_size holds out: last (the last n, as above) | stride (n evenly spread over the
    # split: for a split stored class by class, an image folder such as Tiny-ImageNet's, where the
    # last n would be whole classes). atas.data.val_indices.
    val_from: str = "last"
    num_workers: int = 4  # DataLoader workers, folder datasets only


@dataclass
class ModelConfig:
    arch: str = "preact_resnet18"


@dataclass
class MethodConfig:
    name: str = "atas"
    eps: Frac = field(default_factory=lambda: Frac("8/255"))
    # Method-specific options, checked against the method's own Options dataclass
    # (atas.methods.<name>); `method.<option>=value` on the command line lands here.
    args: dict = field(default_factory=dict)
    # Options per method name, used when that method is the one run: a recipe can tune several
    # methods at once (`method.atas.c=0.02`, `method.pgd.steps=10`) and `atas compare` switches
    # method.name without tripping over the others' options.
    per_method: dict = field(default_factory=dict)


@dataclass
class OptimConfig:
    name: str = "sgd"  # sgd (every paper recipe) | adam (Wong et al.'s MNIST recipe)
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    # Stepped every iteration. multistep: x gamma at the milestone epochs (official ATAS);
    # cyclic: one-cycle triangle 0 -> lr -> 0 peaking at pct_start (Wong et al.); onecycle: torch's
    # OneCycleLR curve (cosine from lr/div_factor up to lr at pct_start, cosine down to
    # lr/div_factor/final_div_factor; the FastAT benchmark, pct_start 0.3); cosine; constant.
    schedule: str = "multistep"
    milestones: list[int] = field(default_factory=lambda: [24, 28])
    gamma: float = 0.1
    pct_start: float = 0.4
    div_factor: float = 25.0  # onecycle: starting lr = lr / div_factor (torch's default)
    final_div_factor: float = 1e4  # onecycle: final lr = lr / div_factor / final_div_factor


@dataclass
class TrainConfig:
    epochs: int = 30
    batch_size: int = 128
    seed: int = 0
    deterministic: bool = False  # torch.use_deterministic_algorithms + cudnn settings
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    store_dtype: str = "float32"  # per-sample store: float32 (official) | float16 | bfloat16 | int8
    store_size: int | None = None  # stored prior side; None: the frame (ImageNet official: 32)
    # Keep the store's prior in this file (memory-mapped, on the CPU) instead of in memory; a
    # relative path is under the run folder. None: in memory on the training device.
    store_memmap: str | None = None
    drop_last: bool = False  # official: False (the last partial batch is trained on)
    probe_size: int = 512  # fixed held-out batch for the per-epoch PGD probe (0: off)
    probe_steps: int = 10  # PGD-k of the probe (cross-entropy at eps/4; margin with the eval's step rule)
    probe_restarts: int = 1  # restarts of the probe's margin-loss PGD-k (its worst case)
    amp: str = "off"  # off | bf16 | fp16 (autocast; GradScaler for fp16)
    channels_last: bool = False
    compile: bool = False  # torch.compile the model (attack and training passes)
    # The training-eps schedule of every method: a linear ramp of eps over the first N epochs
    # (0: none, as every paper). method.<name>.eps_ramp_epochs overrides it for one method.
    eps_ramp_epochs: int = 0
    # Catastrophic-overfitting monitor on the per-epoch probe (atas.monitor):
    # none: log only; stop: end the run when CO is flagged; keep_best: also save best.pt, the
    # checkpoint with the best probe PGD accuracy so far; recover (default): keep_best, and on a CO
    # or stuck verdict roll back to the last healthy epoch, apply the method's remedy and go on
    # (atas.guard), at most max_recoveries times and recover_budget_epochs replayed epochs.
    co_action: str = "recover"
    max_recoveries: int = 3
    recover_budget_epochs: int | None = None  # None: train.epochs (the guard at most doubles a run)
    progress: bool = True
    max_steps: int | None = None  # stop after this many optimizer steps (tests, debugging)
    # Training techniques of the FastAT benchmark (docs/algorithm.md, "Training techniques"):
    # label smoothing of every method's training cross-entropy (method.<name>.label_smoothing
    # overrides it for one method; a method with no cross-entropy term ignores it);
    label_smoothing: float = 0.0
    # weight averaging (atas.averaging): tau of the exponential average of weights and BatchNorm
    # buffers, updated after every optimizer step from epoch wa_start_epoch on (0: off);
    wa_tau: float = 0.0
    wa_start_epoch: int = 1
    # which weights the run hands on (eval.json, val.json, export; atas.selection): auto | raw |
    # averaged | val (the benchmark: each epoch the better of raw and averaged on the validation
    # split by PGD-10, the best epoch kept). auto: val with averaging and data.val_size, averaged
    # with averaging alone, raw otherwise.
    select: str = "auto"


@dataclass
class EvalConfig:
    # Names from atas.evaluation.ATTACKS; on the command line a comma list: eval.attacks=clean,pgd,aa
    attacks: list[str] = field(default_factory=lambda: ["clean", "fgsm", "pgd"])
    pgd_steps: int = 50
    pgd_restarts: int = 10
    # PGD step: None = the threat model's measured default (atas.evaluation.PGD_DEFAULTS); a number
    # in pixel units (0.01, 2/255) or a multiple of eps ("eps/4", "0.25eps").
    pgd_alpha: str | None = None
    pgd_schedule: str | None = None  # constant | cosine; None: the default's (constant if pgd_alpha given)
    pgd_loss: str | None = None  # ce | margin; None: the default's (ce if pgd_alpha given)
    n_examples: int | None = None  # None: the whole test set
    batch_size: int = 256
    at_end: bool = True  # evaluate the final model when training ends


@dataclass
class Config:
    name: str = "run"
    description: str = ""
    out_dir: str = "runs"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        return _to_plain(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# --------------------------------------------------------------------------------------------
# Building: recipe and overrides -> one tree -> a checked Config
# --------------------------------------------------------------------------------------------
def _set_path(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: {k} is not a section")
    node[keys[-1]] = value


# --------------------------------------------------------------------------------------------
# The override grammar: `key=value`, where a key is one of
#   section.key                      train.epochs=5 (any field of the Config tree)
#   method.<option>                  an option of the method run (method.args.<option> too)
#   method.<name>.<option>           an option of method <name> only (method.per_method.<name>.<option>)
#   <name>.<option>                  the same, short (`atas compare`: pgd.steps=10)
# --------------------------------------------------------------------------------------------
def split_override(item: str) -> tuple[str, str]:
    """'train.epochs=5' -> ('train.epochs', '5'): the one place an override is split."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not key=value (e.g. train.epochs=5)")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {item!r} has no key")
    return key, raw


def method_override(key: str, methods: list[str]) -> tuple[str | None, str] | None:
    """What a key says about method options: (method name, option) for an option of that method
    only, (None, option) for an option of whichever method runs, None for any other key (a
    config field, method.eps and method.name included). `methods`: the registered names."""
    parts = key.split(".")
    own = {f.name for f in dataclasses.fields(MethodConfig)}
    sections = {f.name for f in dataclasses.fields(Config)}
    if parts[0] == "method" and len(parts) >= 2:
        if parts[1] == "args" and len(parts) == 3:
            parts = ["method", parts[2]]
        if len(parts) == 3 and parts[1] in methods and parts[1] not in own:
            return parts[1], parts[2]
        if len(parts) == 4 and parts[1] == "per_method":
            return parts[2], parts[3]
        if parts[1] in own:
            return None
        if len(parts) == 2:
            return None, parts[1]
        raise ConfigError(f"{key}: write method.<option>=value or <method>.<option>=value")
    if len(parts) == 2 and parts[0] in methods and parts[0] not in sections:
        return parts[0], parts[1]
    return None


def parse_overrides(overrides: list[str]) -> dict:
    """['method.eps=8/255', 'train.epochs=5'] -> nested dict of raw values.

    Values are read as YAML scalars (so `true`, `5`, `[24, 28]` work), except that anything
    with a '/' stays a string for the fraction parser."""
    tree: dict = {}
    for item in overrides:
        key, raw = split_override(item)
        value: Any = raw if "/" in raw else yaml.safe_load(raw) if raw.strip() else ""
        if isinstance(value, bool) and raw.strip().lower() not in ("true", "false"):
            value = raw.strip()  # YAML 1.1 reads `off`/`yes` as booleans; keep the word (train.amp=off)
        _set_path(tree, key, value)
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _route_method_args(tree: dict) -> dict:
    """`method.c=0.02`: keys under `method` that MethodConfig does not have go to method.args."""
    method = tree.get("method")
    if isinstance(method, str):  # `method: atas` shorthand in a recipe
        tree["method"] = method = {"name": method}
    if isinstance(method, dict):
        own = {f.name for f in dataclasses.fields(MethodConfig)}
        per = {k: method.pop(k) for k in list(method) if k in METHODS and k not in own}
        extra = {k: method.pop(k) for k in list(method) if k not in own}
        if per:
            method["per_method"] = _merge(method.get("per_method") or {}, per)
        if extra:
            method["args"] = _merge(method.get("args") or {}, extra)
    return tree


def resolve_recipe_path(recipe: str | Path) -> Path:
    """A recipe is a YAML path or the name of a shipped recipe (`atas recipes` lists them)."""
    path = Path(recipe)
    if path.suffix in (".yaml", ".yml") and path.exists():
        return path  # a folder named *.yaml is refused by read_yaml_mapping, saying so
    shipped = RECIPE_DIR / f"{recipe}.yaml"
    if shipped.exists():
        return shipped  # even with a folder of that name here (a data folder called fmnist)
    if path.is_dir():
        return path
    names = ", ".join(sorted(p.stem for p in RECIPE_DIR.glob("*.yaml")))
    raise ConfigError(f"no recipe file {recipe!r} and no shipped recipe of that name; shipped: {names}")


def read_yaml_mapping(path: Path, what: str = "a recipe", advice: str = "", empty_ok: bool = True) -> dict:
    """The YAML mapping in `path`, or a ConfigError in one line: a folder, an unreadable or binary
    file, invalid YAML, or YAML that is not a mapping (a string, a list) each say which it is.
    `advice`: what to do about it, appended to every message."""
    tail = f"; {advice}" if advice else ""
    if path.is_dir():
        raise ConfigError(f"{path} is a folder, not {what} (a YAML file){tail}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not a text file (not UTF-8): not {what}{tail}") from None
    except OSError as e:  # permission denied, a FIFO's reader gone, an I/O error
        raise ConfigError(f"cannot read {path}: {e.strerror or e}{tail}") from None
    try:
        tree = yaml.safe_load(text)
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML{at} ({problem}){tail}") from None
    if tree is None and empty_ok:
        return {}
    if not isinstance(tree, dict):
        got = "empty" if tree is None else f"a YAML {type(tree).__name__}"
        raise ConfigError(f"{path} is {got}, not {what} (a YAML mapping of sections such as train:, method:){tail}")
    return tree


def load_config(recipe: str | Path | dict | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- recipe (path, shipped name or dict) <- overrides; returns a validated Config."""
    tree: dict = {}
    if isinstance(recipe, dict):
        tree = dict(recipe)
    elif recipe is not None:
        tree = read_yaml_mapping(resolve_recipe_path(recipe))
    tree = _route_method_args(_merge(_route_method_args(tree), _route_method_args(parse_overrides(overrides or []))))
    cfg = build_dataclass(Config, tree)
    validate(cfg)
    return cfg


def config_from_dict(tree: dict) -> Config:
    """Rebuild a Config saved with `to_dict()` (checkpoints, run folders)."""
    cfg = build_dataclass(Config, _route_method_args(dict(tree)))
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Cross-field checks; fills method.args with the method's defaults so the saved config is whole."""
    check_eps(cfg.method.eps)
    if cfg.model.arch not in list_models():
        raise ConfigError(f"unknown model {cfg.model.arch!r}; valid: {', '.join(list_models())}")
    try:  # the registries raise ValueError listing the valid names
        dataset_info(cfg.data.name)
        method_cls = get_method(cfg.method.name)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    for name, opts in cfg.method.per_method.items():
        if name not in list_methods() or not isinstance(opts, dict):
            raise ConfigError(f"method.{name}: not a method; valid: {', '.join(list_methods())}")
        build_dataclass(get_method(name).Options, opts, f"method.{name}.")  # typos fail even if unused
    chosen = _merge(cfg.method.per_method.get(cfg.method.name, {}), cfg.method.args)
    chosen.setdefault("eps_ramp_epochs", cfg.train.eps_ramp_epochs)  # the run's schedule, unless set per method
    check_techniques(cfg)
    if method_cls.supports_label_smoothing:  # a loss without cross-entropy has nothing to smooth
        chosen.setdefault("label_smoothing", cfg.train.label_smoothing)
    options = build_dataclass(method_cls.Options, chosen, "method.")
    method_cls.check_options(options)  # the method's own range checks, before anything trains
    cfg.method.args = _to_plain(options)
    if cfg.train.compile and method_cls.no_compile:
        raise ConfigError(
            f"train.compile=true cannot run {cfg.method.name}: {method_cls.no_compile}. Set train.compile=false."
        )
    for key, n in (("data.subset", cfg.data.subset), ("data.test_subset", cfg.data.test_subset)):
        if n is not None and n < 1:  # x[:0] would keep nothing and x[:-5] all but 5: never what was meant
            raise ConfigError(
                f"{key} must be >= 1 (keep the first N images), got {n}; "
                f"leave it out (or {key}=null) to use the whole split"
            )
    if cfg.data.val_size < 0:
        raise ConfigError(
            f"data.val_size must be >= 0 (the number of training images held out for validation; "
            f"0: none), got {cfg.data.val_size}"
        )
    if cfg.data.val_from not in ("last", "stride"):
        raise ConfigError(
            f"data.val_from must be last or stride (evenly spread: a class-sorted image folder), "
            f"got {cfg.data.val_from!r}"
        )
    if cfg.data.subset is not None and cfg.data.val_size >= cfg.data.subset:
        raise ConfigError(
            f"data.val_size={cfg.data.val_size} holds out all of the data.subset={cfg.data.subset} "
            f"training images; give data.val_size < {cfg.data.subset} (something must be trained on)"
        )
    if cfg.train.epochs < 1:
        raise ConfigError(f"train.epochs must be >= 1, got {cfg.train.epochs}")
    if cfg.train.batch_size < 1:
        raise ConfigError(f"train.batch_size must be >= 1, got {cfg.train.batch_size}")
    if cfg.train.store_dtype not in ("float32", "float16", "bfloat16", "int8"):
        raise ConfigError(
            "train.store_dtype must be float32, float16, bfloat16 or int8 (quantised relative to "
            f"eps), got {cfg.train.store_dtype!r}"
        )
    if cfg.train.amp not in ("off", "bf16", "fp16"):
        raise ConfigError(f"train.amp must be off, bf16 or fp16, got {cfg.train.amp!r}")
    if cfg.train.co_action not in CO_ACTIONS:
        raise ConfigError(
            f"train.co_action must be one of {', '.join(CO_ACTIONS)} (recover: roll back to the last "
            f"healthy epoch and apply the method's remedy), got {cfg.train.co_action!r}"
        )
    for key in ("eps_ramp_epochs", "max_recoveries"):
        if getattr(cfg.train, key) < 0:
            raise ConfigError(f"train.{key} must be >= 0, got {getattr(cfg.train, key)}")
    if cfg.train.recover_budget_epochs is not None and cfg.train.recover_budget_epochs < 0:
        raise ConfigError(
            f"train.recover_budget_epochs must be >= 0 (epochs the guard may replay), "
            f"got {cfg.train.recover_budget_epochs}"
        )
    if cfg.train.probe_size < 0:  # x_test[--5:] would probe on 9,995 of the evaluation images
        raise ConfigError(
            f"train.probe_size must be >= 0 (the number of test images held out for the per-epoch "
            f"probe; 0: no probe), got {cfg.train.probe_size}"
        )
    if cfg.train.max_steps is not None and cfg.train.max_steps < 1:
        raise ConfigError(
            f"train.max_steps must be >= 1 (stop after that many optimizer steps), got "
            f"{cfg.train.max_steps}; leave it out (or train.max_steps=null) to train every epoch"
        )
    check_device(cfg.train.device, "train.device")
    if cfg.train.probe_steps < 1:
        raise ConfigError(f"train.probe_steps must be >= 1, got {cfg.train.probe_steps}")
    if cfg.train.probe_restarts < 1:
        raise ConfigError(f"train.probe_restarts must be >= 1, got {cfg.train.probe_restarts}")
    _check_ranges(cfg)
    if cfg.optim.schedule not in SCHEDULES:
        raise ConfigError(f"optim.schedule must be one of {', '.join(SCHEDULES)}, got {cfg.optim.schedule!r}")
    if cfg.optim.schedule in ("cyclic", "onecycle") and not 0 < cfg.optim.pct_start < 1:
        raise ConfigError(
            f"optim.pct_start (the fraction of training spent rising to the peak lr) must lie in "
            f"(0, 1), got {cfg.optim.pct_start}"
        )
    if cfg.optim.div_factor < 1 or cfg.optim.final_div_factor < 1:
        raise ConfigError(
            f"optim.div_factor and optim.final_div_factor must be >= 1 (onecycle starts at "
            f"lr/div_factor), got {cfg.optim.div_factor}, {cfg.optim.final_div_factor}"
        )
    if cfg.optim.name not in ("sgd", "adam"):
        raise ConfigError(f"optim.name must be sgd or adam, got {cfg.optim.name!r}")
    if cfg.optim.lr <= 0:
        raise ConfigError(f"optim.lr must be > 0, got {cfg.optim.lr}")
    validate_eval(cfg)


def check_device(name: str, key: str) -> None:
    """A device torch knows (auto, cpu, cuda, cuda:N, mps ...), before anything is built."""
    import torch

    if name == "auto":
        return
    try:
        torch.device(name)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(
            f"{key}={name} is not a device ({str(e).split(' device type')[0]}); use auto, cpu, cuda or cuda:N"
        ) from None


def training_warnings(cfg: Config) -> list[str]:
    """Settings that train, but not as a user would expect: said once, when a run starts."""
    notes = []
    opts = cfg.method.args
    ramp, start = int(opts.get("eps_ramp_epochs", 0) or 0), int(opts.get("eps_ramp_start", 1) or 1)
    if ramp and start + ramp - 1 > cfg.train.epochs:
        last = cfg.train.epochs - start + 1
        key = "method.eps_ramp_epochs" if ramp != cfg.train.eps_ramp_epochs else "train.eps_ramp_epochs"
        notes.append(
            f"{key}={ramp} is longer than train.epochs={cfg.train.epochs}: the run never trains at "
            f"method.eps={cfg.method.eps.text} (its last epoch trains at eps "
            f"{float(cfg.method.eps) * max(last, 0) / ramp:.4g}, {max(last, 0)}/{ramp} of it); give "
            f"{key} <= train.epochs (or more train.epochs)"
        )
    return notes


def _check_ranges(cfg: Config) -> None:
    """The numeric options of the data, train and optim sections that the checks above do not cover
    (a negative padding, probe size or weight decay would otherwise fail, or silently misbehave,
    mid-run): each with the range it must lie in."""
    d, t, o = cfg.data, cfg.train, cfg.optim
    for key, value, ok, want in (
        ("data.train_pad", d.train_pad, d.train_pad is None or d.train_pad >= 0, ">= 0 (or null: the dataset's)"),
        ("data.num_workers", d.num_workers, d.num_workers >= 0, ">= 0"),
        ("train.probe_size", t.probe_size, t.probe_size >= 0, ">= 0 (0: no probe)"),
        ("train.probe_steps", t.probe_steps, t.probe_steps >= 1, ">= 1"),
        ("train.store_size", t.store_size, t.store_size is None or t.store_size >= 1, ">= 1 (or null: the frame)"),
        ("train.max_steps", t.max_steps, t.max_steps is None or t.max_steps >= 1, ">= 1 (or null: no limit)"),
        ("optim.momentum", o.momentum, 0 <= o.momentum < 1, "in [0, 1)"),
        ("optim.weight_decay", o.weight_decay, o.weight_decay >= 0, ">= 0"),
        ("optim.gamma", o.gamma, o.gamma > 0, "> 0 (the LR factor at each milestone)"),
        ("optim.milestones", o.milestones, all(m >= 0 for m in o.milestones), "epochs >= 0"),
    ):
        if not ok:
            raise ConfigError(f"{key} must be {want}, got {value}")


def check_techniques(cfg: Config) -> None:
    """train.label_smoothing, the weight average's tau and start, and the selection rule."""
    from atas.selection import selection_mode

    t = cfg.train
    if not 0.0 <= t.label_smoothing < 1.0:
        raise ConfigError(
            f"train.label_smoothing must be in [0, 1) (the benchmark's 0.4; 0: none), got {t.label_smoothing}"
        )
    if t.wa_tau != 0:
        from atas.averaging import check_tau

        check_tau(t.wa_tau, "train.wa_tau")
    if t.wa_start_epoch < 1:
        raise ConfigError(
            f"train.wa_start_epoch must be >= 1 (the first averaged epoch, 1-based), got {t.wa_start_epoch}"
        )
    selection_mode(t.select, t.wa_tau, cfg.data.val_size)


def validate_eval(cfg: Config) -> None:
    """The eval section: attack names, sizes and the PGD step, each with a message saying what to write."""
    e = cfg.eval
    e.attacks = check_attacks(e.attacks, "eval.attacks: ")
    for key in ("pgd_steps", "pgd_restarts", "batch_size"):
        if getattr(e, key) < 1:
            raise ConfigError(f"eval.{key} must be >= 1, got {getattr(e, key)}")
    if e.n_examples is not None and e.n_examples < 1:
        raise ConfigError(f"eval.n_examples must be >= 1 (or null for the whole test set), got {e.n_examples}")
    try:
        pgd_step(cfg.method.eps, e.pgd_alpha, e.pgd_schedule, e.pgd_loss)
    except ValueError as err:
        raise ConfigError(f"eval.pgd_alpha / pgd_schedule / pgd_loss: {err}") from None


def check_attacks(attacks: list[str] | str, key: str = "", installed: bool = False) -> list[str]:
    """Attack names (a list, or a comma list as typed), lower-cased, each once, all registered: the
    one reader of an attack list (eval.attacks, --attacks). installed=True (the attacks are about to
    run): also the optional package each one runs on (`Attack.requires`), or MissingDependencyError
    saying what to install and which attacks run without it."""
    attacks = coerce(attacks, list[str], key.rstrip(": ") or "attacks")  # a comma list as typed, or a list
    names = list(dict.fromkeys(a.strip().lower() for a in attacks if a.strip()))
    unknown = [a for a in names if a not in ATTACKS.names()]
    if unknown or not names:
        raise ConfigError(
            f"{key}unknown attack(s) {', '.join(unknown) or '(none given)'}; valid: {', '.join(ATTACKS.names())}"
        )
    missing = [a for a in names if ATTACKS[a].requires and not available(ATTACKS[a].requires)]
    if installed and missing:
        module = ATTACKS[missing[0]].requires
        needs = [a for a in missing if ATTACKS[a].requires == module]
        kept = ",".join(a for a in names if a not in needs) or "clean,pgd"
        what = ", ".join(f"{a} ({ATTACKS[a].label})" for a in needs)
        option = key.rstrip(": ") or "--attacks"
        raise MissingDependencyError(
            f"{option}={','.join(names)} runs {what}, and the {module} package is not "
            f"installed: {INSTALL.get(module, f'pip install {module}')}; or evaluate "
            f"without it: {option}={kept}"
        )
    return names


def method_options(cfg: Config) -> Any:
    """The method's typed Options dataclass for this (validated) config."""
    return build_dataclass(get_method(cfg.method.name).Options, cfg.method.args, "method.")
