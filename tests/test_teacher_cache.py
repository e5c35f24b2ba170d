"""The teacher-output cache: view ids on both data paths, every cached row against the live teacher, training with and
without the cache step for step, identity refusals, a killed build continued byte-identically, verification, the
methods and data it refuses. A tiny zoo-registered CNN stands in for the teacher (and student) to keep builds fast."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision import transforms

from mdistiller.cli import cache_teacher as cache_tool
from mdistiller.cli import train as train_tool
from mdistiller.dataset import get_dataset, standard_train_transform
from mdistiller.dataset.cifar import CIFAR_FORMATS, read_cifar_split
from mdistiller.dataset.device_cifar import VIEWS_PER_IMAGE, DeviceCifarLoader, decode_views, encode_views
from mdistiller.dataset.teacher_views import RecordedCropFlip, data_fingerprint, pil_view, views_of
from mdistiller.distillers import Declaration, Distiller, get_distiller_class, logits_on
from mdistiller.engine import teacher_cache_build
from mdistiller.engine.build import build_distiller, build_teacher
from mdistiller.engine.cfg import default_cfg
from mdistiller.engine.teacher_cache import cache_batch_needs, cache_plan, ensure_teacher_cache, prepare_teacher_cache
from mdistiller.engine.teacher_cache_build import build_cache, open_table_file, verify_table
from mdistiller.engine.teacher_cache_identity import TABLE_FILE, read_identity, run_identity
from mdistiller.engine.trainer import Trainer
from mdistiller.engine.validate import check_recipe, validate_run
from mdistiller.errors import MdistillerError
from mdistiller.models import cifar_model_dict
from mdistiller.rng import set_seed

from cifar_files import write_cifar100
from conftest import REPO, save_teacher

FMT = CIFAR_FORMATS["cifar100"]
CPU = torch.device("cpu")


class CacheNet(nn.Module):
    """A tiny CIFAR model (two strided convs with BN, pooled, linear) returning (logits, feats) like the zoo's."""

    def __init__(self, num_classes: int = 100):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, num_classes)
        with torch.no_grad():  # eval-mode BatchNorm that is not the identity
            for bn in (self.bn1, self.bn2):
                bn.running_mean.uniform_(-0.5, 0.5)
                bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        f1 = F.relu(self.bn1(self.conv1(x)))
        f2 = F.relu(self.bn2(self.conv2(f1)))
        pooled = f2.mean((2, 3))
        return self.fc(pooled) * 4.0, {"feats": [f1, f2], "preact_feats": [f1, f2], "pooled_feat": pooled}


@pytest.fixture(scope="module", autouse=True)
def cachenet():
    """`cachenet` in the CIFAR zoo for this module only (other modules iterate over the zoo)."""
    cifar_model_dict["cachenet"] = (CacheNet, None)
    yield
    del cifar_model_dict["cachenet"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> str:
    """16 training / 16 test images of 10 classes in cifar-100-python format."""
    root = str(tmp_path_factory.mktemp("cache_data"))
    write_cifar100(root, n_train=16, n_test=16, classes_used=10)
    return root


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory) -> str:
    return save_teacher(str(tmp_path_factory.mktemp("cache_teachers") / "cachenet.pth"), "cachenet", seed=3)


def _cfg(root: str, ckpt: str, cache: str = "", method: str = "KD", **keys):
    cfg = default_cfg()
    cfg.DISTILLER.TYPE, cfg.DISTILLER.TEACHER, cfg.DISTILLER.STUDENT = method, "cachenet", "cachenet"
    cfg.DISTILLER.TEACHER_CKPT, cfg.DISTILLER.TEACHER_CACHE = ckpt, cache
    cfg.DATASET.ROOT, cfg.DATASET.NUM_WORKERS, cfg.DATASET.DOWNLOAD = root, 0, False
    cfg.SOLVER.BATCH_SIZE, cfg.SOLVER.EPOCHS = 8, 1
    for key, value in keys.items():
        node = cfg
        *parents, leaf = key.split("__")
        for part in parents:
            node = node[part]
        node[leaf] = value
    return cfg


@pytest.fixture(scope="module")
def fp32_cache(tmp_path_factory, data_root, teacher_file) -> str:
    """The fp32 cache of cachenet on the 16 images (built once for the module)."""
    path = str(tmp_path_factory.mktemp("caches") / "fp32")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: a second thread only waits
    try:
        return ensure_teacher_cache(_cfg(data_root, teacher_file, path), CPU, progress=False, verify_samples=64)
    finally:
        torch.set_num_threads(threads)


def _train_images(root: str) -> tuple[np.ndarray, np.ndarray]:
    folder = f"{root}/{FMT.folder}"
    return read_cifar_split("cifar100", folder, train=True)


