"""MNIST and FashionMNIST as in-memory tensors, read through torchvision's own loaders.

The experiments read the datasets with ``torchvision.datasets.MNIST`` / ``FashionMNIST`` (the real
on-disk format and checks) but then keep the whole split as one tensor instead of going through a
DataLoader with per-sample PIL transforms: on a CPU those transforms cost more than the small
models themselves. ``dataset.data / 255`` is exactly what ``ToTensor`` returns for these uint8
images, and ``(x - 0.5) / 0.5`` exactly what ``Normalize(0.5, 0.5)`` returns after it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision

REPO_ROOT = Path(__file__).resolve().parent.parent
DATASETS = {"MNIST": torchvision.datasets.MNIST, "FashionMNIST": torchvision.datasets.FashionMNIST}
RAW_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


class DatasetMissingError(FileNotFoundError):
    """The IDX files of a dataset are not where torchvision looks for them; the message says where."""


@dataclass(frozen=True)
class Split:
    """Images and labels of one split: ``images`` (N, 1, 28, 28) float32, ``labels`` (N,) int64."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return self.labels.shape[0]

    def to(self, device: torch.device) -> Split:
        return Split(self.images.to(device), self.labels.to(device))


def default_data_root() -> Path:
    """``../shared/data`` beside the repository when it exists (where these machines keep the data), else ``./data``."""
    shared = REPO_ROOT.parent / "shared" / "data"
    return shared if shared.is_dir() else Path("data")


def load(name: str, root: str | Path, *, train: bool, download: bool = False, normalize: bool = False,
         limit: int | None = None) -> Split:  # fmt: skip
    """One split of ``name`` ("MNIST" or "FashionMNIST") as tensors.

    Pixels are in [0, 1] (``ToTensor``), or in [-1, 1] with ``normalize`` (``Normalize(0.5, 0.5)``);
    ``limit`` keeps the first ``limit`` samples.

    Raises:
        DatasetMissingError: the files are not in ``root/<name>/raw`` and ``download`` is False.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of samples, got {limit}")
    try:
        dataset = DATASETS[name](root=str(root), train=train, download=download)
    except RuntimeError as exc:
        if "Dataset not found" not in str(exc):
            raise
        raw = Path(root) / name / "raw"
        raise DatasetMissingError(
            f"{name} not found: expected the IDX files {', '.join(RAW_FILES)} in {raw.resolve()}. "
            f"Put them there, point --data-root at the folder that holds {name}/raw, or pass --download."
        ) from None
    images, labels = dataset.data, dataset.targets
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    images = images.unsqueeze(1).to(torch.float32).div_(255)
    if normalize:
        images = images.sub_(0.5).div_(0.5)
    return Split(images, labels.to(torch.int64))


def random_split(split: Split, first_fraction: float, generator: torch.Generator) -> tuple[Split, Split]:
    """Splits ``split`` at random into two parts, the first holding ``round(first_fraction * len)`` samples."""
    order = torch.randperm(len(split), generator=generator)
    cut = round(first_fraction * len(split))
    first, second = order[:cut], order[cut:]
    return Split(split.images[first], split.labels[first]), Split(split.images[second], split.labels[second])
