"""Any map-style Dataset as (x, y, idx): the dataset index is what keys a sample's stored state.

ATAS (and FGSM-PGI) keep per training sample a prior perturbation, in the sample's pixel frame.
A random crop or flip must therefore be applied to the image and to its prior alike: atas does
that on the device (`augment=atas.RandomCropFlip(...)`). A random spatial transform inside the
Dataset (torchvision's RandomCrop, RandomHorizontalFlip, ...) happens where atas cannot see it, so
the prior would be added to other pixels than those it was made for. `IndexedDataset` refuses such
a dataset and says what to do; `allow_random_transforms=True` accepts it as an approximation
(the prior then follows the sample but not its pixels: the official code's ImageNet path, whose
prior is never updated, is no better; an unaligned prior is also what FGSM-PGI's momentum is).
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

# torchvision transforms (v1 and v2 share these names) that move pixels at random.
RANDOM_SPATIAL = {
    "RandomCrop",
    "RandomResizedCrop",
    "RandomHorizontalFlip",
    "RandomVerticalFlip",
    "RandomAffine",
    "RandomRotation",
    "RandomPerspective",
    "RandomIoUCrop",
    "RandomZoomOut",
    "ElasticTransform",
    "RandomShortestSize",
    "RandomResize",
    "ScaleJitter",
    "TrivialAugmentWide",
    "RandAugment",
    "AutoAugment",
    "AugMix",
}


def random_spatial_transforms(dataset) -> list[str]:
    """Names of the random spatial transforms a (possibly wrapped) dataset applies to its images."""
    found, seen = [], set()

    def walk(t):
        if t is None or id(t) in seen:
            return
        seen.add(id(t))
        if type(t).__name__ in RANDOM_SPATIAL:
            found.append(type(t).__name__)
        for child in getattr(t, "transforms", None) or []:  # Compose, RandomApply, RandomChoice, v2
            walk(child)

    # Walk every dataset under this one: Subset / IndexedDataset / wrappers (.dataset), and
    # ConcatDataset / ChainDataset (.datasets), nested to any depth.
    pending, visited = [dataset], set()
    while pending:
        node = pending.pop()
        if node is None or id(node) in visited:
            continue
        visited.add(id(node))
        walk(getattr(node, "transform", None))
        walk(getattr(node, "transforms", None))
        pending.append(getattr(node, "dataset", None))
        children = getattr(node, "datasets", None)
        if isinstance(children, (list, tuple)):
            pending.extend(children)
    return found


class IndexedDataset(Dataset):
    """`IndexedDataset(ds)[i] == (x, y, i)` for any map-style dataset whose items start with (x, y).

    Raises if the dataset applies random spatial transforms that atas cannot pair with the stored
    prior (see the module docstring), unless allow_random_transforms=True.
    """

    def __init__(self, dataset, allow_random_transforms: bool = False):
        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise TypeError(
                f"IndexedDataset needs a map-style dataset (with __getitem__ and __len__), got {type(dataset).__name__}"
            )
        found = random_spatial_transforms(dataset)
        if found and not allow_random_transforms:
            raise ValueError(
                f"the dataset's transform applies {', '.join(sorted(set(found)))} at random, where atas cannot see "
                "it: the per-sample prior of ATAS would land on other pixels than it was made for. Remove those "
                "transforms and pass augment=atas.RandomCropFlip(pad=4) to the method (the same crop/flip on image "
                "and prior, on the device), or pass IndexedDataset(ds, allow_random_transforms=True) to accept "
                "an unaligned prior (an approximation; see the docs page 'Use ATAS in your own code')."
            )
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        item = self.dataset[i]
        if not isinstance(item, (tuple, list)) or len(item) < 2:
            raise ValueError(f"dataset[{i}] must return (x, y, ...), got {type(item).__name__}")
        return item[0], item[1], torch.tensor(i, dtype=torch.long)