def _live(teacher: nn.Module, images: np.ndarray, rows: np.ndarray) -> torch.Tensor:
    """The teacher's logits on table rows, the views made with torchvision's PIL ops (independently of the build)."""
    views = torch.stack([pil_view(images[r // VIEWS_PER_IMAGE], int(r % VIEWS_PER_IMAGE), FMT.mean, FMT.std)
                         for r in rows])
    with torch.no_grad():
        return teacher.eval()(views)[0]


# ---- the views ----
def test_view_ids_encode_each_of_the_162_crops_once():
    ids = torch.arange(VIEWS_PER_IMAGE)
    offsets, flips = decode_views(ids)
    assert torch.equal(encode_views(offsets, flips), ids)
    assert offsets.min() == 0 and offsets.max() == 8 and flips.sum() == 81
    image = torch.as_tensor(np.random.default_rng(0).integers(0, 256, (1, 3, 32, 32), dtype=np.uint8))
    mean, std = torch.tensor(FMT.mean).view(1, 3, 1, 1), torch.tensor(FMT.std).view(1, 3, 1, 1)
    views = views_of(image, ids, mean, std).flatten(1)
    assert len(torch.unique(views, dim=0)) == VIEWS_PER_IMAGE  # 162 different images


def test_dataloader_view_equals_the_standard_transform_and_its_id_indexes_it(data_root):
    from PIL import Image

    images, _ = _train_images(data_root)
    recorded, standard = RecordedCropFlip(FMT.mean, FMT.std), standard_train_transform(FMT.mean, FMT.std)
    mean, std = torch.tensor(FMT.mean).view(1, 3, 1, 1), torch.tensor(FMT.std).view(1, 3, 1, 1)
    seen = set()
    for round_ in range(2):
        torch.manual_seed(round_)
        expected = [standard(Image.fromarray(image)) for image in images]
        torch.manual_seed(round_)
        for i, image in enumerate(images):
            tensor, drawn = recorded(Image.fromarray(image))
            assert torch.equal(tensor, expected[i])  # same random draws, same ops: the same image
            row = torch.tensor([i * VIEWS_PER_IMAGE + drawn["view_id"]])
            torch.testing.assert_close(views_of(torch.as_tensor(images).permute(0, 3, 1, 2), row, mean, std)[0],
                                       tensor, rtol=0, atol=1e-6)
            seen.add(drawn["view_id"])
    assert len(seen) > 15 and any(v % 2 for v in seen) and any(v % 2 == 0 for v in seen)


def test_dataloader_batches_carry_view_ids_only_when_asked(data_root):
    cfg = _cfg(data_root, "")
    loader, *_ = get_dataset(cfg, {"image": "standard"}, seed=0, device=CPU, needs={"view_id": "image"})
    torch.manual_seed(0)  # the transforms draw from the global generator (no workers)
    batch = next(iter(loader))
    assert batch["view_id"].shape == (8,) and batch["view_id"].dtype == torch.int64
    plain, *_ = get_dataset(cfg, {"image": "standard"}, seed=0, device=CPU)
    torch.manual_seed(0)
    other = next(iter(plain))
    assert "view_id" not in other and torch.equal(other["image"], batch["image"])  # recording changes no image


def test_device_loader_view_ids_index_the_crops_it_made():
    images = np.random.default_rng(1).integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)
    loader = DeviceCifarLoader(images, np.arange(40) % 10, 16, FMT.mean, FMT.std, CPU, train=True, seed=0,
                               record_views=True)
    stored = torch.as_tensor(images).permute(0, 3, 1, 2)
    for batch in loader:
        rows = batch["index"] * VIEWS_PER_IMAGE + batch["view_id"]
        assert torch.equal(views_of(stored, rows, loader.mean, loader.std), batch["image"])
    assert "view_id" not in next(iter(DeviceCifarLoader(images, np.arange(40) % 10, 16, FMT.mean, FMT.std, CPU,
                                                        train=True, seed=0)))


# ---- the table ----
def test_every_cached_row_equals_the_live_teacher_on_its_view(fp32_cache, data_root, teacher_file, one_thread):
    identity = read_identity(fp32_cache)
    table = torch.from_numpy(np.array(open_table_file(f"{fp32_cache}/{TABLE_FILE}", identity)))
    images, _ = _train_images(data_root)
    teacher = build_teacher(_cfg(data_root, teacher_file), 100)
    rows = np.arange(table.shape[0])
    live = _live(teacher, images, rows)
    assert (table - live).abs().max().item() <= 1e-5
    per_image = table.view(16, VIEWS_PER_IMAGE, 100)
    assert (per_image - per_image[:, :1]).abs().amax((1, 2)).min() > 1e-3  # the views differ: not a vacuous test
    assert identity["verify"]["passed"] and identity["verify"]["max_abs_diff"] <= 1e-5
    assert identity["data_sha256"] == data_fingerprint(*_train_images(data_root))


def test_fp16_rows_are_the_live_logits_rounded(tmp_path, data_root, teacher_file, fp32_cache, one_thread):
    path = ensure_teacher_cache(_cfg(data_root, teacher_file, str(tmp_path / "fp16"),
                                     DISTILLER__TEACHER_CACHE_DTYPE="fp16"), CPU, progress=False, verify_samples=8)
    identity = read_identity(path)
    assert identity["dtype"] == "fp16"
    half = torch.from_numpy(np.array(open_table_file(f"{path}/{TABLE_FILE}", identity))).float()
    exact = torch.from_numpy(np.array(open_table_file(f"{fp32_cache}/{TABLE_FILE}", read_identity(fp32_cache))))
    assert ((half - exact).abs() <= exact.abs() * 2.0**-11 + 2.0**-24).all()  # fp16's round-to-nearest
    assert not torch.equal(half, exact)


def test_fp16_storage_moves_logit_losses_by_less_than_its_rounding():
    """Teacher logits of a trained CIFAR-100 teacher's range (up to ~23): fp16's rounding (2^-11 relative) moves the
    KD and DKD losses and their gradients by well under 1e-3 relative (docs/teacher_cache.md has the measurement)."""
    from mdistiller.distillers.dkd import dkd_loss
    from mdistiller.distillers.kd import kd_loss

    generator = torch.Generator().manual_seed(0)
    target = torch.randint(0, 100, (64,), generator=generator)
    confidence = torch.rand(64, 1, generator=generator) * 12 + 8
    teacher = torch.randn(64, 100, generator=generator) * 3 + F.one_hot(target, 100) * confidence
    student = (torch.randn(64, 100, generator=generator) * 2 + F.one_hot(target, 100) * 6).requires_grad_()
    rounded = teacher.half().float()
    assert 0 < (rounded - teacher).abs().max() <= teacher.abs().max() * 2.0**-11
    for loss in (lambda t: kd_loss(student, t, 4.0), lambda t: dkd_loss(student, t, target, 1.0, 8.0, 4.0)):
        exact, approx = loss(teacher), loss(rounded)
        (grad_exact,), (grad_approx,) = torch.autograd.grad(exact, student), torch.autograd.grad(approx, student)
        assert 0 < abs(exact - approx) / exact < 1e-3
        assert (grad_exact - grad_approx).norm() / grad_exact.norm() < 1e-3


def test_a_real_zoo_teacher_row_by_row(tmp_path, data_root, one_thread):
    """resnet8 on one image: its 162 views built in one batch equal their live forwards in batches of 18."""
    images, labels = _train_images(data_root)
    ckpt = save_teacher(str(tmp_path / "resnet8.pth"), "resnet8")
    cfg = _cfg(data_root, ckpt, str(tmp_path / "cache"))
    cfg.DISTILLER.TEACHER = "resnet8"
    teacher = build_teacher(cfg, 100)
    identity = run_identity(cfg, teacher, images[:1], labels[:1], CPU)
    build_cache(str(tmp_path / "cache"), teacher, images[:1], identity, CPU, verify_samples=8, progress=False)
    table = torch.from_numpy(np.array(open_table_file(str(tmp_path / "cache" / TABLE_FILE), identity)))
    live = torch.cat([_live(teacher, images, np.arange(r, r + 18)) for r in range(0, VIEWS_PER_IMAGE, 18)])
    assert (table - live).abs().max().item() <= 1e-5


# ---- training with the cache ----
METHODS = {
    "KD": {},
    "DKD": {"DKD__WARMUP": 1},
    "KD+LS": {"EXPERIMENT__LOGIT_STAND": True, "KD__TEMPERATURE": 2.0, "KD__LOSS__KD_WEIGHT": 9.0},
    "WKD-L": {"WKD__LOSS__WKD_LOGIT_WEIGHT": 1.0, "WKD__LOSS__CE_WEIGHT": 1.0},
    "KD+DOT": {"SOLVER__TRAINER": "dot"},
    "MLKD": {},  # weak view from the cache, the strong view through the live teacher
}


def _one_epoch(cfg, tmp_path, device=CPU) -> tuple[list[dict], dict, object]:
    """Per-step losses and the final student weights of one epoch, run as run.py assembles a run."""
    set_seed(0)
    distiller_class = get_distiller_class(cfg.DISTILLER.TYPE)
    loader, _, _, classes = get_dataset(cfg, distiller_class.declares.train_views, seed=0, device=device,
                                        needs=cache_batch_needs(cfg, distiller_class))
    distiller = build_distiller(cfg, classes)
    table = prepare_teacher_cache(cfg, distiller, loader, device)
    trainer = Trainer(str(tmp_path), distiller, loader, None, cfg, device, teacher_cache=table)
    trainer.distiller.train()
    state = trainer.epoch_progress(1, len(loader))
    losses = []
    for step, batch in enumerate(loader, 1):
        _, terms = trainer.train_step(batch, 1, step, state)
        losses.append({k: v.item() for k, v in terms.items()})
    return losses, {k: v.clone() for k, v in trainer.distiller.student.state_dict().items()}, trainer


@pytest.mark.parametrize("method", list(METHODS))
def test_training_with_the_cache_equals_training_with_the_live_teacher(method, fp32_cache, data_root, teacher_file,
                                                                       tmp_path, monkeypatch, one_thread):
    distiller_type = "WKD" if method == "WKD-L" else method.split("+")[0]
    live_cfg = _cfg(data_root, teacher_file, "", distiller_type, **METHODS[method])
    cached_cfg = _cfg(data_root, teacher_file, fp32_cache, distiller_type, **METHODS[method])
    check_recipe(cached_cfg)
    live_losses, live_weights, _ = _one_epoch(live_cfg, tmp_path / "live")
    distiller_class = get_distiller_class(distiller_type)
    live_views = cache_plan(cached_cfg, distiller_class)[2]
    teacher_forward, teacher_inputs = distiller_class.teacher_forward, []

    def live_teacher_only_where_not_served(self, image):
        if not live_views:
            raise AssertionError("the teacher ran although the cache serves its logits")
        teacher_inputs.append(image)
        return teacher_forward(self, image)

    monkeypatch.setattr(distiller_class, "teacher_forward", live_teacher_only_where_not_served)
    cached_losses, cached_weights, trainer = _one_epoch(cached_cfg, tmp_path / "cached")
    if live_views:  # MLKD: the teacher kept, run once per step (on the strong view)
        assert live_views == ("image_strong",) and trainer.distiller.teacher is not None
        assert len(teacher_inputs) == len(cached_losses)
    else:
        assert trainer.distiller.teacher is None  # never placed on the device
    assert len(cached_losses) == len(live_losses) == 2
    for live, cached in zip(live_losses, cached_losses):
        assert live.keys() == cached.keys()
        for key in live:
            assert abs(live[key] - cached[key]) <= 1e-5, (key, live[key], cached[key])
    for key, value in live_weights.items():
        torch.testing.assert_close(cached_weights[key], value, rtol=0, atol=1e-6)


def test_resume_crosses_between_cached_and_live_runs(fp32_cache, data_root, teacher_file, tmp_path, one_thread):
    """`latest` holds no frozen teacher (a live run's is rebuilt from its file; a cached run has none): each run
    resumes as the other, the teacher's weights those of its file."""
    _, _, live = _one_epoch(_cfg(data_root, teacher_file), tmp_path / "live")
    _, _, cached = _one_epoch(_cfg(data_root, teacher_file, fp32_cache), tmp_path / "cached")
    assert any(k.startswith("teacher.") for k in live.distiller.state_dict())
    assert not any(k.startswith("teacher.") for k in live.checkpoints.trainer_state(1)["model"])
    assert not any(k.startswith("teacher.") for k in cached.checkpoints.trainer_state(1)["model"])
    for source, target in ((live, cached), (cached, live)):
        source.checkpoints.save(source.checkpoints.trainer_state(1), "latest")
        target.run_dir = target.checkpoints.run_dir = source.run_dir
        teacher_before = {k: v.clone() for k, v in target.distiller.state_dict().items() if k.startswith("teacher.")}
        target.checkpoints.resume()
        assert target.checkpoints.start_epoch == 2
        for key, value in source.distiller.student.state_dict().items():
            assert torch.equal(target.distiller.student.state_dict()[key], value)
        after = {k: v for k, v in target.distiller.state_dict().items() if k.startswith("teacher.")}
        assert after.keys() == teacher_before.keys() and all(torch.equal(after[k], teacher_before[k]) for k in after)


def test_train_cli_auto_builds_the_cache_once_then_reuses_it(tmp_path, data_root, teacher_file, capsys, one_thread):
    root = tmp_path / "data"
    shutil.copytree(data_root, root)
    base = ["--cfg", str(REPO / "configs/cifar100/kd/resnet32x4_resnet8x4.yaml"), "DATASET.ROOT", str(root),
            "DATASET.NUM_WORKERS", "0", "LOG.PREFIX", str(tmp_path / "out"), "LOG.RESULTS_DIR", str(tmp_path / "logs"),
            "SOLVER.EPOCHS", "1", "SOLVER.BATCH_SIZE", "8", "DISTILLER.TEACHER", "cachenet", "DISTILLER.STUDENT",
            "cachenet", "DISTILLER.TEACHER_CKPT", teacher_file, "DISTILLER.TEACHER_CACHE", "auto"]
    first = train_tool.main([*base, "EXPERIMENT.NAME", "one"])
    [cache] = list((root / "teacher_cache").iterdir())
    built = read_identity(str(cache))["built"]
    second = train_tool.main([*base, "EXPERIMENT.NAME", "two"])
    assert read_identity(str(cache))["built"] == built  # found, not rebuilt
    assert first["best_acc"] == second["best_acc"]
    log = (Path(second["run_dir"]) / "log.txt").read_text()
    assert f"teacher logits from the cache {cache}" in log and "the teacher is not run" in log


def test_train_cli_mlkd_with_the_cache_keeps_the_teacher_for_its_strong_view(tmp_path, fp32_cache, data_root,
                                                                              teacher_file, one_thread):
    args = ["--cfg", str(REPO / "configs/cifar100/mlkd/resnet32x4_resnet8x4.yaml"), "DATASET.ROOT", data_root,
            "DATASET.NUM_WORKERS", "0", "LOG.PREFIX", str(tmp_path / "out"), "LOG.RESULTS_DIR", str(tmp_path / "logs"),
            "SOLVER.EPOCHS", "1", "SOLVER.BATCH_SIZE", "8", "DISTILLER.TEACHER", "cachenet", "DISTILLER.STUDENT",
            "cachenet", "DISTILLER.TEACHER_CKPT", teacher_file]
    live = train_tool.main([*args, "EXPERIMENT.NAME", "live"])
    cached = train_tool.main([*args, "EXPERIMENT.NAME", "cached", "DISTILLER.TEACHER_CACHE", fp32_cache])
    log = (Path(cached["run_dir"]) / "log.txt").read_text()
    assert f"teacher logits from the cache {fp32_cache}" in log and "the teacher runs on image_strong only" in log
    assert cached["best_acc"] == live["best_acc"]
    live_weights = torch.load(Path(live["run_dir"]) / "student_best", map_location="cpu")["model"]
    cached_weights = torch.load(Path(cached["run_dir"]) / "student_best", map_location="cpu")["model"]
    for key, value in live_weights.items():
        torch.testing.assert_close(cached_weights[key], value, rtol=0, atol=1e-6)


# ---- identity ----
def _copy_with(cache: str, tmp_path, **changes) -> str:
    copy = tmp_path / "copy"
    shutil.copytree(cache, copy)
    identity = json.loads((copy / "identity.json").read_text())
    identity.update(changes)
    (copy / "identity.json").write_text(json.dumps(identity))
    return str(copy)


def _refused(cfg, tmp_path) -> str:
    with pytest.raises(MdistillerError) as info:
        validate_run(cfg, str(tmp_path / "run"), False, CPU)
        set_seed(0)
        loader, *_ = get_dataset(cfg, {"image": "standard"}, seed=0, device=CPU, needs={"view_id": "image"})
        prepare_teacher_cache(cfg, build_distiller(cfg, 100), loader, CPU)
    assert "\n" not in str(info.value) and not (tmp_path / "run").exists()
    return str(info.value)


def test_a_cache_of_another_checkpoint_is_refused(fp32_cache, data_root, tmp_path):
    other = save_teacher(str(tmp_path / "other.pth"), "cachenet", seed=4)
    message = _refused(_cfg(data_root, other, fp32_cache), tmp_path)
    assert "built for another teacher checkpoint (sha256 of its tensors)" in message


def test_a_cache_of_other_data_is_refused(fp32_cache, teacher_file, tmp_path):
    other = str(tmp_path / "other_data")
    write_cifar100(other, n_train=16, n_test=16, classes_used=10, seed=5)
    message = _refused(_cfg(other, teacher_file, fp32_cache), tmp_path)
    assert "built for another training set (sha256 of its uint8 images and labels)" in message


@pytest.mark.parametrize("change,keys,expected", [
    ({"mean": [0.5, 0.5, 0.5]}, {}, "another normalisation mean: [0.5, 0.5, 0.5] in the cache"),
    ({"std": [0.25, 0.25, 0.25]}, {}, "another normalisation std"),
    ({}, {"DISTILLER__TEACHER_CACHE_DTYPE": "fp16"}, "another storage dtype (DISTILLER.TEACHER_CACHE_DTYPE): fp32 in "
                                                     "the cache, fp16 in this run"),
    ({}, {"SOLVER__AMP": True}, "another SOLVER.AMP (bf16 autocast of the teacher): false in the cache, true"),
    ({"view_order": "row = view * N + index"}, {}, "another view enumeration"),
])
def test_a_cache_of_other_settings_is_refused_before_any_side_effect(change, keys, expected, fp32_cache, data_root,
                                                                      teacher_file, tmp_path):
    path = _copy_with(fp32_cache, tmp_path, **change) if change else fp32_cache
    with pytest.raises(MdistillerError) as info:
        validate_run(_cfg(data_root, teacher_file, path, **keys), str(tmp_path / "run"), False, CPU)
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_a_missing_or_unfinished_cache_is_refused(tmp_path, data_root, teacher_file):
    message = _refused(_cfg(data_root, teacher_file, str(tmp_path / "nothing")), tmp_path)
    assert "no teacher cache at" in message and "tools/cache_teacher.py" in message
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "build.json").write_text("{}")
    assert "unfinished build" in _refused(_cfg(data_root, teacher_file, str(tmp_path / "half")), tmp_path)


