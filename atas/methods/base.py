"""The public method object every training method of the family is: configure once, call per batch.

    atk = atas.method("atas", eps=8/255, num_samples=len(train_set), epochs=30,
                      augment=atas.RandomCropFlip(pad=4))
    for epoch in range(30):
        for x, y, idx in atk.batches(loader, device):   # starts the epoch, paired crop/flip
            x_adv = atk.perturb(model, x, y, idx)        # gather prior -> attack -> scatter prior
            loss = atk.loss(model, x_adv, y, x)          # the method's own loss, regularisers included
            opt.zero_grad(); loss.backward(); opt.step()
    torch.save({"model": model.state_dict(), "atas": atk.state_dict()}, "ckpt.pt")

`atas train` runs exactly these calls (atas/trainer.py): one engine, one code path.

A subclass says how x_adv is made (`attack`) and, if it has one, its training loss
(`training_loss`); the per-sample store (ATAS's prior and gradient-norm average), the paired
augmentation, epoch bookkeeping and checkpoint state live here, behind the public calls.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, cast

import torch
import torch.nn as nn
import torch.nn.functional as F

from atas.augment import CropFlip, PairedAugment
from atas.registry import Registry
from atas.store import PerSampleStore
from atas.threat import BN_MODES, LinfBall
from atas.values import ConfigError, build_dataclass, parse_fraction, to_plain

# name -> Method subclass; `@register` on a class adds it under its `name`. Packages add theirs
# through the entry-point group "atas.methods" (atas.registry).
METHODS = Registry("method", group="atas.methods")
register = METHODS.register


def list_methods() -> list[str]:
    return METHODS.names()


def get_method(name: str) -> type[Method]:
    return METHODS.get(name)


def method(name: str, eps, **kwargs) -> Method:
    """`atas.method("n_fgsm", eps=8/255, ...)`: the method object by registry name; keyword
    arguments as for the class (num_samples, epochs, augment, store_dtype and the method's options)."""
    return get_method(name)(eps, **kwargs)


@dataclass
class BatchState:
    """What a method's `attack` may look at besides (model, x, y): the batch's dataset indices,
    the 1-based epoch, the per-sample store (methods with uses_store) and the batch's prior
    perturbation, already cropped/flipped like x (None for methods without a store)."""

    idx: torch.Tensor | None
    epoch: int
    store: PerSampleStore | None = None
    prior: torch.Tensor | None = None


class Method:
    """A training method of the family (the class docstrings give each one's paper and options).

    Args:
        eps: L-inf radius in pixels ([0, 1] units): a float or an exact fraction string "8/255".
        options: the method's `Options` dataclass; or give its fields as keyword arguments.
        epochs: planned number of epochs (ATAS never resets its prior before the last one);
            None: unknown.
        num_samples: size of the training set; required by the methods that keep per-sample state
            (`uses_store`: atas, fgsm_pgi), whose batches must then carry dataset indices.
        augment: None (the batches are used as they come) or `atas.RandomCropFlip(pad=..., flip=...)`,
            atas's crop+flip drawn per sample on the device and applied to the image AND to its
            stored prior (the official ATAS pairing). Random crops/flips done by a torchvision
            transform in the Dataset cannot be seen here: see `atas.IndexedDataset`.
        store_dtype: "float32" (official), "float16", "bfloat16" or "int8" for the stored prior.
        store_options: advanced store placement for the trainer (device, storage_size, indices
            of a DDP shard, memmap_path, frame_shape to build it now rather than at the first batch).
    """

    # What a method says about itself: the registry, the trainer and the report read these, so
    # adding a method is its own file and nothing else.
    name: ClassVar[str]
    label: ClassVar[str] = ""  # as the papers write it, for reports ("" : the name)
    cost: ClassVar[str] = ""
    uses_store: ClassVar[bool] = False
    # True where `training_loss` adds a term to the cross-entropy (a user who trains on a plain
    # cross-entropy would silently drop it: warned once).
    has_regularizer: ClassVar[bool] = False
    # Why the method cannot run under train.compile=true ("": it can).
    no_compile: ClassVar[str] = ""
    # Per-step numbers in `stats` the trainer logs per epoch (mean, min, max), with their unit
    # ("pixels": shown as k/255 on the progress bar).
    logged_stats: ClassVar[dict[str, str]] = {}
    # What the report checks about the method: whether it is prone to catastrophic overfitting
    # (the finding "shows CO: yes/no"), whether it is the robust reference the others are timed
    # against (PGD-AT), and whether it claims to come within a few points of that reference.
    prone_to_co: ClassVar[bool] = False
    reference: ClassVar[bool] = False
    claims_reference_robustness: ClassVar[bool] = False
    # Optimizer steps per minibatch (Free-AT replays each minibatch m times; everyone else 1).
    replays: int = 1
    # The option whose published value does not transfer beyond the setting it was tuned in (one
    # dataset, one eps range), with the grid to search: {"lam": (10.0, 100.0, 1000.0)}. `atas compare
    # --tune` trains one run per value on a validation split and compares the method at the best
    # value. At most one option (each extra one multiplies the runs); empty: nothing to search.
    search: ClassVar[dict[str, tuple[float, ...]]] = {}
    # Forward and backward passes over a batch of B images per optimizer step (a 3B batch counts 3),
    # the cost the report and summary.json list beside the measured time. A method whose count
    # depends on its options overrides `passes_per_step`.
    passes: ClassVar[tuple[float, float]] = (2, 2)
    # False where the training loss has no cross-entropy term to smooth (label_smoothing > 0 is
    # then refused by check_options).
    supports_label_smoothing: ClassVar[bool] = True

    @dataclass
    class Options:
        """Options every method has: the training-eps schedule (a subclass's Options inherits it).

        eps_ramp_epochs (0): train against eps_t = eps * min(1, (epoch - eps_ramp_start + 1) /
            eps_ramp_epochs), a linear warm-up of eps by epoch (0: the full eps from the start, as
            every paper). Each method scales every eps-relative quantity of its step with eps_t.
        eps_ramp_start (1): the epoch the ramp starts from (the guard of `train.co_action=recover`
            restarts the ramp from the epoch it rolled back to).
        label_smoothing (0.0): label smoothing of the cross-entropy in the method's training loss
            (`Method.cross_entropy`); the attack's own gradients use the plain cross-entropy. A
            method whose loss has no cross-entropy term sets `supports_label_smoothing = False`.
        """

        eps_ramp_epochs: int = 0
        eps_ramp_start: int = 1
        label_smoothing: float = 0.0

    def __init__(
        self,
        eps,
        options=None,
        epochs: int | None = None,
        *,
        num_samples: int | None = None,
        augment: PairedAugment | None = None,
        store_dtype: str = "float32",
        store_options: dict | None = None,
        **option_values,
    ):
        self.eps = parse_fraction(eps) if isinstance(eps, str) else float(eps)
        self.ball = LinfBall(self.eps)
        if options is not None and option_values:
            raise TypeError(f"{type(self).__name__}: give either options= or keyword options, not both")
        self.opt = options if options is not None else build_dataclass(self.Options, option_values, "")
        self.check_options(self.opt)
        self.epochs = epochs
        if num_samples is not None and (int(num_samples) != num_samples or num_samples < 1):
            raise ValueError(f"num_samples must be a positive integer (len(train_set)), got {num_samples!r}")
        if augment is not None and not isinstance(augment, PairedAugment):
            raise TypeError(
                f"augment must be None or atas.RandomCropFlip(...), got {type(augment).__name__}. "
                "A torchvision transform belongs in the Dataset; see atas.IndexedDataset for "
                "why ATAS cannot use random crops it does not see."
            )
        self.num_samples = None if num_samples is None else int(num_samples)
        self.augment = augment
        self.store_dtype = store_dtype
        self._store_options = dict(store_options or {})
        self.store: PerSampleStore | None = None
        self._pending_store_state: dict | None = None
        self.current_epoch = 0  # 1-based once an epoch has started; 0 before
        self._crop: tuple[torch.Tensor | None, CropFlip] | None = None  # (idx, crop) of the last augment
        self._state: BatchState | None = None  # the last perturb's batch
        self._loss_pending = False
        self._warned_no_loss = False
        self._checked_epoch = -1
        self._checked_idx: torch.Tensor | None = None  # the indices batches() last checked
        self.logits: torch.Tensor | None = None  # logits of the last `loss` (for accuracy logs)
        # Per-step numbers for the progress bar / logs, kept as tensors (no device sync here).
        self.stats: dict[str, torch.Tensor] = {}
        self._reset_due = False
        # the model whose dtype perturb() last checked (a weak reference: the method must not keep it alive)
        self._checked_model: weakref.ReferenceType[nn.Module] | None = None

    def __repr__(self) -> str:
        opts = ", ".join(f"{f.name}={getattr(self.opt, f.name)!r}" for f in dataclasses.fields(self.opt))
        return f"atas.method({self.name!r}, eps={self.eps:.6g}{', ' + opts if opts else ''})"

    # -- epochs ----------------------------------------------------------------------------
    def start_epoch(self, epoch: int | None = None) -> int:
        """Begin epoch `epoch` (1-based; default: the one after the last). Runs the method's
        once-per-epoch work (ATAS's prior reset every 10 epochs). `batches()` calls it for you."""
        epoch = self.current_epoch + 1 if epoch is None else int(epoch)
        if epoch < 1:
            raise ValueError(f"epochs are 1-based; got start_epoch({epoch})")
        self.current_epoch = epoch
        self.on_epoch_start(epoch, self.store)
        return epoch

    def batches(self, loader: Iterable, device: torch.device | str | None = None) -> Iterator:
        """One epoch of (x, y, idx) batches: starts the next epoch (`start_epoch`, and the
        loader's or its sampler's `set_epoch`, e.g. DistributedSampler's), moves each batch to
        `device` and applies the paired crop/flip when `augment` is set."""
        epoch = self.start_epoch()
        for owner in (loader, getattr(loader, "sampler", None)):
            if hasattr(owner, "set_epoch"):
                cast(Any, owner).set_epoch(epoch)
                break
        for batch in loader:
            if not isinstance(batch, (tuple, list)) or len(batch) != 3:
                got = len(batch) if isinstance(batch, (tuple, list)) else type(batch).__name__
                raise ValueError(
                    f"each batch must be (x, y, idx) with idx the samples' dataset indices; the "
                    f"loader gave {got} item(s) per batch. Wrap the dataset in atas.IndexedDataset(...)"
                )
            x, y, idx = batch
            idx = torch.as_tensor(idx)
            self._check_idx(idx, len(x))
            if device is not None:
                x, y, idx = (t.to(device, non_blocking=True) for t in (x, y, idx))
            self._checked_idx = idx  # perturb() on this batch need not check it again
            yield self.augment_batch(x, idx), y, idx

    # -- the per-batch calls ---------------------------------------------------------------
    def augment_batch(self, x: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
        """The paired crop/flip of `augment` applied to x (identity without `augment`); the crop
        is remembered so that `perturb` on the same idx gathers the prior through it."""
        if self.augment is None:
            self._crop = None
            return x
        aug = self.augment.bind(x.shape[-1])
        cf = aug.sample(len(x), x.device)
        self._crop = (idx, cf)
        return aug(x, cf)

    def perturb(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x_adv for the batch (x in [0, 1], already augmented; y labels; idx dataset indices, needed
        by methods with per-sample state). The model's train/eval mode is restored afterwards."""
        if self._loss_pending and self.has_regularizer and not self._warned_no_loss:
            self._warned_no_loss = True
            warnings.warn(
                f"{self.name}: perturb() was called again without loss(): this method's training "
                f"loss adds a regulariser to the cross-entropy. Train on loss = atk.loss(model, "
                "x_adv, y, x), or the regulariser is silently dropped.",
                stacklevel=2,
            )
        if self.current_epoch == 0:
            self.start_epoch(1)
        if self._checked_model is None or self._checked_model() is not model:  # once per model, not per step
            _check_float32(self.name, model, x)  # before the store is built or anything is written
            self._checked_model = weakref.ref(model)
        elif x.dtype in _HALF:
            _check_float32(self.name, model, x)
        store: PerSampleStore | None = None
        prior: torch.Tensor | None = None
        cf: CropFlip | None = None
        if self.uses_store:
            if idx is None:
                raise ValueError(
                    f"{self.name} keeps state per training sample: pass perturb(model, x, y, idx) "
                    "with the samples' dataset indices (wrap the dataset in atas.IndexedDataset)"
                )
            cf = self._crop_for(idx, x)
            if idx is not self._checked_idx:
                idx = torch.as_tensor(idx, device=x.device)
                self._check_idx(idx, len(x))
            store = self._store_for(x, cf)
            prior = store.gather_delta(idx, cf)  # gather
        self._state = state = BatchState(idx=idx, epoch=self.current_epoch, store=store, prior=prior)
        x_adv = self.attack(model, x, y, state)  # attack
        if store is not None and idx is not None and cf is not None:  # (all three, or none: uses_store)
            store.scatter_delta(idx, cf, self.new_prior(x_adv, x))  # scatter
        self._loss_pending = True
        return x_adv

    def loss(self, model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The method's training loss on the batch of the last `perturb` (regularisers included),
        the model in the mode it is in (train, for a training step). Its logits: `self.logits`."""
        if self._state is None:
            raise RuntimeError(f"{self.name}: loss() needs perturb() on the same batch first")
        loss, self.logits = self.training_loss(model, x_adv, y, x, self._state)
        self._loss_pending = False
        return loss

    def store_summary(self) -> dict:
        """A read-only look at the per-sample store (methods with `uses_store`), as Python numbers:
        num_samples, updated (samples whose gradient-norm average has been written: the ones ATAS's
        adaptive rule has seen since its warm-up), grad_norm_ema (mean/min/max over the updated samples
        of sqrt(v_i), the gradient norm ATAS divides by: alpha = N / (1 + grad_norm_ema / c)) and
        prior_abs (mean/max of |delta| over the whole store, in pixels). It reads the whole store: call
        it once an epoch, not every step."""
        if not self.uses_store:
            raise TypeError(f"{self.name} keeps no per-sample state; store_summary() is for atas and fgsm_pgi")
        if self.store is None:
            raise RuntimeError(
                f"{self.name}: the per-sample store is built at the first batch; call store_summary() after perturb()"
            )
        v = self.store.grad_sq_ema
        updated = v[v > 0].sqrt()
        prior_sum, prior_max = 0.0, 0.0
        for start, stop in self.store._row_chunks():  # int8/memmap stores: a chunk of rows at a time
            chunk = self.store._decode(self.store.delta[start:stop]).abs()
            prior_sum += float(chunk.sum(dtype=torch.float64))
            prior_max = max(prior_max, float(chunk.max()))
        norms = (
            {"mean": float(updated.mean()), "min": float(updated.min()), "max": float(updated.max())}
            if len(updated)
            else {"mean": None, "min": None, "max": None}
        )
        return {
            "epoch": self.current_epoch,
            "num_samples": len(v),
            "updated": len(updated),
            "grad_norm_ema": norms,
            "prior_abs": {"mean": prior_sum / max(1, self.store.delta.numel()), "max": prior_max},
        }

    # -- checkpoints -----------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything needed to continue exactly: the epoch, the per-sample store and the
        method's own carried tensors, the method's name and its options (as they are now: a change
        by `set_options`, e.g. the guard's remedy, is part of the state). Tensors and plain values
        only (loads with weights_only=True)."""
        state = {"epoch": self.current_epoch, "method": self.method_state(), "options": to_plain(self.opt)}
        state["name"] = self.name  # load_state_dict refuses another method's state
        state["eps"] = float(self.eps)  # load_state_dict warns when it goes into an object with another eps
        if self.num_samples is not None:
            state["num_samples"] = self.num_samples
        if self.store is not None:
            state["store"] = self.store.state_dict()
        elif self._pending_store_state is not None:
            state["store"] = self._pending_store_state
        return state

    def load_state_dict(self, state: dict) -> None:
        saved_name = state.get("name", self.name)  # states saved before the name was recorded: accepted
        if saved_name != self.name:
            raise ValueError(
                f"cannot load a state saved by method {saved_name!r} into {self.name!r}: its store and "
                f"carried tensors mean something else to {self.name}. Load it into "
                f"atas.method({saved_name!r}, ...), or start {self.name} fresh."
            )
        saved_n = state.get("num_samples")
        if self.uses_store and saved_n is not None and int(saved_n) != self.num_samples:
            raise ValueError(
                f"cannot resume {self.name}: the saved per-sample state is for "
                f"num_samples={int(saved_n)}, this object has num_samples={self.num_samples}. Resume "
                "with the training set the state was saved with (same size and order), or start fresh."
            )
        self._warn_if_other_eps(state)
        if "options" in state:  # states saved before the options were recorded: the object's stay
            self._load_options(state["options"])
        self.current_epoch = int(state.get("epoch", 0))
        if "store" in state:
            if self.store is not None:
                self.store.load_state_dict(state["store"])
            else:  # built at the first batch, when the device and image size are known
                self._pending_store_state = state["store"]
        device = self.store.device if self.store is not None else None
        self.load_method_state(
            {
                k: v.to(device) if device is not None and torch.is_tensor(v) else v
                for k, v in state.get("method", {}).items()
            }
        )

    def _warn_if_other_eps(self, state: dict) -> None:
        """A state saved at another eps continues with numbers made for that ball (ATAS's prior,
        its gradient-norm averages): allowed, as an explicit choice, but never silently. eps is the
        object's (it is not an option the state restores). States saved before eps was recorded
        say nothing and are accepted as they are."""
        saved = state.get("eps")
        if isinstance(saved, (int, float)) and not math.isclose(float(saved), self.eps, rel_tol=1e-9):
            warnings.warn(
                f"{self.name}: loading a state saved at eps {_eps_text(saved)} into an object with eps "
                f"{_eps_text(self.eps)}: its per-sample state was made in the eps {_eps_text(saved)} ball "
                f"and now continues at {_eps_text(self.eps)}. To resume that run exactly, build the object "
                f"with eps={_eps_text(saved)}; to train at the new eps, start fresh (do not load the state).",
                stacklevel=3,
            )

    def _load_options(self, saved: dict) -> None:
        """The loaded options win: a run resumed from a state continues with the options it was
        trained with (remedies included); where they differ from this object's, say which."""
        names = {f.name for f in dataclasses.fields(self.opt)}
        try:
            loaded = build_dataclass(type(self.opt), {k: v for k, v in saved.items() if k in names}, "")
            self.check_options(loaded)
        except ConfigError as e:
            raise ValueError(
                f"{self.name}: the state's options do not load ({e}); was it saved by another version of this method?"
            ) from None
        differ = [
            f"{k} {getattr(self.opt, k)!r} -> {getattr(loaded, k)!r}"
            for k in sorted(names)
            if to_plain(getattr(self.opt, k)) != to_plain(getattr(loaded, k))
        ]
        if not differ:
            return
        warnings.warn(
            f"{self.name}: the loaded state's options differ from this object's ({', '.join(differ)}); "
            "the loaded ones are used, as the run they were saved from had them",
            stacklevel=3,
        )
        self.opt = loaded
        self.options_changed()

    # -- what a method defines ---------------------------------------------------------------
    def method_state(self) -> dict:
        """Tensors the method carries between steps (Free-AT's delta, FGSM-PGI's momentum)."""
        return {}

    def load_method_state(self, state: dict) -> None:
        pass

    @classmethod
    def display_label(cls) -> str:
        return cls.label or cls.name

    @classmethod
    def check_options(cls, opt) -> None:
        """The Options' range checks (ConfigError naming the key). Config validation runs them, so
        every run of a comparison is checked before the first one trains; the constructor and
        `set_options` run them too. A subclass extends them with super().check_options(opt)."""
        if opt.eps_ramp_epochs < 0:
            raise ConfigError(f"method.eps_ramp_epochs must be >= 0 (0: no ramp), got {opt.eps_ramp_epochs}")
        if opt.eps_ramp_start < 1:
            raise ConfigError(f"method.eps_ramp_start must be >= 1 (a 1-based epoch), got {opt.eps_ramp_start}")
        if not 0.0 <= opt.label_smoothing < 1.0:
            raise ConfigError(f"method.label_smoothing must be in [0, 1) (0: none), got {opt.label_smoothing}")
        # Options that mean one thing in every method that declares them, checked here once: a typo
        # (bn_mode=evl) must not pass validation, write the run folder and fail at the first attack.
        bn = getattr(opt, "bn_mode", None)
        if bn is not None and bn not in BN_MODES:
            raise ConfigError(
                f"method.bn_mode must be one of {', '.join(BN_MODES)} (BatchNorm statistics during "
                f"the attack: running or batch), got {bn!r}"
            )
        factor = getattr(opt, "alpha_factor", None)
        if factor is not None and not factor > 0:
            raise ConfigError(f"method.alpha_factor (the attack's step, a multiple of eps) must be > 0, got {factor}")
        if opt.label_smoothing > 0 and not cls.supports_label_smoothing:
            raise ConfigError(
                f"method.label_smoothing: {cls.name}'s training loss has no cross-entropy term to "
                f"smooth; set label_smoothing=0 for it (method.{cls.name}.label_smoothing=0)"
            )

    def passes_per_step(self) -> tuple[float, float]:
        """(forward, backward) passes over a batch of B images per optimizer step (attack and
        training step together; a replayed minibatch counts once per replay)."""
        return self.passes

    def cross_entropy(self, logits: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """The cross-entropy of the method's training loss, in float32, with the run's label
        smoothing (option `label_smoothing`). Attacks differentiate the plain cross-entropy."""
        return F.cross_entropy(logits.float(), y, label_smoothing=self.opt.label_smoothing, reduction=reduction)

    def eps_at(self, epoch: int) -> float:
        """The training eps of `epoch` (1-based): eps * min(1, (epoch - start + 1) / ramp_epochs),
        where start = eps_ramp_start; eps itself without a ramp, and before `start` the ramp's
        first value (a guard restarting the ramp never trains at 0)."""
        ramp, start = self.opt.eps_ramp_epochs, self.opt.eps_ramp_start
        if ramp <= 0 or epoch - start + 1 >= ramp:
            return self.eps
        return self.eps * max(1, epoch - start + 1) / ramp

    def ball_at(self, epoch: int) -> LinfBall:
        """The ball to train against in `epoch` (radius `eps_at(epoch)`); every method uses it for
        every eps-relative quantity of its step, so one schedule serves the whole family."""
        eps_t = self.eps_at(epoch)
        return self.ball if eps_t == self.eps else LinfBall(eps_t)

    # -- the guard's remedies (train.co_action=recover) ---------------------------------------
    def remedy(self, attempt: int) -> dict:
        """Option changes that this method's paper suggests against catastrophic overfitting, for
        the guard's `attempt`-th recovery (1, 2, ...): {option: new value}. {} (the default): the
        method has none, and the guard falls back to restarting the eps ramp."""
        return {}

    def set_options(self, **changes) -> None:
        """Change options mid-run (the guard's remedies). The change is part of `state_dict()`, so
        `load_state_dict` on a fresh object restores it (with a warning naming what differed)."""
        opt = dataclasses.replace(self.opt, **changes)
        self.check_options(opt)
        self.opt = opt
        self.options_changed()

    def options_changed(self) -> None:
        """Recompute what a method derives from its options (called by `set_options`)."""

    def on_epoch_start(self, epoch: int, store: PerSampleStore | None) -> None:
        """Called before epoch `epoch` (1-based) begins (store: None until the first batch)."""

    def reset_store(self, store: PerSampleStore | None) -> None:
        """Re-draw every stored prior U(-eps, eps) now, or as soon as the store is built."""
        if store is not None:
            store.reset_delta()
        else:  # a fresh store is drawn anyway; a store loaded from a checkpoint is re-drawn once built
            self._reset_due = self._pending_store_state is not None

    def attack(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, state: BatchState) -> torch.Tensor:
        raise NotImplementedError

    def new_prior(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """What is written back into the store after the attack (default: the perturbation)."""
        return x_adv - x

    def training_loss(
        self, model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor, x: torch.Tensor, state: BatchState
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean cross-entropy on x_adv (label smoothing as configured); returns (loss, logits)."""
        logits = model(x_adv)
        return self.cross_entropy(logits, y), logits

    # -- the store behind the doors ----------------------------------------------------------
    def _check_idx(self, idx: torch.Tensor, batch: int) -> None:
        """Dataset indices must be integers in [0, num_samples), one per image. The range check
        needs the values: free on CPU; on an accelerator done once per epoch (one sync)."""
        if idx.dtype.is_floating_point or idx.dtype == torch.bool or idx.dim() != 1 or len(idx) != batch:
            raise ValueError(
                f"idx must be a 1-D integer tensor with one dataset index per image ({batch}), got "
                f"{idx.dtype} of shape {tuple(idx.shape)}"
            )
        if self.num_samples is None or (idx.device.type != "cpu" and self._checked_epoch == self.current_epoch):
            return
        self._checked_epoch = self.current_epoch
        if len(idx) and (int(idx.min()) < 0 or int(idx.max()) >= self.num_samples):
            raise IndexError(
                f"dataset index out of range: this batch has indices in [{int(idx.min())}, "
                f"{int(idx.max())}] but num_samples={self.num_samples}. Give num_samples=len(train_set) "
                "of the dataset the indices come from (atas.IndexedDataset gives 0..len-1)."
            )

    def _crop_for(self, idx: torch.Tensor, x: torch.Tensor) -> CropFlip:
        """The crop/flip this batch was augmented with (identity without `augment`)."""
        if self.augment is None:
            zeros = torch.zeros(len(x), dtype=torch.long, device=x.device)
            return CropFlip(
                zeros, zeros, torch.zeros(len(x), dtype=torch.bool, device=x.device), x.shape[-1], x.shape[-1]
            )
        if self._crop is None or self._crop[0] is None or not _same_tensor(self._crop[0], idx):
            raise RuntimeError(
                f"{self.name} was built with augment={self.augment!r}: take the batch from "
                "atk.batches(loader) or call x = atk.augment_batch(x, idx) before perturb(), "
                "so that the prior is cropped like the image"
            )
        return self._crop[1]

    def _store_for(self, x: torch.Tensor, cf: CropFlip) -> PerSampleStore:
        frame_shape = (x.shape[1], cf.frame, cf.frame)
        store = self.store
        if store is None:
            store = self._build_store(frame_shape, self._store_options.get("device", x.device))
        if (store.delta.shape[1], store.frame, store.frame) != frame_shape:
            raise ValueError(
                f"this batch's images need a stored prior of {frame_shape} (channels, frame, frame) but "
                f"the store holds {(store.delta.shape[1], store.frame, store.frame)}: "
                "every batch of a run must have the image size (and augmentation) it started with"
            )
        return store

    def _build_store(self, frame_shape: tuple[int, int, int], device) -> PerSampleStore:
        if self.num_samples is None:
            raise ValueError(
                f"{self.name} keeps state per training sample: build it with "
                "num_samples=len(train_set) (and batches with dataset indices: atas.IndexedDataset)"
            )
        opts = {k: v for k, v in self._store_options.items() if k != "device"}
        self.store = store = PerSampleStore(
            self.num_samples,
            frame_shape,
            self.eps,
            dtype=self.store_dtype,
            device=device,
            draw=self._pending_store_state is None,
            **opts,
        )
        if self._pending_store_state is not None:
            store.load_state_dict(self._pending_store_state)
            self._pending_store_state = None
        if self._reset_due:
            store.reset_delta()
            self._reset_due = False
        return store


_HALF = (torch.float16, torch.bfloat16)


def _eps_text(eps: float) -> str:
    k = float(eps) * 255
    return f"{round(k)}/255" if abs(k - round(k)) < 1e-6 * max(1.0, k) else f"{float(eps):g}"


def _check_float32(name: str, model: nn.Module, x: torch.Tensor) -> None:
    """Half-precision weights or images fail deep inside the attack with torch's dtype error (or
    round eps-sized steps away); say what works instead, before the store is allocated."""
    half = next((p.dtype for p in model.parameters() if p.dtype in _HALF), None)
    what = f"the model has {half} parameters" if half is not None else (f"x is {x.dtype}" if x.dtype in _HALF else None)
    if what is not None:
        raise TypeError(
            f"{name}: perturb() needs float32 weights and images, but {what}. Keep the model and x in "
            "float32 and run under torch.autocast(device_type, dtype=torch.bfloat16) (float16: with a "
            "torch.amp.GradScaler), as `atas train train.amp=bf16` does; in Lightning use "
            "precision='bf16-mixed' or '16-mixed', not '*-true'."
        )


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The same batch of indices (no device sync: storage and shape, not values)."""
    return a is b or (a.shape == b.shape and a.device == b.device and a.data_ptr() == b.data_ptr())
