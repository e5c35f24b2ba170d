"""The speed switches (SOLVER.AMP / CHANNELS_LAST / COMPILE), the LR warm-up, losses kept in fp32 under autocast, the
host-sync-free training step, the teacher's inference-mode forward and the large-batch config."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mdistiller.dataset.contrastive import ContrastiveSampler
from mdistiller.distillers._base import cross_entropy
from mdistiller.distillers.crd import contrast_loss
from mdistiller.distillers.ctkd import per_sample_kd_loss
from mdistiller.distillers.dkd import dkd_loss
from mdistiller.distillers.kd import kd_loss
from mdistiller.distillers.kdpp import save_centres
from mdistiller.distillers.logit_stand import standardize_logits
from mdistiller.distillers.mlkd import mlkd_losses
from mdistiller.distillers.ot import gaussian_wasserstein_loss, prepare_cost, wkd_logit_loss
from mdistiller.distillers.registry import get_distiller_class
from mdistiller.distillers.vkd import vkd_feature_loss
from mdistiller.engine import accel
from mdistiller.engine.build import build_kwargs
from mdistiller.engine.cfg import CFG, load_cfg, validate_cfg
from mdistiller.engine.guards import PROGRESS_EVERY
from mdistiller.engine.optim import learning_rate
from mdistiller.engine.trainer import Trainer
from mdistiller.errors import MdistillerError
from mdistiller.models import cifar_model_dict

REPO = Path(__file__).resolve().parents[1]
FAST_CFG = REPO / "configs/cifar100/kd/fast/resnet32x4_resnet8x4.yaml"
BASE_CFG = REPO / "configs/cifar100/kd/resnet32x4_resnet8x4.yaml"
CPU = torch.device("cpu")


def make_cfg(**solver) -> object:
    cfg = CFG.clone()
    cfg.defrost()
    for key, value in solver.items():
        setattr(cfg.SOLVER, key, value)
    return cfg


def make_trainer(tmp_path, cfg, distiller_type: str = "KD", student: str = "resnet8", teacher: str = "resnet8",
                 num_classes: int = 10, seed: int = 0, loader=()) -> Trainer:
    torch.manual_seed(seed)
    student_model = cifar_model_dict[student][0](num_classes=num_classes)
    teacher_model = cifar_model_dict[teacher][0](num_classes=num_classes)
    distiller_class = get_distiller_class(distiller_type)
    distiller = distiller_class(student_model, teacher_model, cfg, **build_kwargs(distiller_class, num_data=64))
    trainer = Trainer(str(tmp_path), distiller, loader, [], cfg, CPU)
    trainer.distiller.train()
    return trainer


def batch_of(n: int = 8, num_classes: int = 10, seed: int = 0, size: int = 32) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {"image": torch.randn(n, 3, size, size, generator=generator),
            "target": torch.randint(0, num_classes, (n,), generator=generator),
            "index": torch.arange(n)}


# ---- learning-rate warm-up ----

def test_warmup_ramps_linearly_per_step_then_follows_the_step_schedule():
    cfg = make_cfg(LR=0.4, LR_WARMUP_EPOCHS=5.0, LR_DECAY_STAGES=[150, 180, 210], LR_DECAY_RATE=0.1)
    assert learning_rate(cfg, 1, 0.5) == pytest.approx(0.4 * 0.5 / 5)
    assert learning_rate(cfg, 3, 0.25) == pytest.approx(0.4 * 2.25 / 5)
    assert learning_rate(cfg, 5, 1.0) == pytest.approx(0.4)
    assert learning_rate(cfg, 6, 0.01) == pytest.approx(0.4)
    assert learning_rate(cfg, 151, 0.5) == pytest.approx(0.04)
    cfg.SOLVER.LR_WARMUP_EPOCHS = 0.0  # mdistiller's recipe: the fraction of the epoch plays no part
    assert learning_rate(cfg, 1, 0.1) == learning_rate(cfg, 1) == pytest.approx(0.4)


def test_trainer_sets_the_warmup_lr_before_every_step_of_a_warmup_epoch(tmp_path):
    cfg = make_cfg(LR=0.4, LR_WARMUP_EPOCHS=2.0, EPOCHS=1)
    batches = [batch_of(4, seed=s) for s in range(4)]
    trainer = make_trainer(tmp_path, cfg, "NONE", loader=batches)
    seen = []
    trainer.optimizer.register_step_pre_hook(lambda opt, args, kwargs: seen.append(opt.param_groups[0]["lr"]))
    trainer.train_epoch(1)
    assert seen == pytest.approx([0.4 * (k / 4) / 2 for k in range(1, 5)])


def test_bad_speed_keys_give_one_line_errors():
    cfg = make_cfg(COMPILE="fast")
    with pytest.raises(MdistillerError, match="SOLVER.COMPILE 'fast' is not a torch.compile mode; use one of"):
        validate_cfg(cfg)
    cfg = make_cfg(LR_WARMUP_EPOCHS=-1.0)
    with pytest.raises(MdistillerError, match="SOLVER.LR_WARMUP_EPOCHS must be >= 0"):
        validate_cfg(cfg)


# ---- losses in fp32 under autocast ----

def _logits(seed: int, n: int = 6, c: int = 10) -> torch.Tensor:
    return torch.randn(n, c, generator=torch.Generator().manual_seed(seed)) * 3


TARGET = torch.tensor([0, 3, 9, 2, 2, 7])
COST = prepare_cost(torch.rand(10, 10, generator=torch.Generator().manual_seed(5)))
# bf16-representable, so the bf16 and fp32 calls below get the same values
FEAT_S = torch.randn(6, 4, 5, 5, generator=torch.Generator().manual_seed(6)).bfloat16().float()
FEAT_T = torch.randn(6, 4, 5, 5, generator=torch.Generator().manual_seed(7)).bfloat16().float()
LOSSES = {
    "kd": lambda s, t: kd_loss(s, t, 4.0),
    "ce": lambda s, t: cross_entropy(s, TARGET),
    "dkd": lambda s, t: dkd_loss(s, t, TARGET, 1.0, 8.0, 4.0),
    "ctkd": lambda s, t: per_sample_kd_loss(s, t, torch.full((6,), 3.0)),
    "mlkd": lambda s, t: sum(mlkd_losses(s, t, s * 0.5, t * 0.5, 4.0, 1.0).values()),
    "wkd_logit": lambda s, t: sum(wkd_logit_loss(s, t, TARGET, COST, 2.0, 0.05, 20)),
    "wkd_feat": lambda s, t: gaussian_wasserstein_loss(FEAT_S.to(s.dtype), FEAT_T.to(t.dtype), 2.0),
    "vkd": lambda s, t: vkd_feature_loss(s, t),
    "crd": lambda s, t: contrast_loss(FEAT_S.to(s.dtype)[:, 0, :, :1].abs(), 50),
    "logit_stand": lambda s, t: standardize_logits(s).sum() + standardize_logits(t).sum(),
}


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_loss_is_computed_in_fp32_under_bf16_autocast(name):
    """Given bf16 logits (what the models return under AMP), each loss equals, to the bit, the fp32 computation on
    the same values: autocast is off inside it."""
    loss = LOSSES[name]
    student, teacher = _logits(0).bfloat16(), _logits(1).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_amp = loss(student, teacher)
    reference = loss(student.float(), teacher.float())
    assert under_amp.dtype == torch.float32
    assert torch.equal(under_amp, reference)


def test_fp32_loss_is_what_keeps_the_sinkhorn_matmuls_out_of_bf16():
    """Without the decorator autocast would run the Sinkhorn iterations' matmuls in bf16 (a different value): the
    equality above is not vacuous."""
    undecorated = wkd_logit_loss.__wrapped__
    student, teacher = _logits(0), _logits(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        raw = undecorated(student, teacher, TARGET, COST, 2.0, 0.05, 20)[1]
    exact = wkd_logit_loss(student, teacher, TARGET, COST, 2.0, 0.05, 20)[1]
    assert not torch.equal(raw.float(), exact)


# ---- the switches in a training step ----

def test_amp_runs_models_in_bf16_keeps_fp32_weights_and_losses_and_trains(tmp_path):
    trainer = make_trainer(tmp_path, make_cfg(AMP=True, LR=0.05))
    conv_dtypes = []
    trainer.distiller.teacher.conv1.register_forward_hook(lambda m, i, o: conv_dtypes.append(o.dtype))
    batch = batch_of(16)
    logits, losses = trainer.train_step(batch, 1)
    assert logits.dtype == torch.bfloat16 and conv_dtypes == [torch.bfloat16]
    assert all(term.dtype == torch.float32 for term in losses.values())
    assert all(p.dtype == torch.float32 for p in trainer.distiller.parameters())
    assert all(p.grad.dtype == torch.float32 for p in trainer.distiller.student.parameters() if p.grad is not None)
    first = sum(losses.values()).item()
    for _ in range(15):
        _, losses = trainer.train_step(batch, 1)
    assert sum(losses.values()).item() < 0.7 * first


def test_channels_last_converts_weights_and_inputs_and_computes_the_same_step(tmp_path):
    batch = batch_of(8)
    plain = make_trainer(tmp_path / "a", make_cfg())
    fast = make_trainer(tmp_path / "b", make_cfg(CHANNELS_LAST=True))
    conv = fast.distiller.student.conv1.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    moved = accel.batch_to_device(batch, CPU, fast.memory_format)
    assert moved["image"].is_contiguous(memory_format=torch.channels_last)
    for _ in range(2):
        _, losses_plain = plain.train_step(batch, 1)
        _, losses_fast = fast.train_step(batch, 1)
    for name in losses_plain:
        torch.testing.assert_close(losses_fast[name], losses_plain[name], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                    reason="torch.compile on the CPU needs a C compiler (inductor's C++ backend); none on PATH")
def test_compile_trains_the_same_step_and_keeps_state_dict_names(tmp_path):
    batch = batch_of(8)
    eager = make_trainer(tmp_path / "a", make_cfg())
    compiled = make_trainer(tmp_path / "b", make_cfg(COMPILE="default"))
    assert compiled.forward is not compiled.distiller
    for _ in range(2):
        _, losses_eager = eager.train_step(batch, 1)
        _, losses_compiled = compiled.train_step(batch, 1)
    for name in losses_eager:
        torch.testing.assert_close(losses_compiled[name], losses_eager[name], rtol=1e-4, atol=1e-5)
    assert list(compiled.distiller.state_dict()) == list(eager.distiller.state_dict())
    for (name, p_eager), p_compiled in zip(eager.distiller.student.named_parameters(),
                                           compiled.distiller.student.parameters()):
        torch.testing.assert_close(p_compiled, p_eager, rtol=1e-4, atol=1e-5, msg=name)


# ---- no host synchronisation in the step ----

HOST_READS = ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__")
DISTILLER_CONFIGS = {
    "KD": ({}, {}),
    "DKD": ({}, {}),
    "CTKD": ({}, {}),
    "MLKD": ({}, {}),
    "WKD": ({"WKD.LOSS.WKD_FEAT_WEIGHT": 2.0, "WKD.HINT_LAYER": 2}, {}),
    "VKD": ({}, {}),
    "CRD": ({"CRD.NCE.K": 16}, {}),
    # the recent methods (SDD's whole-loss guard and CAT-KD's default full-map transfer must not read the host)
    "DIST": ({}, {}),
    "TTM": ({}, {}),
    "WTTM": ({}, {}),
    "NKD": ({}, {}),
    "RLD": ({}, {}),
    "USKD": ({}, {}),
    "SDD_KD": ({}, {}),
    "SDD_DKD": ({}, {}),
    "SDD_NKD": ({}, {}),
    "CAT_KD": ({"if_test": True}, {}),
    "KDPP": ({"KDPP.CENTERS": "centres"}, {}),
    "DKDPP": ({"DKDPP.CENTERS": "centres"}, {}),
}


@pytest.mark.parametrize("distiller_type", sorted(DISTILLER_CONFIGS))
def test_the_training_step_never_reads_a_tensor_on_the_host(tmp_path, monkeypatch, distiller_type):
    """Every way Python code can pull a value to the host raises during the step (between the NaN policy's scheduled
    reads); it returns tensors only."""
    cfg = make_cfg(AMP=True)
    for key, value in DISTILLER_CONFIGS[distiller_type][0].items():
        if value == "centres":  # KD++ / DKD++: class centres of the teacher (resnet20: 64-d) over 10 classes
            value = str(tmp_path / "centres.json")
            save_centres(value, torch.randn(10, 64))
        if "." not in key:  # a top-level key (CAT-KD's if_test)
            cfg[key] = value
            continue
        section, *rest = key.split(".")
        node = getattr(cfg, section)
        for part in rest[:-1]:
            node = getattr(node, part)
        setattr(node, rest[-1], value)
    trainer = make_trainer(tmp_path, cfg, distiller_type, teacher="resnet20")
    batch = batch_of(8)
    if distiller_type == "MLKD":
        batch = {"image_weak": batch["image"], "image_strong": batch["image"].flip(3), "target": batch["target"],
                 "index": batch["index"]}
    if "contrastive_index" in get_distiller_class(distiller_type).batch_needs_of(cfg):  # CRD: as the data path draws
        labels = torch.arange(64) % 10
        batch["contrastive_index"] = ContrastiveSampler(labels, cfg.CRD.NCE.K).draw(batch["index"], labels[:8])

    def host_read(*args, **kwargs):
        raise AssertionError("a host read inside the training step")

    trainer.sync_every = PROGRESS_EVERY  # an accelerator's schedule: the NaN flag is read every 20 steps, not now
    for name in HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, host_read)
    logits, losses = trainer.train_step(batch, 2, step=1)  # the whole step: LR, watch, update, statistics
    monkeypatch.undo()
    assert torch.is_tensor(logits) and all(torch.is_tensor(term) for term in losses.values())
    assert all(torch.isfinite(term).all() for term in losses.values())


# ---- the teacher's forward ----

def test_teacher_runs_in_inference_mode_and_returns_ordinary_tensors_a_loss_may_save():
    cfg = make_cfg()
    distiller = get_distiller_class("KD")(cifar_model_dict["resnet8"][0](num_classes=10),
                                          cifar_model_dict["resnet8"][0](num_classes=10), cfg)
    modes = []
    distiller.teacher.conv1.register_forward_hook(lambda m, i, o: modes.append(torch.is_inference_mode_enabled()))
    image = torch.randn(4, 3, 32, 32)
    logits, feats = distiller.teacher_forward(image)
    assert modes == [True]
    assert not torch.is_inference(logits) and not torch.is_inference(feats["feats"][-1])
    assert not logits.requires_grad
    student_feat = torch.randn_like(feats["feats"][-1], requires_grad=True)
    F.mse_loss(student_feat, feats["feats"][-1]).backward()  # mse_loss saves its target: an inference tensor fails
    assert student_feat.grad is not None
    assert all(p.grad is None for p in distiller.teacher.parameters())


# ---- large-batch mode ----

def test_large_batch_config_is_the_batch64_recipe_scaled_linearly_and_says_so():
    fast, base = load_cfg(str(FAST_CFG)), load_cfg(str(BASE_CFG))
    validate_cfg(fast)
    scale = fast.SOLVER.BATCH_SIZE / base.SOLVER.BATCH_SIZE
    assert fast.SOLVER.BATCH_SIZE == 512 and scale == 8
    assert fast.SOLVER.LR == pytest.approx(base.SOLVER.LR * scale)
    assert fast.SOLVER.LR_WARMUP_EPOCHS > 0
    assert fast.SOLVER.AMP and fast.SOLVER.CHANNELS_LAST and fast.SOLVER.COMPILE
    for key in ("EPOCHS", "LR_DECAY_STAGES", "LR_DECAY_RATE", "WEIGHT_DECAY", "MOMENTUM", "TYPE"):
        assert fast.SOLVER[key] == base.SOLVER[key], key
    assert fast.KD == base.KD and fast.DISTILLER == base.DISTILLER
    assert fast.EXPERIMENT.TAG != base.EXPERIMENT.TAG  # its runs get their own folders
    header = FAST_CFG.read_text().splitlines()[0]
    assert "LARGE-BATCH MODE" in header and "different recipe" in header


class TinyNet(torch.nn.Module):
    """A two-conv CNN with BatchNorm returning (logits, feats) like the zoo, small enough for many CPU epochs."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        nn = torch.nn
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                                  nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1))
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        feat = self.body(x).flatten(1)
        return self.fc(feat), {"pooled_feat": feat}


