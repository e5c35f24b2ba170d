"""DATASET.GPU_DECODE: batched decode_jpeg + crop/resize/flip/normalise as tensor ops, run here with device cpu."""

from __future__ import annotations

import itertools
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_imagenet_cli import KD, _overrides, _run_dir
from test_imagenet_data import WNIDS, imagenet_cfg, write_imagenet
from torchvision.transforms import functional as TF

from mdistiller.dataset import get_dataset
from mdistiller.dataset.imagenet import (
    DECODE_ON_CPU_ENV,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageNetFolder,
    ImageNetJpegFolder,
    imagenet_train_transform,
)
from mdistiller.dataset.jpeg_decode import (
    collate_encoded,
    decode_batch,
    decode_images,
    draw_crop,
    read_encoded,
    transform_batch,
)
from mdistiller.errors import MdistillerError

from conftest import run_tool

# One uint8 grey level after normalisation (the largest 1/std): PIL's and torch's antialiased bilinear resizes round
# a few pixels differently by one level; the decoders agree exactly on the CPU (both libjpeg-turbo).
ONE_LEVEL = 1 / 255 / min(IMAGENET_STD) + 1e-4


def _photo(width: int = 120, height: int = 90, seed: int = 0) -> np.ndarray:
    """Smooth gradients plus noise: edges and texture, so a crop or resize error shows."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 5 % 256, (yy * 3 + 40) % 256, (xx + yy) % 256], -1).astype(float)
    return np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)


def _reference(path: str, box: tuple, flip: bool, size: int) -> torch.Tensor:
    """The PIL path for a fixed box and flip: resized_crop + flip + ToTensor + Normalize."""
    image = TF.resized_crop(Image.open(path).convert("RGB"), *box, [size, size], antialias=True)
    image = TF.hflip(image) if flip else image
    return TF.normalize(TF.to_tensor(image), IMAGENET_MEAN, IMAGENET_STD)


@pytest.fixture
def decode_on_cpu(monkeypatch):
    monkeypatch.setenv(DECODE_ON_CPU_ENV, "1")


@pytest.fixture
def root(tmp_path) -> str:
    return write_imagenet(str(tmp_path), n_train=4, n_val=1, size=48)


def _train_file(root: str, c: int, i: int) -> str:
    return os.path.join(root, "imagenet", "train", WNIDS[c], f"{WNIDS[c]}_{i}.JPEG")


def test_fixed_box_and_flip_match_the_pil_path_within_one_grey_level(tmp_path):
    path = str(tmp_path / "photo.JPEG")
    Image.fromarray(_photo()).save(path, quality=90)
    data, header = read_encoded(path)
    assert data.dim() == 1 and header.size == (120, 90)  # encoded bytes: the workers decode nothing
    (image,) = decode_images([data], "cpu")
    assert torch.equal(image.permute(1, 2, 0), torch.from_numpy(np.array(Image.open(path).convert("RGB"))))
    cases = [((5, 10, 70, 90), False, 32), ((20, 30, 25, 40), True, 48), ((0, 0, 90, 120), True, 24)]
    for (box, flip, size), uint8_resize in itertools.product(cases, (True, False)):  # False: CUDA's float resize
        out = transform_batch([image], torch.tensor([box]), torch.tensor([flip]), size, IMAGENET_MEAN, IMAGENET_STD,
                              uint8_resize)
        diff = (out[0] - _reference(path, box, flip, size)).abs()
        assert out.shape == (1, 3, size, size) and out.dtype == torch.float32
        assert diff.max() <= ONE_LEVEL and diff.mean() < 0.005, (box, float(diff.max()), float(diff.mean()))


def test_boxes_and_flips_are_random_resized_crops_drawn_like_the_pil_path():
    torch.manual_seed(0)
    header = Image.new("L", (500, 375))
    draws = [draw_crop(header) for _ in range(3000)]
    boxes = torch.stack([box for box, _ in draws]).double()
    area = boxes[:, 2] * boxes[:, 3] / (500 * 375)
    aspect = boxes[:, 3] / boxes[:, 2]
    assert area.min() >= 0.08 - 0.01 and area.max() <= 1.0 and aspect.min() > 0.7 and aspect.max() < 1.4
    assert 0.45 < sum(flip for _, flip in draws) / len(draws) < 0.55
    # the PIL view's own RandomResizedCrop, drawn from another seed: the same distribution
    crop = imagenet_train_transform(IMAGENET_MEAN, IMAGENET_STD, 32).transforms[0]
    torch.manual_seed(1)
    ref = torch.tensor([crop.get_params(header, crop.scale, crop.ratio) for _ in range(3000)]).double()
    ref_area = ref[:, 2] * ref[:, 3] / (500 * 375)
    assert abs(float(area.mean() - ref_area.mean())) < 0.02 and abs(float(area.std() - ref_area.std())) < 0.02
    assert bool((boxes[:, 0] + boxes[:, 2] <= 375).all() and (boxes[:, 1] + boxes[:, 3] <= 500).all())


def test_items_replay_the_pil_paths_crops_from_the_same_seed(root):
    """Same torch seed -> the same box and flip as RandomResizedCrop + RandomHorizontalFlip: resume replay holds."""
    folder = os.path.join(root, "imagenet", "train")
    pil_set = ImageNetFolder(folder, {"image": imagenet_train_transform(IMAGENET_MEAN, IMAGENET_STD, 32)})
    jpeg_set = ImageNetJpegFolder(folder, 32, "cpu")
    for index in range(6):
        torch.manual_seed(index)
        expected = pil_set[index]["image"]
        torch.manual_seed(index)
        item = jpeg_set[index]
        batch = decode_batch(collate_encoded([item]), "cpu", 32, IMAGENET_MEAN, IMAGENET_STD, None)
        assert (batch["image"][0] - expected).abs().max() <= ONE_LEVEL


def test_cmyk_and_png_named_jpeg_are_decoded_by_pil_in_the_worker(root):
    cmyk, png, grey = _train_file(root, 0, 0), _train_file(root, 0, 1), _train_file(root, 0, 2)
    Image.fromarray(_photo(48, 48)).convert("CMYK").save(cmyk, "JPEG", quality=90)
    Image.fromarray(_photo(48, 48, seed=1)).save(png, "PNG")
    Image.fromarray(_photo(48, 48, seed=2)).convert("L").save(grey, "JPEG", quality=90)
    assert [read_encoded(p)[0].dim() for p in (cmyk, png, grey)] == [3, 3, 1]  # grey JPEGs stay on the device path
    folder = os.path.join(root, "imagenet", "train")
    pil_set = ImageNetFolder(folder, {"image": imagenet_train_transform(IMAGENET_MEAN, IMAGENET_STD, 32)})
    jpeg_set = ImageNetJpegFolder(folder, 32, "cpu")
    for index in range(3):  # the three files above, in sorted order
        assert jpeg_set.samples[index][0] in (cmyk, png, grey)
        torch.manual_seed(index)
        expected = pil_set[index]["image"]
        torch.manual_seed(index)
        batch = decode_batch(collate_encoded([jpeg_set[index]]), "cpu", 32, IMAGENET_MEAN, IMAGENET_STD, None)
        assert (batch["image"][0] - expected).abs().max() <= ONE_LEVEL


def _gpu_decode_cfg(root: str, batch: int = 4, workers: int = 0):
    cfg = imagenet_cfg(root, batch=batch)
    cfg.DATASET.GPU_DECODE = True
    cfg.DATASET.NUM_WORKERS = workers
    return cfg


@pytest.mark.parametrize("workers", [0, 1])
def test_loader_yields_the_standard_batch_dict_and_is_seeded(root, decode_on_cpu, workers, capsys):
    cfg = _gpu_decode_cfg(root, workers=workers)
    runs = []
    for _ in range(2):
        torch.manual_seed(0)  # with no workers the draws come from the main process's RNG, as on the PIL path
        train_loader, _, num_train, _ = get_dataset(cfg, seed=3, device=torch.device("cpu"))
        assert isinstance(train_loader.dataset, ImageNetJpegFolder)
        runs.append(list(train_loader))
    assert "training JPEGs decoded on cpu, batched" in capsys.readouterr().out
    batches = runs[0]
    assert all(set(b) == {"image", "target", "index"} for b in batches)
    assert batches[0]["image"].shape == (4, 3, 32, 32) and batches[0]["target"].dtype == torch.long
    assert sorted(torch.cat([b["index"] for b in batches]).tolist()) == list(range(num_train))
    assert all(torch.equal(a["image"], b["image"]) and torch.equal(a["index"], b["index"])
               for a, b in zip(*runs))


def _truncate(path: str) -> None:
    """A JPEG whose header parses (so the worker passes it on) but whose data ends early: the decoder fails."""
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: len(data) // 2])


def test_a_file_no_decoder_reads_is_named_in_one_line(root, decode_on_cpu):
    bad = _train_file(root, 1, 0)
    _truncate(bad)
    train_loader, _, _, _ = get_dataset(_gpu_decode_cfg(root), seed=0, device=torch.device("cpu"))
    with pytest.raises(MdistillerError) as info:
        list(train_loader)
    message = str(info.value)
    assert message.startswith(f"unreadable image {bad} (RuntimeError: ") and "\n" not in message
    assert "DATASET.SKIP_BAD_IMAGES True" in message and ".cpp" not in message


def test_skip_bad_images_drops_undecodable_and_replaces_unopenable_files(root, decode_on_cpu, capsys):
    truncated, garbage = _train_file(root, 1, 0), _train_file(root, 2, 0)
    _truncate(truncated)
    Path(garbage).write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")  # PIL cannot even read a header: worker
    cfg = _gpu_decode_cfg(root)
    cfg.DATASET.SKIP_BAD_IMAGES = True
    train_loader, _, num_train, _ = get_dataset(cfg, seed=0, device=torch.device("cpu"))
    batches = list(train_loader)
    # the worker replaces the unopenable file by the next one; the main process drops the undecodable one
    assert sum(len(b["target"]) for b in batches) == num_train - 1
    assert train_loader.skipped_images == 2 and set(train_loader.skipped_files) == {truncated, garbage}
    err = capsys.readouterr().err  # fallbacks: warnings
    assert f"dropped unreadable image {truncated}" in err and "skipped 1 unreadable image(s)" in err


def test_unopenable_file_error_matches_the_pil_path(root, decode_on_cpu):
    bad = _train_file(root, 1, 0)
    Path(bad).write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
    train_loader, _, _, _ = get_dataset(_gpu_decode_cfg(root), seed=0, device=torch.device("cpu"))
    with pytest.raises(MdistillerError, match=re.escape(f"unreadable image {bad} (OSError: ")):  # header parse
        list(train_loader)


@pytest.mark.parametrize("views, device, why", [
    ({"image": "standard"}, "cpu", "the device is cpu, not CUDA"),
    ({"image": "standard"}, None, "the device is not given, not CUDA"),
    ({"image_weak": "standard", "image_strong": "strong"}, "cpu", "are not the standard view alone"),
])
def test_gpu_decode_falls_back_to_pil_with_the_reason(root, views, device, why, capsys):
    train_loader, _, _, _ = get_dataset(_gpu_decode_cfg(root), views, seed=0, device=device)
    assert type(train_loader.dataset) is ImageNetFolder
    out = capsys.readouterr().out
    assert "DATASET.GPU_DECODE: decoding with PIL in the workers instead: " in out and why in out
    assert set(next(iter(train_loader))) == {*views, "target", "index"}


@pytest.mark.slow
def test_cli_trains_an_epoch_through_the_decode_path(tmp_path, root, monkeypatch):
    monkeypatch.setenv(DECODE_ON_CPU_ENV, "1")  # the subprocess inherits it
    torch.manual_seed(0)
    teacher = tmp_path / "resnet18.pth"
    import torchvision

    torch.save(torchvision.models.resnet18(num_classes=3).state_dict(), teacher)
    result = run_tool("train.py", "--cfg", KD, *_overrides(tmp_path, root), "DISTILLER.TEACHER_CKPT", str(teacher),
                      "DATASET.GPU_DECODE", "True", "SOLVER.BATCH_SIZE", "4")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "training JPEGs decoded on cpu, batched" in result.stdout
    worklog = (_run_dir(tmp_path) / "worklog.txt").read_text()
    assert re.search(r"^loss_kd: [\d.]+$", worklog, re.M) and re.search(r"^test_acc: [\d.]+$", worklog, re.M)
