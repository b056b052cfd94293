"""The per-sample store: ATAS's memory of every training instance, keyed by dataset index.

Two pieces of state per instance, for the whole run (REFERENCE.md §1):
  delta        the prior perturbation, kept in the augmentation *frame* (CIFAR: padded 40x40), so
               that any crop/flip of it lines up with the same crop/flip of the image;
  grad_sq_ema  v_i, the moving average of the squared input-gradient norm (starts at 0).

Gather and scatter are the only doors (STYLE.md principle 3). Both take dataset indices and a
CropFlip and touch only the crop window of the listed rows.

Sharding (DDP): a store may own only a subset of the indices (`indices=`); a rank-stable sampler
then sends each index to the one rank that holds its row, so the store never communicates.

Storage resolution (ImageNet): the prior may be stored smaller than the frame (official: 32x32
for a 256x256 frame, fp16). Gather upsamples the rows to the frame before cropping; scatter
upsamples, writes the new window, and resamples back into storage. The official code returns the
unchanged source there, so its ImageNet prior is never updated (defect 2); ours is.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from atas.augment import CropFlip, crop, uncrop_into

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class PerSampleStore:
    def __init__(self, num_samples: int, frame_shape: tuple[int, int, int], eps: float, *,
                 dtype: str = "float32", device: torch.device | str = "cpu",
                 storage_size: int | None = None, indices: torch.Tensor | None = None):
        if dtype not in DTYPES:
            raise ValueError(f"store dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        channels, frame_h, frame_w = frame_shape
        if frame_h != frame_w:
            raise ValueError(f"the augmentation frame must be square, got {frame_h}x{frame_w}")
        self.num_samples = num_samples
        self.frame = frame_h
        self.storage_size = storage_size or frame_h
        self.eps = float(eps)
        self.dtype_name = dtype
        self.device = torch.device(device)
        if indices is None:
            self.indices = None
            self._row = None
            n_rows = num_samples
        else:
            self.indices = torch.as_tensor(indices, dtype=torch.long).sort().values.to(self.device)
            # global index -> row of this store; -1 where another rank owns the index
            self._row = torch.full((num_samples,), -1, dtype=torch.long, device=self.device)
            self._row[self.indices] = torch.arange(len(self.indices), device=self.device)
            n_rows = len(self.indices)
        shape = (n_rows, channels, self.storage_size, self.storage_size)
        self.delta = torch.empty(shape, dtype=DTYPES[dtype], device=self.device)
        self.grad_sq_ema = torch.zeros(n_rows, dtype=torch.float32, device=self.device)
        self.reset_delta()

    # -- bookkeeping ---------------------------------------------------------------------
    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        """Dataset indices -> rows of this store (identity when it owns every index)."""
        idx = idx.to(self.device)
        return idx if self._row is None else self._row[idx]

    def owns(self, idx: torch.Tensor) -> bool:
        """Whether every index is held here (a sync point: for checks, not the hot path)."""
        return bool((self.rows(idx) >= 0).all()) if self._row is not None else True

    @property
    def nbytes(self) -> int:
        return self.delta.numel() * self.delta.element_size() + self.grad_sq_ema.numel() * 4

    def reset_delta(self, generator: torch.Generator | None = None) -> None:
        """delta ~ U(-eps, eps) (init, and the official reset every 10 epochs). v is kept."""
        noise = torch.rand(self.delta.shape, generator=generator, device=self.device, dtype=torch.float32)
        self.delta.copy_((noise * 2 - 1) * self.eps)

    # -- the two doors -------------------------------------------------------------------
    def gather_delta(self, idx: torch.Tensor, cf: CropFlip) -> torch.Tensor:
        """The stored prior of samples idx, cropped/flipped like their images; float32 [B,C,H,W]."""
        rows = self.rows(idx)
        if self.storage_size == self.frame:
            # Crop straight out of storage: only the window is read.
            return self.delta[cf.index(rows)].permute(0, 3, 1, 2).float()
        return crop(self._to_frame(self.delta[rows]), cf)

    def scatter_delta(self, idx: torch.Tensor, cf: CropFlip, delta_window: torch.Tensor) -> None:
        """Write the new perturbation (x_adv - x, [B,C,H,W]) into each sample's crop window."""
        rows = self.rows(idx)
        if self.storage_size == self.frame:
            uncrop_into(self.delta, rows, delta_window, cf)
            return
        frames = self._to_frame(self.delta[rows])
        uncrop_into(frames, torch.arange(len(rows), device=frames.device), delta_window, cf)
        stored = F.interpolate(frames, size=(self.storage_size,) * 2, mode="area")
        self.delta[rows] = stored.clamp_(-self.eps, self.eps).to(self.delta.dtype)

    def gather_grad_sq_ema(self, idx: torch.Tensor) -> torch.Tensor:
        return self.grad_sq_ema[self.rows(idx)]

    def scatter_grad_sq_ema(self, idx: torch.Tensor, value: torch.Tensor) -> None:
        self.grad_sq_ema[self.rows(idx)] = value.float()

    def _to_frame(self, stored: torch.Tensor) -> torch.Tensor:
        return F.interpolate(stored.float(), size=(self.frame,) * 2, mode="bilinear", align_corners=False)

    # -- persistence ---------------------------------------------------------------------
    def state_dict(self) -> dict:
        state = {"delta": self.delta, "grad_sq_ema": self.grad_sq_ema,
                 "meta": torch.tensor([self.num_samples, self.frame, self.storage_size])}
        if self.indices is not None:
            state["indices"] = self.indices
        return state

    def load_state_dict(self, state: dict) -> None:
        meta = [int(v) for v in state["meta"]]
        if meta != [self.num_samples, self.frame, self.storage_size]:
            raise ValueError(
                f"per-sample store mismatch: the checkpoint holds (samples, frame, storage) = {meta}, "
                f"this run has {[self.num_samples, self.frame, self.storage_size]}. The checkpoint "
                "was made on another dataset size or augmentation frame; resume with the config it was "
                "made with (it is saved in the run folder as config.yaml).")
        theirs = state.get("indices")
        if (theirs is None) != (self.indices is None) or (
                theirs is not None and not torch.equal(theirs.to(self.device), self.indices)):
            raise ValueError("per-sample store shard mismatch: the checkpoint's rows belong to another "
                             "partition of the dataset (different world size or rank). Resume with the "
                             "world size the run was started with.")
        if tuple(state["delta"].shape) != tuple(self.delta.shape):
            raise ValueError(f"per-sample store shape mismatch: {tuple(state['delta'].shape)} vs "
                             f"{tuple(self.delta.shape)}")
        self.delta.copy_(state["delta"].to(self.device, self.delta.dtype))
        self.grad_sq_ema.copy_(state["grad_sq_ema"].to(self.device))