def pattern_task(n: int, seed: int) -> tuple:
    """16x16 images: one blocky random pattern per class (10 classes) under heavy pixel noise (not separable by
    colour alone; 20 epochs of a small CNN reach ~97 %)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    patterns = np.kron(np.random.default_rng(0).normal(0, 1, (10, 4, 4, 3)), np.ones((1, 4, 4, 1)))
    labels = rng.integers(0, 10, n)
    images = 128 + 35 * patterns[labels] + rng.normal(0, 70, (n, 16, 16, 3))
    return np.clip(images, 0, 255).astype(np.uint8), labels


def train_on_pattern_task(tmp_path, batch: int, lr: float, warmup: float, seed: int, epochs: int = 20) -> float:
    from mdistiller.dataset.device_cifar import DeviceCifarLoader

    cfg = make_cfg(BATCH_SIZE=batch, LR=lr, LR_WARMUP_EPOCHS=warmup, EPOCHS=epochs, WEIGHT_DECAY=5e-4,
                   LR_DECAY_STAGES=[int(epochs * 0.6), int(epochs * 0.8)])
    torch.manual_seed(seed)
    distiller = get_distiller_class("NONE")(TinyNet(), None, cfg)
    stats = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    train_images, train_labels = pattern_task(8192, seed=1)
    test_images, test_labels = pattern_task(1000, seed=2)
    train = DeviceCifarLoader(train_images, train_labels, batch, *stats, CPU, train=True, seed=seed)
    test = DeviceCifarLoader(test_images, test_labels, 500, *stats, CPU, train=False)
    trainer = Trainer(str(tmp_path / f"b{batch}_lr{lr}_s{seed}"), distiller, train, test, cfg, CPU)
    trainer.log = lambda message: None
    return trainer.train()["last_acc"]


@pytest.mark.slow
def test_large_batch_recipe_reaches_the_batch64_accuracy_on_a_learnable_task(tmp_path):
    """The large-batch config's rule (batch x8, LR x8, per-step warm-up) against the batch-64 recipe, same epochs,
    2 seeds each: the means agree within 2 points. Batch 512 at the unscaled LR falls far short, so the comparison
    can fail. (Measured here: batch 64 97.85 +- 0.05, batch 512 96.75 +- 0.45.)"""
    fast, base = load_cfg(str(FAST_CFG)), load_cfg(str(BASE_CFG))
    small_batch, large_batch = base.SOLVER.BATCH_SIZE, fast.SOLVER.BATCH_SIZE
    lr_scale = fast.SOLVER.LR / base.SOLVER.LR
    assert lr_scale == large_batch / small_batch
    base_lr = 0.05
    seeds = (0, 1)
    small = [train_on_pattern_task(tmp_path, small_batch, base_lr, 0.0, s) for s in seeds]
    large = [train_on_pattern_task(tmp_path, large_batch, base_lr * lr_scale, 1.0, s) for s in seeds]
    unscaled = train_on_pattern_task(tmp_path, large_batch, base_lr, 0.0, 0)
    mean_small, mean_large = sum(small) / len(small), sum(large) / len(large)
    assert mean_small > 85, small
    assert abs(mean_large - mean_small) <= 2.0, (small, large)
    assert unscaled < mean_small - 8, (unscaled, small)


@pytest.mark.slow
def test_large_batch_config_trains_through_the_cli_with_its_switches(tmp_path, cifar100_tiny_root, teacher_ckpt):
    """tools/train.py with the fast config (bf16 autocast, channels_last, warm-up; compile off to stay quick on the
    CPU): one epoch, the run log names the switches, checkpoints hold fp32 weights under their usual names."""
    from conftest import run_overrides, run_tool

    result = run_tool("train.py", "--cfg", str(FAST_CFG), *run_overrides(tmp_path, cifar100_tiny_root),
                      "DISTILLER.TEACHER", "resnet20", "DISTILLER.STUDENT", "resnet8", "SOLVER.BATCH_SIZE", "16",
                      "SOLVER.COMPILE", "", "DISTILLER.TEACHER_CKPT", teacher_ckpt("resnet20"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "bf16 autocast, channels_last" in result.stdout
    (run_dir,) = [p for p in (tmp_path / "output").glob("*/*") if p.is_dir()]
    assert run_dir.parent.name == "cifar100_fast"
    student = torch.load(run_dir / "student_best", weights_only=False)["model"]
    assert all(t.dtype == torch.float32 for k, t in student.items() if t.is_floating_point())
    assert set(student) == set(cifar_model_dict["resnet8"][0](num_classes=100).state_dict())