# ---- building ----
def test_a_killed_build_continues_and_ends_byte_identical(tmp_path, data_root, teacher_file, monkeypatch, one_thread):
    cfg = _cfg(data_root, teacher_file, str(tmp_path / "resumed"))
    images, labels = (array[:8] for array in _train_images(data_root))
    teacher = build_teacher(cfg, 100)
    identity = run_identity(cfg, teacher, images, labels, CPU)
    settings = {"chunk_images": 2, "batch_size": 100, "verify_samples": 16, "progress": False}
    whole = build_cache(str(tmp_path / "whole"), teacher, images, identity, CPU, **settings)
    records = []
    real_write = teacher_cache_build.atomic_write_text

    def killed_after_two_chunks(path, text):
        if path.endswith("build.json") and json.loads(text)["chunks_done"] == 3:
            raise KeyboardInterrupt  # chunk 3's bytes are written, its record is not: it must be redone
        records.append(json.loads(text)["chunks_done"] if path.endswith("build.json") else None)
        real_write(path, text)

    monkeypatch.setattr(teacher_cache_build, "atomic_write_text", killed_after_two_chunks)
    with pytest.raises(KeyboardInterrupt):
        build_cache(str(tmp_path / "resumed"), teacher, images, identity, CPU, **settings)
    assert records == [0, 1, 2] and not (tmp_path / "resumed" / "identity.json").exists()
    with pytest.raises(MdistillerError, match="unfinished build"):
        read_identity(str(tmp_path / "resumed"))
    monkeypatch.setattr(teacher_cache_build, "atomic_write_text", real_write)
    forwards = []
    real_logits = teacher_cache_build._logits

    def counted(teacher, views, *rest):
        forwards.append(len(views))
        return real_logits(teacher, views, *rest)

    monkeypatch.setattr(teacher_cache_build, "_logits", counted)
    resumed = build_cache(str(tmp_path / "resumed"), teacher, images, identity, CPU, **settings)
    assert sum(forwards) == 2 * 2 * VIEWS_PER_IMAGE + 16  # chunks 3 and 4 only, then the 16 verified views
    assert (tmp_path / "resumed" / TABLE_FILE).read_bytes() == (tmp_path / "whole" / TABLE_FILE).read_bytes()
    assert resumed["table_sha256"] == whole["table_sha256"]
    assert sorted(p.name for p in (tmp_path / "resumed").iterdir()) == ["identity.json", TABLE_FILE]



