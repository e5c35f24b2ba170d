"""The CUDA-only paths, for the first GPU machine: `pytest -m cuda` (skipped without CUDA; under 5 minutes on one GPU).

Each test compares a CUDA path with its reference: the device-resident CIFAR view with the CPU crop/flip, each speed
switch's step with the eager fp32 step, the delayed (every 20 steps) non-finite check with the step it must name,
deterministic mode with itself, GPU JPEG decoding with PIL, and the bench's CUDA rows with their definition.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mdistiller.dataset.cifar import CIFAR_FORMATS
from mdistiller.dataset.device_cifar import DeviceCifarLoader, crop_flip, draw_crop_flip, normalize_uint8
from mdistiller.distillers.registry import get_distiller_class
from mdistiller.engine.cfg import CFG
from mdistiller.engine.guards import PROGRESS_EVERY
from mdistiller.engine.trainer import Trainer
from mdistiller.errors import MdistillerError
from mdistiller.models import cifar_model_dict
from mdistiller.rng import deterministic_mode

pytestmark = pytest.mark.cuda
CUDA = torch.device("cuda")
FMT = CIFAR_FORMATS["cifar100"]


def _cfg(**solver):
    cfg = CFG.clone()
    cfg.defrost()
    for key, value in solver.items():
        setattr(cfg.SOLVER, key, value)
    return cfg


def _trainer(tmp_path, cfg, seed: int = 0, distiller_type: str = "KD", loader=()) -> Trainer:
    torch.manual_seed(seed)
    student = cifar_model_dict["resnet8"][0](num_classes=10)
    teacher = cifar_model_dict["resnet20"][0](num_classes=10)
    trainer = Trainer(str(tmp_path), get_distiller_class(distiller_type)(student, teacher, cfg), loader, [], cfg, CUDA)
    trainer.distiller.train()
    return trainer


def _batch(n: int = 32, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {"image": torch.randn(n, 3, 32, 32, generator=generator),
            "target": torch.randint(0, 10, (n,), generator=generator), "index": torch.arange(n)}


# ---- data ----
def test_device_resident_view_equals_the_cpu_crop_flip_at_the_same_draws():
    images = torch.as_tensor(np.random.default_rng(0).integers(0, 256, (64, 3, 32, 32), dtype=np.uint8))
    generator = torch.Generator(device=CUDA).manual_seed(0)
    offsets, flips = draw_crop_flip(64, generator, CUDA)
    on_gpu = crop_flip(images.to(CUDA), offsets, flips)
    on_cpu = crop_flip(images, offsets.cpu(), flips.cpu())
    assert torch.equal(on_gpu.cpu(), on_cpu)  # uint8 indexing: exact
    mean, std = torch.tensor(FMT.mean).view(1, 3, 1, 1), torch.tensor(FMT.std).view(1, 3, 1, 1)
    torch.testing.assert_close(normalize_uint8(on_gpu, mean.to(CUDA), std.to(CUDA)).cpu(),
                               normalize_uint8(on_cpu, mean, std), rtol=0, atol=1e-6)


def test_device_resident_loader_serves_every_image_once_per_epoch_on_the_gpu():
    images = np.random.default_rng(1).integers(0, 256, (100, 32, 32, 3), dtype=np.uint8)
    loader = DeviceCifarLoader(images, np.arange(100) % 10, 32, FMT.mean, FMT.std, CUDA, train=True, seed=0)
    batches = list(loader)
    assert all(b["image"].device.type == "cuda" and b["image"].dtype == torch.float32 for b in batches)
    assert sorted(torch.cat([b["index"] for b in batches]).tolist()) == list(range(100))


# ---- speed switches against the eager fp32 step ----
@pytest.mark.parametrize("switches,tolerance", [
    ({"AMP": True}, 5e-2),
    ({"CHANNELS_LAST": True}, 1e-3),
    ({"COMPILE": "default"}, 1e-3),
    ({"COMPILE": "reduce-overhead"}, 1e-3),
    ({"AMP": True, "CHANNELS_LAST": True, "COMPILE": "default"}, 5e-2),
])
def test_each_switch_trains_the_same_steps_as_eager_fp32(tmp_path, switches, tolerance):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    eager = _trainer(tmp_path / "eager", _cfg())
    fast = _trainer(tmp_path / "fast", _cfg(**switches))
    for step in range(1, 4):  # CUDA graphs record on the first calls and replay after
        batch = _batch(seed=step)
        _, reference = eager.train_step(batch, 1, step)
        _, losses = fast.train_step(batch, 1, step)
        for name in reference:
            torch.testing.assert_close(losses[name].float(), reference[name].float(), rtol=tolerance, atol=tolerance)
    torch._dynamo.reset()


# ---- the delayed non-finite check ----
def test_a_nan_is_found_at_the_next_scheduled_read_and_named_by_its_own_step(tmp_path):
    trainer = _trainer(tmp_path, _cfg())
    assert trainer.sync_every == PROGRESS_EVERY  # on CUDA the flag is read every 20 steps, not every step
    state = trainer.epoch_progress(1, 40)
    bad = _batch(seed=3)
    bad["image"][0, 0, 0, 0] = float("nan")
    with pytest.raises(MdistillerError, match=r"non-finite loss at epoch 1, step 3/40"):
        for step in range(1, PROGRESS_EVERY + 1):
            trainer.train_step(bad if step == 3 else _batch(seed=step), 1, step, state)
            assert step < PROGRESS_EVERY  # no error before the scheduled read


# ---- deterministic mode ----
def test_deterministic_mode_gives_bitwise_equal_weights(tmp_path):
    weights = []
    with deterministic_mode(True, CUDA):
        for run in range(2):
            trainer = _trainer(tmp_path / str(run), _cfg())
            for step in range(1, 4):
                trainer.train_step(_batch(seed=step), 1, step)
            weights.append({k: v.detach().cpu().clone() for k, v in trainer.distiller.student.state_dict().items()})
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


# ---- GPU JPEG decoding ----
def test_gpu_jpeg_decode_matches_pil_within_one_grey_level(tmp_path):
    from test_jpeg_decode import ONE_LEVEL, _photo, _reference

    from mdistiller.dataset.imagenet import IMAGENET_MEAN, IMAGENET_STD
    from mdistiller.dataset.jpeg_decode import decode_images, read_encoded, transform_batch

    path = str(tmp_path / "photo.JPEG")
    Image.fromarray(_photo()).save(path, quality=90)
    data, _ = read_encoded(path)
    (image,) = decode_images([data], CUDA)
    assert image.device.type == "cuda"
    for box, flip, size in [((5, 10, 70, 90), False, 32), ((20, 30, 25, 40), True, 48)]:
        out = transform_batch([image], torch.tensor([box]), torch.tensor([flip]), size, IMAGENET_MEAN, IMAGENET_STD)
        diff = (out[0].cpu() - _reference(path, box, flip, size)).abs()
        # nvJPEG's IDCT may differ from libjpeg-turbo's by a level or two on a few pixels
        assert diff.mean() < 0.01 and diff.max() <= 3 * ONE_LEVEL, (float(diff.max()), float(diff.mean()))


# ---- the bench's CUDA rows ----
def test_bench_cuda_rows_time_their_switches(tmp_path):
    from mdistiller.cli import bench

    rows = bench.main(["--tiny", "--device", "cuda", "--steps", "5", "--warmup", "2", "--data", "synthetic",
                       "--synthetic-size", "512", "--rows", "reference,ours,amp,channels_last,cuda_graphs,combined",
                       "--json", str(tmp_path / "bench.json")])
    by_name = {r["name"]: r for r in rows}
    assert by_name["ours"]["data"].startswith("GPU-resident")
    assert by_name["reference"]["data"].startswith("DataLoader")
    assert all(r["images_per_s"] > 0 and r["peak_memory_mib"] > 0 for r in rows)
    assert "bf16 autocast" in by_name["amp"]["switches"] and "reduce-overhead" in by_name["cuda_graphs"]["switches"]
