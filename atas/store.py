"""The per-sample store: ATAS's memory of every training instance, keyed by dataset index.

Two pieces of state per instance, for the whole run (docs/algorithm.md, section 3):
  delta        the prior perturbation, kept in the augmentation *frame* (CIFAR: padded 40x40), so
               that any crop/flip of it lines up with the same crop/flip of the image;
  grad_sq_ema  v_i, the moving average of the squared input-gradient norm (starts at 0).

Gather and scatter are the only ways in and out of the store. Both take dataset indices and a
CropFlip and touch only the crop window of the listed rows.

Sharding (DDP): a store may own only a subset of the indices (`indices=`); a rank-stable sampler
then sends each index to the one rank that holds its row, so the store never communicates.

Storage resolution (ImageNet): the prior may be stored smaller than the frame (official: 32x32
for a 256x256 frame, fp16). Gather upsamples the rows to the frame before cropping; scatter
upsamples, writes the new window, and resamples back into storage. The official code returns the
unchanged source there, so its ImageNet prior is never updated (defect 2); ours is.

Memory (docs/scale.md): the official CIFAR store is fp32, 50000 x 3x40x40 = 0.96 GB. `dtype`
float16 / bfloat16 halve it; "int8" quarters it by quantising delta relative to eps:
q = round(delta / eps * 127) clamped to [-127, 127], so a stored pixel is off by at most eps/254
(at eps = 8/255: 0.03/255, far below one grey level). Gather dequantises to float32, scatter
quantises; both stay one vectorised op over the batch. An int8 store holds [-eps, eps] only,
which is every prior a projected method writes. `memmap_path` keeps delta in a file on disk
(torch.from_file, shared mapping) for stores larger than RAM; such a store lives on the CPU and
gather/scatter move each batch's window to and from the training device. `estimate_bytes` says
what a store will take before building it.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from atas.augment import CropFlip, crop, uncrop_into

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int8": torch.int8}
INT8_LEVELS = 127  # q in [-127, 127]: symmetric, so -eps and +eps are both exact
_CHUNK_BYTES = 64 * 2**20  # float32 working set of the row-chunked paths (init, dtype conversion)


def _check_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise ValueError(f"store dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


class PerSampleStore:
    def __init__(
        self,
        num_samples: int,
        frame_shape: tuple[int, int, int],
        eps: float,
        *,
        dtype: str = "float32",
        device: torch.device | str = "cpu",
        storage_size: int | None = None,
        indices: torch.Tensor | None = None,
        memmap_path: str | Path | None = None,
        draw: bool = True,
    ):
        torch_dtype = _check_dtype(dtype)
        channels, frame_h, frame_w = frame_shape
        if frame_h != frame_w:
            raise ValueError(f"the augmentation frame must be square, got {frame_h}x{frame_w}")
        self.num_samples = num_samples
        self.frame = frame_h
        self.storage_size = storage_size or frame_h
        self.eps = float(eps)
        self.dtype_name = dtype
        self.device = torch.device(device)
        # int8: the value of one quantisation level (delta = q * quant_step); None for float dtypes.
        self.quant_step = self.eps / INT8_LEVELS if torch_dtype == torch.int8 else None
        self.memmap_path = Path(memmap_path) if memmap_path is not None else None
        if self.memmap_path is not None and self.device.type != "cpu":
            raise ValueError(
                f"a memory-mapped store (memmap_path={str(self.memmap_path)!r}) lives in host memory and cannot "
                f"be on {self.device}: keep the store on the CPU (device='cpu'); gather/scatter then move each "
                "batch's window to and from the training device."
            )
        if indices is None:
            self.indices = None
            self._row = None
            n_rows = num_samples
        else:
            self.indices = torch.as_tensor(indices, dtype=torch.long).sort().values.to(self.device)
            n_rows = len(self.indices)
            # global index -> row of this store; n_rows (out of range) where another rank owns the
            # index, so a stray index fails loudly in gather/scatter instead of wrapping like -1 would
            self._row = torch.full((num_samples,), n_rows, dtype=torch.long, device=self.device)
            self._row[self.indices] = torch.arange(n_rows, device=self.device)
        shape = (n_rows, channels, self.storage_size, self.storage_size)
        if self.memmap_path is None:
            self.delta = torch.empty(shape, dtype=torch_dtype, device=self.device)
        else:
            self.delta = _map_file(self.memmap_path, shape, torch_dtype)
        self.grad_sq_ema = torch.zeros(n_rows, dtype=torch.float32, device=self.device)
        if draw:  # draw=False: zeros, for a store about to be loaded (no RNG drawn: resumes stay exact)
            self.reset_delta()
        else:
            self.delta.zero_()

    # -- bookkeeping ---------------------------------------------------------------------
    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        """Dataset indices -> rows of this store (identity when it owns every index)."""
        idx = idx.to(self.device)
        return idx if self._row is None else self._row[idx]

    def owns(self, idx: torch.Tensor) -> bool:
        """Whether every index is held here (a sync point: for checks, not the hot path)."""
        if self._row is None or self.indices is None:
            return True
        return bool((self.rows(idx) < len(self.indices)).all())

    @property
    def nbytes(self) -> int:
        """Bytes held by delta (in RAM, on the GPU or in the memmap file) and grad_sq_ema."""
        return self.delta.numel() * self.delta.element_size() + self.grad_sq_ema.numel() * 4

    @staticmethod
    def estimate_bytes(
        num_samples: int, frame_shape: tuple[int, int, int], dtype: str = "float32", storage_size: int | None = None
    ) -> int:
        """What `PerSampleStore(num_samples, frame_shape, ..., dtype=, storage_size=)` will hold:
        delta (num_samples x C x S x S of dtype, S = storage_size or the frame side) + fp32 v."""
        channels, frame_h, _ = frame_shape
        side = storage_size or frame_h
        return num_samples * channels * side * side * _check_dtype(dtype).itemsize + num_samples * 4

    def reset_delta(self, generator: torch.Generator | None = None) -> None:
        """delta ~ U(-eps, eps) (init, and the official reset every 10 epochs). v is kept."""
        if self.quant_step is None and self.memmap_path is None:
            noise = torch.rand(self.delta.shape, generator=generator, device=self.device, dtype=torch.float32)
            self.delta.copy_((noise * 2 - 1) * self.eps)
            return
        # int8 / memmap: row chunks, so the float32 noise never takes 4x the store (or all of RAM).
        for start, stop in self._row_chunks():
            noise = torch.rand(
                (stop - start, *self.delta.shape[1:]), generator=generator, device=self.device, dtype=torch.float32
            )
            self.delta[start:stop] = self._encode((noise * 2 - 1) * self.eps)

    # -- storage encoding: float32 values <-> the stored dtype ------------------------------
    def _encode(self, values: torch.Tensor) -> torch.Tensor:
        """float perturbation -> stored dtype. int8: nearest of the 255 levels q * eps/127."""
        if self.quant_step is None:
            return values.to(self.delta.dtype)
        return (values * (1.0 / self.quant_step)).round_().clamp_(-INT8_LEVELS, INT8_LEVELS).to(torch.int8)

    def _decode(self, stored: torch.Tensor) -> torch.Tensor:
        """stored dtype -> float32 perturbation."""
        return stored.float() if self.quant_step is None else stored.float().mul_(self.quant_step)

    def _row_chunks(self):
        row_bytes = max(1, math.prod(self.delta.shape[1:]) * 4)
        step = max(1, _CHUNK_BYTES // row_bytes)
        for start in range(0, len(self.delta), step):
            yield start, min(start + step, len(self.delta))

    def _local(self, cf: CropFlip) -> CropFlip:
        """The crop/flip on the store's device (differs for a CPU/memmap store of a GPU run)."""
        if cf.top.device == self.device:
            return cf
        return CropFlip(cf.top.to(self.device), cf.left.to(self.device), cf.flip.to(self.device), cf.size, cf.frame)

    # -- the two doors -------------------------------------------------------------------
    def gather_delta(self, idx: torch.Tensor, cf: CropFlip) -> torch.Tensor:
        """The stored prior of samples idx, cropped/flipped like their images; float32 [B,C,H,W]
        on the device of `cf` (the training device)."""
        device, rows = cf.top.device, self.rows(idx)
        if self.storage_size == self.frame:
            # Crop straight out of storage: only the window is read, moved (in the stored dtype,
            # when the store is on another device) and dequantised.
            window = self.delta[self._local(cf).index(rows)].to(device)
            return self._decode(window.permute(0, 3, 1, 2))
        return crop(self._to_frame(self._decode(self.delta[rows].to(device))), cf)

    def scatter_delta(self, idx: torch.Tensor, cf: CropFlip, delta_window: torch.Tensor) -> None:
        """Write the new perturbation (x_adv - x, [B,C,H,W]) into each sample's crop window."""
        rows = self.rows(idx)
        if self.storage_size == self.frame:
            uncrop_into(self.delta, rows, self._encode(delta_window).to(self.device), self._local(cf))
            return
        frames = self._to_frame(self._decode(self.delta[rows].to(delta_window.device)))
        uncrop_into(frames, torch.arange(len(rows), device=frames.device), delta_window, cf)
        stored = F.interpolate(frames, size=(self.storage_size,) * 2, mode="area")
        self.delta[rows] = self._encode(stored.clamp_(-self.eps, self.eps)).to(self.device)

    def gather_grad_sq_ema(self, idx: torch.Tensor) -> torch.Tensor:
        return self.grad_sq_ema[self.rows(idx)].to(idx.device)

    def scatter_grad_sq_ema(self, idx: torch.Tensor, value: torch.Tensor) -> None:
        self.grad_sq_ema[self.rows(idx)] = value.float().to(self.device)

    def _to_frame(self, stored: torch.Tensor) -> torch.Tensor:
        return F.interpolate(stored.float(), size=(self.frame,) * 2, mode="bilinear", align_corners=False)

    # -- persistence ---------------------------------------------------------------------
    def state_dict(self) -> dict:
        state = {
            "delta": self.delta,
            "grad_sq_ema": self.grad_sq_ema,
            "meta": torch.tensor([self.num_samples, self.frame, self.storage_size]),
        }
        if self.indices is not None:
            state["indices"] = self.indices
        if self.quant_step is not None:
            state["int8_step"] = torch.tensor(self.quant_step, dtype=torch.float64)
        return state

    def load_state_dict(self, state: dict) -> None:
        meta = [int(v) for v in state["meta"]]
        if meta != [self.num_samples, self.frame, self.storage_size]:
            raise ValueError(
                f"per-sample store mismatch: the checkpoint holds (samples, frame, storage) = {meta}, "
                f"this run has {[self.num_samples, self.frame, self.storage_size]}. The checkpoint "
                "was made on another dataset size or augmentation frame; resume with the config it was "
                "made with (it is saved in the run folder as config.yaml)."
            )
        theirs = state.get("indices")
        if (theirs is None) != (self.indices is None) or (
            theirs is not None and self.indices is not None and not torch.equal(theirs.to(self.device), self.indices)
        ):
            raise ValueError(
                "per-sample store shard mismatch: the checkpoint's rows belong to another "
                "partition of the dataset (different world size or rank). Resume with the "
                "world size the run was started with."
            )
        if tuple(state["delta"].shape) != tuple(self.delta.shape):
            raise ValueError(
                f"per-sample store shape mismatch: {tuple(state['delta'].shape)} vs {tuple(self.delta.shape)}"
            )
        source = state["delta"]
        source_step = float(state.get("int8_step", self.eps / INT8_LEVELS)) if source.dtype == torch.int8 else None
        if source.dtype == self.delta.dtype and source_step == self.quant_step:
            self.delta.copy_(source.to(self.device))
        else:  # another store dtype (or int8 step): through float32, a chunk of rows at a time
            for start, stop in self._row_chunks():
                values = source[start:stop].to(self.device).float()
                self.delta[start:stop] = self._encode(values if source_step is None else values * source_step)
        self.grad_sq_ema.copy_(state["grad_sq_ema"].to(self.device))

    def __repr__(self) -> str:
        shape = "x".join(str(d) for d in self.delta.shape[1:])
        where = f"memmap {self.memmap_path}" if self.memmap_path is not None else str(self.device)
        return (
            f"PerSampleStore({len(self.delta)} rows of {shape} {self.dtype_name}, {self.nbytes / 1e9:.3f} GB, {where})"
        )


def _map_file(path: Path, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A tensor whose storage is `path` (created or overwritten, sized to fit), shared-mapped so
    every write goes to the file and the OS pages rows in and out as training touches them."""
    from atas.checkpoint import check_own_file

    numel = math.prod(shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    check_own_file(path)  # never through a link (it would overwrite the link's target) or into a device
    flags = os.O_RDWR | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0)
    with os.fdopen(os.open(path, flags, 0o644), "wb") as f:  # a sparse file of the right size; reset_delta fills it
        f.truncate(numel * dtype.itemsize)
    return torch.from_file(str(path), shared=True, size=numel, dtype=dtype).view(shape)