def test_verification_finds_a_wrong_row_and_the_tool_refuses_a_changed_table(fp32_cache, data_root, teacher_file,
                                                                            tmp_path, capsys, one_thread):
    check = cache_tool.main(["--verify", fp32_cache, "--device", "cpu", "--samples", "64"])
    assert check["passed"] and "verified" in capsys.readouterr().out
    copy = tmp_path / "copy"
    shutil.copytree(fp32_cache, copy)
    identity = read_identity(str(copy))
    table = np.array(open_table_file(str(copy / TABLE_FILE), identity))
    table[5 * VIEWS_PER_IMAGE:6 * VIEWS_PER_IMAGE, 3] += 0.5  # image 5's rows: 1 in 16 of the table
    images, _ = _train_images(data_root)
    teacher = build_teacher(_cfg(data_root, teacher_file), 100)
    found = verify_table(table, teacher, images, identity, CPU, samples=256)
    assert not found["passed"] and found["max_abs_diff"] == pytest.approx(0.5, abs=1e-5)
    assert verify_table(np.array(open_table_file(f"{fp32_cache}/{TABLE_FILE}", identity)), teacher, images,
                        identity, CPU, samples=256)["passed"]
    (copy / TABLE_FILE).write_bytes(table.tobytes())
    with pytest.raises(MdistillerError, match="changed since it was built"):
        cache_tool.main(["--verify", str(copy), "--device", "cpu", "--samples", "8"])


