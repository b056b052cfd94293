"""Paired crop + flip: one random crop/flip per sample, applied to the image AND its stored prior.

ATAS keeps each sample's perturbation in the *frame* the random crop is taken from (CIFAR: the
32x32 image zero-padded to 40x40; ImageNet: the image resized to 256x256). A training step crops
the same window out of the padded image and out of the stored prior, and afterwards writes the
new perturbation back into exactly that window. The official code does this with three
per-sample Python loops per step (defect 3); here the crop/flip parameters are tensors and each
direction is a single advanced-indexing gather or scatter over the whole batch.

Indexing convention: `frame[b, :, rows[b, h], cols[b, w]]` is pixel (h, w) of sample b's crop.
A horizontal flip is a reversed column index, so the same (rows, cols) pair serves the gather
and the inverse scatter: the inverse of a crop+flip is writing back through the same indices.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class CropFlip:
    """Per-sample crop offsets and flips for a batch; `size` is the crop side, `frame` the source side."""

    top: torch.Tensor  # [B] int64
    left: torch.Tensor  # [B] int64
    flip: torch.Tensor  # [B] bool
    size: int
    frame: int

    @property
    def rows(self) -> torch.Tensor:
        """[B, size] frame row of every crop row."""
        return self.top[:, None] + torch.arange(self.size, device=self.top.device)

    @property
    def cols(self) -> torch.Tensor:
        """[B, size] frame column of every crop column (reversed where flipped)."""
        ar = torch.arange(self.size, device=self.left.device)
        return self.left[:, None] + torch.where(self.flip[:, None], self.size - 1 - ar, ar)

    def index(self, batch_index: torch.Tensor | None = None):
        """Advanced index (b, :, r, c) selecting every crop window; b defaults to 0..B-1."""
        b = torch.arange(len(self.top), device=self.top.device) if batch_index is None else batch_index
        return b[:, None, None], slice(None), self.rows[:, :, None], self.cols[:, None, :]


def sample_crop_flip(
    batch: int, frame: int, size: int, flip: bool, device: torch.device | str, generator: torch.Generator | None = None
) -> CropFlip:
    """Offsets uniform in {0..frame-size} (both ends included, as RandomCrop), flip with p=0.5."""
    if size > frame:
        raise ValueError(f"crop size {size} exceeds frame size {frame}")
    # Drawn where they are used (the training device's RNG): no host-to-device copy per step.
    gen_device = generator.device if generator is not None else device
    top = torch.randint(0, frame - size + 1, (batch,), generator=generator, device=gen_device)
    left = torch.randint(0, frame - size + 1, (batch,), generator=generator, device=gen_device)
    if flip:
        flips = torch.rand(batch, generator=generator, device=gen_device) < 0.5
    else:
        flips = torch.zeros(batch, dtype=torch.bool, device=gen_device)
    return CropFlip(top.to(device), left.to(device), flips.to(device), size, frame)


def crop(frames: torch.Tensor, cf: CropFlip) -> torch.Tensor:
    """[B, C, F, F] -> [B, C, size, size]: one gather for the whole batch."""
    # Advanced indices separated by a slice put the broadcast dims first: [B, size, size, C].
    return frames[cf.index()].permute(0, 3, 1, 2).contiguous()


def uncrop_into(frames: torch.Tensor, rows: torch.Tensor, window: torch.Tensor, cf: CropFlip) -> None:
    """Inverse of `crop`: write window[b] into frames[rows[b]] at sample b's crop, in place.

    Only the crop window of each listed row is touched; flipped samples are flipped back by the
    reversed column index. `rows` are the rows of `frames` (e.g. store rows) for the batch."""
    frames[cf.index(rows)] = window.permute(0, 2, 3, 1).to(frames.dtype)


def pad_to_frame(x: torch.Tensor, pad: int) -> torch.Tensor:
    """Zero padding, as torchvision's Pad/RandomCrop(padding=...) used by the official code."""
    return F.pad(x, (pad, pad, pad, pad)) if pad else x


class PairedAugment:
    """Draws a crop+flip per sample and applies it to images (and, through the store, to priors).

    frame: side of the source frame (image + 2*pad, or the resize size for ImageNet).
    size:  side of the training crop fed to the model (None: the side of the images it is given,
           bound at the first batch by `bind`).
    pad:   zero padding applied on the device to make the frame (0 when the loader already
           delivers frame-sized images, as for ImageNet's Resize((256, 256))).
    """

    def __init__(
        self, size: int | None = None, pad: int = 0, frame: int | None = None, flip: bool = True, enabled: bool = True
    ):
        if pad < 0 or (size is not None and size < 1):
            raise ValueError(f"need pad >= 0 and size >= 1, got pad={pad}, size={size}")
        self.size, self.pad, self.flip, self._frame, self._enabled = size, pad, flip, frame, enabled

    @property
    def bound_size(self) -> int:
        """The crop size; RuntimeError while it is still open (before `bind`)."""
        if self.size is None:
            raise RuntimeError("the crop size is not known yet: bind(image_size) first")
        return self.size

    @property
    def frame(self) -> int:
        return self._frame if self._frame is not None else self.bound_size + 2 * self.pad

    @property
    def enabled(self) -> bool:
        return self._enabled and (self.frame > self.bound_size or self.flip)

    def bind(self, image_size: int) -> PairedAugment:
        """Fix the crop size to the images' side when it was left open (a no-op once set)."""
        if self.size is None:
            self.size = image_size
        return self

    def __repr__(self) -> str:
        size = "" if self.size is None else f", size={self.size}"
        frame = "" if self._frame is None else f", frame={self._frame}"
        return f"{type(self).__name__}(pad={self.pad}, flip={self.flip}{size}{frame})"

    def sample(self, batch: int, device, generator: torch.Generator | None = None) -> CropFlip:
        if not self.enabled:  # identity crop: offsets 0, no flip
            zeros = torch.zeros(batch, dtype=torch.long, device=device)
            return CropFlip(
                zeros, zeros, torch.zeros(batch, dtype=torch.bool, device=device), self.bound_size, self.frame
            )
        return sample_crop_flip(batch, self.frame, self.bound_size, self.flip, device, generator)

    def __call__(self, x: torch.Tensor, cf: CropFlip) -> torch.Tensor:
        frames = pad_to_frame(x, self.pad)
        if tuple(frames.shape[-2:]) != (self.frame, self.frame):
            # Cropping it anyway would silently train on (and store priors for) other pixels.
            raise ValueError(
                f"this batch's images are {x.shape[-2]}x{x.shape[-1]}, but {self!r} was bound to "
                f"{self.size}x{self.size} images (a {self.frame}x{self.frame} frame after padding) by "
                "the run's first batch: every batch of a run must have the image size it started "
                "with. Resize the images in the Dataset, or use a new method object per image size."
            )
        if not self.enabled and frames.shape[-1] == self.size:
            return frames
        return crop(frames, cf)


class RandomCropFlip(PairedAugment):
    """atas's training augmentation for your own loop: zero-pad by `pad`, take a random crop of the
    image's size (or `size`) and flip horizontally with p=0.5, drawn per sample on the device, and
    the SAME window applied to the sample's stored prior (the official ATAS pairing).

        atk = atas.ATAS(eps=8/255, num_samples=50000, augment=atas.RandomCropFlip(pad=4))   # CIFAR

    frame: the side of the images the loader delivers when they are larger than the crop (ImageNet:
    frame=256 with size=224 and pad=0).
    """

    def __init__(self, pad: int = 4, flip: bool = True, size: int | None = None, frame: int | None = None):
        super().__init__(size=size, pad=pad, frame=frame, flip=flip)
