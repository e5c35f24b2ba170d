"""A short CPU run on real CIFAR-10 photographs (../shared/data) must learn: test top-1 well above chance."""

from __future__ import annotations

import io
import re
import tarfile

import numpy as np
import pytest
from PIL import Image

from cifar_files import write_cifar10
from conftest import REPO, SHARED_DATA, run_overrides, run_tool

ARCHIVE = SHARED_DATA / "cifar10-jpeg.tar.gz"
CLASSES = ["airplane", "automobile", "frog"]  # CIFAR-10 label ids 0, 1, 6
LABELS = {"airplane": 0, "automobile": 1, "frog": 6}
PER_CLASS = {"train": 700, "test": 200}

pytestmark = [pytest.mark.skipif(
    not ARCHIVE.is_file(), reason=f"real CIFAR-10 photographs not found at {ARCHIVE} (only in the project workspace)"
), pytest.mark.slow]


def _load_photos() -> dict:
    """The first PER_CLASS[split] photographs (by file name) of each class in CLASSES."""
    wanted: dict = {(split, cls): [] for split in PER_CLASS for cls in CLASSES}
    with tarfile.open(ARCHIVE, "r:gz") as tar:
        for member in tar:
            parts = member.name.split("/")
            if member.isfile() and len(parts) == 3 and (parts[0], parts[1]) in wanted:
                wanted[parts[0], parts[1]].append((parts[2], tar.extractfile(member).read()))
    out = {}
    for split, count in PER_CLASS.items():
        images, labels = [], []
        for cls in CLASSES:
            for _, data in sorted(wanted[split, cls])[:count]:
                images.append(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
                labels.append(LABELS[cls])
        out[split] = (np.stack(images), np.array(labels))
    return out


def _write_as_cifar10(root: str, photos: dict) -> None:
    """torchvision's cifar-10-batches-py layout holding only these photographs."""
    import pickle

    folder = write_cifar10(root, n_per_batch=1, n_test=1)  # creates the layout; batches are replaced below
    x, y = photos["train"]
    order = np.random.default_rng(0).permutation(len(y))
    x, y = x[order], y[order]
    for i, part in enumerate(np.array_split(np.arange(len(y)), 5)):
        rows = x[part].transpose(0, 3, 1, 2).reshape(len(part), 3072)
        with open(f"{folder}/data_batch_{i + 1}", "wb") as f:
            pickle.dump({"data": rows, "labels": y[part].tolist(), "batch_label": f"batch {i + 1}"}, f)
    xt, yt = photos["test"]
    with open(f"{folder}/test_batch", "wb") as f:
        pickle.dump({"data": xt.transpose(0, 3, 1, 2).reshape(len(yt), 3072), "labels": yt.tolist()}, f)


def test_vanilla_training_on_real_photographs_beats_chance(tmp_path):
    _write_as_cifar10(str(tmp_path / "data"), _load_photos())
    result = run_tool(
        "train.py", "--cfg", str(REPO / "configs/cifar100/vanilla/resnet8.yaml"),
        *run_overrides(tmp_path, str(tmp_path / "data")),
        "DATASET.TYPE", "cifar10", "SOLVER.EPOCHS", "4", "SOLVER.LR", "0.05", "SOLVER.LR_DECAY_STAGES", "[3]",
        "SOLVER.BATCH_SIZE", "64", "DATASET.TEST.BATCH_SIZE", "200", timeout=600,
    )
    assert result.returncode == 0, result.stderr
    best = float(re.search(r"best top-1 ([\d.]+)", result.stdout).group(1))
    assert best > 70.0, result.stdout  # chance is 33.3% on these three classes