def test_the_tool_builds_where_auto_looks_and_says_how_to_use_it(tmp_path, data_root, teacher_file, capsys, one_thread):
    root = tmp_path / "data"
    shutil.copytree(data_root, root)
    cfg_file = str(REPO / "configs/cifar100/kd/resnet32x4_resnet8x4.yaml")
    opts = ["DATASET.ROOT", str(root), "DISTILLER.TEACHER", "cachenet", "DISTILLER.TEACHER_CKPT", teacher_file]
    identity = cache_tool.main(["--cfg", cfg_file, "--device", "cpu", "--batch-size", "500", *opts])
    out = capsys.readouterr().out
    [cache] = list((root / "teacher_cache").iterdir())
    assert f"teacher cache: {cache}" in out and "DISTILLER.TEACHER_CACHE auto" in out
    assert identity["num_images"] == 16 and identity["batch_size"] == 500
    # MLKD's weak view is the standard one: its config finds the same cache (the identity names no method)
    again = cache_tool.main(["--cfg", str(REPO / "configs/cifar100/mlkd/resnet32x4_resnet8x4.yaml"), *opts])
    assert again["built"] == identity["built"] and len(list((root / "teacher_cache").iterdir())) == 1
    with pytest.raises(MdistillerError, match="uses the teacher's features"):
        cache_tool.main(["--cfg", str(REPO / "configs/cifar100/fitnet/resnet32x4_resnet8x4.yaml"), *opts])


