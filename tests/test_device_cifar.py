"""Device-resident CIFAR path: the same augmentation as the PIL path, seeded, one pass per epoch (run on CPU here)."""

from __future__ import annotations

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from mdistiller.dataset.cifar import CIFAR_FORMATS
from mdistiller.dataset.device_cifar import DeviceCifarLoader, normalize_uint8, random_crop_flip

FMT = CIFAR_FORMATS["cifar100"]


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def test_crop_and_flip_equal_torchvisions_pil_ops_at_the_drawn_offsets():
    images = _images(16)
    generator = torch.Generator().manual_seed(0)
    batch = torch.as_tensor(images).permute(0, 3, 1, 2)
    crops, offsets, flips = random_crop_flip(batch, generator)
    mean = torch.tensor(FMT.mean).view(1, 3, 1, 1)
    std = torch.tensor(FMT.std).view(1, 3, 1, 1)
    ours = normalize_uint8(crops, mean, std)
    assert flips.any() and (~flips).any()
    for i in range(len(images)):
        pil = TF.pad(Image.fromarray(images[i]), 4)  # torchvision RandomCrop's zero padding
        pil = TF.crop(pil, int(offsets[i, 0]), int(offsets[i, 1]), 32, 32)
        if flips[i]:
            pil = TF.hflip(pil)
        reference = TF.normalize(TF.to_tensor(pil), FMT.mean, FMT.std)
        torch.testing.assert_close(ours[i], reference, rtol=0, atol=1e-6)


def test_offsets_uniform_over_nine_positions_and_fair_flips():
    generator = torch.Generator().manual_seed(1)
    batch = torch.zeros(20000, 3, 32, 32, dtype=torch.uint8)
    _, offsets, flips = random_crop_flip(batch, generator)
    for axis in range(2):
        frequencies = torch.bincount(offsets[:, axis], minlength=9).float() / len(offsets)
        assert len(frequencies) == 9
        torch.testing.assert_close(frequencies, torch.full((9,), 1 / 9), atol=0.01, rtol=0)
    assert abs(flips.float().mean().item() - 0.5) < 0.015
    # the two offsets are drawn independently
    joint = torch.bincount(offsets[:, 0] * 9 + offsets[:, 1], minlength=81).float() / len(offsets)
    assert (joint - 1 / 81).abs().max() < 0.006


def _loader(seed: int, train: bool = True, n: int = 50, batch: int = 16) -> DeviceCifarLoader:
    labels = np.arange(n) % 10
    return DeviceCifarLoader(_images(n), labels, batch, FMT.mean, FMT.std, torch.device("cpu"), train, seed)


def test_epoch_visits_every_image_once_with_a_partial_last_batch():
    loader = _loader(0)
    batches = list(loader)
    assert len(batches) == len(loader) == 4 and len(loader.dataset) == 50
    assert [len(b["target"]) for b in batches] == [16, 16, 16, 2]
    seen = torch.cat([b["index"] for b in batches])
    assert sorted(seen.tolist()) == list(range(50))
    for b in batches:
        assert b["image"].shape[1:] == (3, 32, 32) and b["image"].dtype == torch.float32
        assert torch.equal(b["target"], b["index"] % 10)
        assert all(t.device.type == "cpu" for t in b.values())  # stays on the loader's device


def test_seeded_and_resumable_through_the_generator_state():
    first = [b["image"] for b in _loader(7)]
    again = [b["image"] for b in _loader(7)]
    other = [b["image"] for b in _loader(8)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))
    loader = _loader(3)
    list(loader)  # epoch 1
    state = loader.generator.get_state()
    epoch2 = [b["image"] for b in loader]
    resumed = _loader(99)
    resumed.generator.set_state(state)
    assert all(torch.equal(a, b["image"]) for a, b in zip(epoch2, resumed))


def test_test_loader_is_ordered_and_unaugmented():
    loader = _loader(0, train=False)
    batch = next(iter(loader))
    assert batch["index"].tolist() == list(range(16))
    expected = TF.normalize(TF.to_tensor(Image.fromarray(_images(50)[0])), FMT.mean, FMT.std)
    torch.testing.assert_close(batch["image"][0], expected, rtol=0, atol=1e-6)


def test_device_resident_path_chosen_only_on_cuda_for_the_standard_view():
    from mdistiller.dataset import uses_device_resident_data
    from mdistiller.engine.cfg import default_cfg

    cfg = default_cfg()
    standard = {"image": "standard"}
    assert uses_device_resident_data(cfg, standard, torch.device("cuda"))
    assert not uses_device_resident_data(cfg, standard, torch.device("cpu"))
    assert not uses_device_resident_data(cfg, {"image_weak": "standard", "image_strong": "strong"}, "cuda")
    cfg.DATASET.DEVICE_RESIDENT = False
    assert not uses_device_resident_data(cfg, standard, torch.device("cuda"))