# ---- refused methods and data ----
REFUSALS = {
    "feature method": ({"DISTILLER__TYPE": "VKD"}, "VKD uses the teacher's features, and a cache holds logits only"),
    "WKD-F": ({"DISTILLER__TYPE": "WKD", "WKD__LOSS__WKD_FEAT_WEIGHT": 1.0}, "WKD uses the teacher's features"),
    "train-mode teacher": ({"DISTILLER__TYPE": "OFD"}, "OFD runs its teacher in train mode"),
    "no teacher": ({"DISTILLER__TYPE": "NONE"}, "NONE trains without a teacher"),
    "augment": ({"DATASET__AUGMENT": "deit"}, "DATASET.AUGMENT deit replaces the crop + flip view"),
    "mixup": ({"DATASET__MIXUP__MIXUP_ALPHA": 0.8}, "DATASET.MIXUP mixes pairs of images"),
    "imagenet": ({"DATASET__TYPE": "imagenet", "DISTILLER__TEACHER": "ResNet34", "DISTILLER__STUDENT": "ResNet18"},
                 "ImageNet's RandomResizedCrop draws continuous scales"),
    "tiny-imagenet": ({"DATASET__TYPE": "tiny_imagenet", "DISTILLER__TEACHER": "ResNet18",
                       "DISTILLER__STUDENT": "MobileNetV2"}, "Tiny-ImageNet's RandomRotation(20)"),
    "bf16": ({"DISTILLER__TEACHER_CACHE_DTYPE": "bf16"}, "bf16 keeps 7 mantissa bits to fp16's 10"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_what_the_cache_cannot_serve_is_refused_in_one_line(case):
    keys, expected = REFUSALS[case]
    cfg = _cfg("./data", "", "auto", **{"DISTILLER__TEACHER": "resnet32x4", "DISTILLER__STUDENT": "resnet8x4",
                                        **keys})
    with pytest.raises(MdistillerError) as info:
        check_recipe(cfg)
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_mlkd_takes_its_weak_view_from_the_cache_and_runs_the_teacher_on_the_strong_one():

    cfg = _cfg("./data", "", "auto", DISTILLER__TYPE="MLKD", DISTILLER__TEACHER="resnet32x4",
               DISTILLER__STUDENT="resnet8x4")
    check_recipe(cfg)
    mlkd = get_distiller_class("MLKD")
    assert cache_plan(cfg, mlkd) == (None, "image_weak", ("image_strong",))
    assert cache_batch_needs(cfg, mlkd) == {"view_id": "image_weak"}

    class StrongOnly(Distiller):
        declares = Declaration(loss_terms=("loss_kd",), distillation_terms=("loss_kd",),
                               train_views={"image": "strong"}, teacher_reads=logits_on("image"))

    class TwoStandardViews(StrongOnly):
        declares = Declaration(loss_terms=("loss_kd",), distillation_terms=("loss_kd",),
                               train_views={"a": "standard", "b": "standard"}, teacher_reads=logits_on("a", "b"))

    refusal, served, _ = cache_plan(cfg, StrongOnly)
    assert served is None and "reads its image view, which cannot be enumerated" in refusal
    refusal, served, _ = cache_plan(cfg, TwoStandardViews)
    assert served is None and "reads 2 enumerable views (a, b)" in refusal
    with pytest.raises(MdistillerError, match="cannot be enumerated"):
        cache_batch_needs(cfg, StrongOnly)


def test_undeclared_methods_are_refused_and_logit_methods_declare_logits():
    undeclared = Declaration(loss_terms=("loss_ce", "loss_kd"))  # says nothing of what it reads
    assert undeclared.teacher_uses({}) == {"image": frozenset({"logits", "features"})}
    for name in ("KD", "DKD", "CTKD"):
        cls = get_distiller_class(name)
        assert cls.declares.teacher_uses(cls.hparams(default_cfg())) == {"image": frozenset({"logits"})}


def test_the_imagenet_data_path_refuses_view_ids():
    cfg = default_cfg()
    cfg.DATASET.TYPE = "tiny_imagenet"
    with pytest.raises(MdistillerError, match="cannot give view ids for image: Tiny-ImageNet's RandomRotation"):
        get_dataset(cfg, {"image": "standard"}, needs={"view_id": "image"})


def test_cifar_transforms_are_torchvisions():
    """RecordedCropFlip mirrors torchvision's calls: if torchvision changed how RandomCrop draws, this would show it."""
    composed = standard_train_transform(FMT.mean, FMT.std).transforms
    assert isinstance(composed[0], transforms.RandomCrop) and composed[0].padding == 4 and composed[0].fill == 0
    assert isinstance(composed[1], transforms.RandomHorizontalFlip) and composed[1].p == 0.5


def test_bench_rows_time_the_cached_step_and_the_build(monkeypatch, one_thread, capsys):
    from mdistiller.cli import bench

    monkeypatch.setitem(bench.CACHE_BUILD_IMAGES, "cpu", 1)
    rows = bench.main(["--device", "cpu", "--data", "synthetic", "--synthetic-size", "32", "--steps", "1",
                       "--warmup", "1", "--rows", "ours,teacher_cache", "--opts", "DISTILLER.TEACHER", "cachenet",
                       "DISTILLER.STUDENT", "cachenet", "SOLVER.BATCH_SIZE", "8", "DATASET.NUM_WORKERS", "0"])
    cached = rows[1]
    assert cached["name"] == "teacher_cache" and cached["images_per_s"] > 0
    assert cached["cache_build_views"] == VIEWS_PER_IMAGE and cached["cache_build_views_per_s"] > 0
    assert cached["cache_verify_max_abs_diff"] <= 1e-5 and cached["data"].endswith("cached teacher logits")
    assert "cache build" in capsys.readouterr().out


# ---- CUDA (skipped without a GPU; `pytest -m cuda`) ----
CUDA = torch.device("cuda")


@pytest.fixture
def no_tf32():
    """fp32 convolutions and matmuls in full fp32 (TF32 is cuDNN's default): differences down to rounding."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.cuda
def test_cuda_cached_rows_equal_the_live_teacher_on_gpu_resident_views(tmp_path, data_root, teacher_file, no_tf32):
    from mdistiller.engine.teacher_cache import TeacherLogitTable

    cfg = _cfg(data_root, teacher_file, str(tmp_path / "cuda"))
    path = ensure_teacher_cache(cfg, CUDA, progress=False, verify_samples=256)
    identity = read_identity(path)
    assert identity["tf32"] is False and identity["device"] != "cpu" and identity["verify"]["passed"]
    table = TeacherLogitTable(path, identity, CUDA)
    assert table.where == "on the GPU" and table.table.is_cuda
    images, labels = _train_images(data_root)
    loader = DeviceCifarLoader(images, labels, 8, FMT.mean, FMT.std, CUDA, train=True, seed=0, record_views=True)
    teacher = build_teacher(cfg, 100).to(CUDA).eval()
    for batch in loader:
        cached = table.attach(batch)["teacher_logits"]
        assert cached.is_cuda and cached.dtype == torch.float32
        with torch.no_grad():
            live = teacher(batch["image"])[0]
        torch.testing.assert_close(cached, live, rtol=0, atol=1e-4)


@pytest.mark.cuda
def test_cuda_cached_step_places_no_teacher_and_equals_the_live_step(tmp_path, data_root, teacher_file, no_tf32):
    path = ensure_teacher_cache(_cfg(data_root, teacher_file, str(tmp_path / "cache")), CUDA, progress=False)
    live_losses, live_weights, _ = _one_epoch(_cfg(data_root, teacher_file), tmp_path / "live", CUDA)
    cached_losses, cached_weights, trainer = _one_epoch(_cfg(data_root, teacher_file, path), tmp_path / "cached",
                                                        CUDA)
    assert trainer.distiller.teacher is None
    assert not any(name.startswith("teacher.") for name, _ in trainer.distiller.named_parameters())
    assert trainer.teacher_cache.where == "on the GPU"
    for live, cached in zip(live_losses, cached_losses):
        for key in live:
            assert abs(live[key] - cached[key]) <= 1e-4, (key, live[key], cached[key])
    for key, value in live_weights.items():
        torch.testing.assert_close(cached_weights[key], value, rtol=0, atol=1e-4)


@pytest.mark.cuda
def test_cuda_amp_cache_is_built_under_bf16_and_refused_by_an_fp32_run(tmp_path, data_root, teacher_file):
    path = ensure_teacher_cache(_cfg(data_root, teacher_file, str(tmp_path / "amp"), SOLVER__AMP=True), CUDA,
                                progress=False, verify_samples=256)
    identity = read_identity(path)
    assert identity["amp"] is True and identity["verify"]["passed"]
    with pytest.raises(MdistillerError, match="another SOLVER.AMP"):
        validate_run(_cfg(data_root, teacher_file, path), str(tmp_path / "run"), False, CUDA)


@pytest.mark.cuda
def test_cuda_bench_cache_row_reports_the_build_speed(monkeypatch):
    from mdistiller.cli import bench

    monkeypatch.setitem(bench.CACHE_BUILD_IMAGES, "cuda", 64)
    rows = bench.main(["--device", "cuda", "--tiny", "--data", "synthetic", "--synthetic-size", "512", "--steps",
                       "10", "--warmup", "2", "--rows", "ours,teacher_cache"])
    cached = rows[1]
    assert cached["cache_build_views"] == 64 * VIEWS_PER_IMAGE and cached["cache_build_views_per_s"] > 0
    assert cached["data"] == "GPU-resident (augmented on the GPU), cached teacher logits"
