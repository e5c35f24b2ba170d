"""DeiT students and the RegNetY-160 teacher through timm, a VkD step on a DeiT, and the AdamW optimizer factory."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from mdistiller.distillers import Declaration, Distiller
from mdistiller.engine.build import build_distiller, build_model
from mdistiller.engine.cfg import OPTIMIZERS, default_cfg, load_cfg, validate_cfg
from mdistiller.engine.optim import OPTIMIZER_BUILDERS, build_optimizer
from mdistiller.errors import MdistillerError

REPO = Path(__file__).resolve().parents[1]
needs_timm = pytest.mark.skipif(importlib.util.find_spec("timm") is None,
                                reason='timm is not installed: the ViT path needs pip install -e ".[vit]"')


def _semi_orthogonality_error(weight: torch.Tensor) -> float:
    d_t, d_s = weight.shape
    gram = weight.t() @ weight if d_s <= d_t else weight @ weight.t()
    return (gram - torch.eye(min(d_s, d_t))).abs().max().item()


def test_without_timm_a_vit_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` now raises ImportError
    with pytest.raises(MdistillerError, match=r'need timm, which is not installed: pip install -e "\.\[vit\]"') as info:
        build_model("deit_tiny", 10, "imagenet", 32)
    assert "\n" not in str(info.value)
    assert build_model("ResNet18", 10, "imagenet").fc.out_features == 10  # the CNN zoo never imports timm


@needs_timm
def test_deit_returns_logits_and_output_tokens_with_timms_state_dict():
    import timm

    torch.manual_seed(0)
    model = build_model("deit_tiny", 10, "imagenet", 32).eval()
    reference = timm.create_model("deit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=32).eval()
    assert list(model.state_dict()) == list(reference.state_dict())  # DeiT's / timm's files load as they are
    reference.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits, feats = model(x)
        expected = reference(x)
    assert torch.allclose(logits, expected, atol=1e-5)
    assert feats["tokens"].shape == (2, 4, 192)  # (32 / 16)^2 patch tokens, the class token left out
    assert feats["pooled_feat"].shape == (2, 192) and torch.equal(feats["pooled_feat"], feats["cls_token"])
    assert feats["feats"] == [] and model.get_stage_channels() == [192]


@needs_timm
def test_regnety_160_teacher_returns_stage_maps_and_the_pooled_feature():
    torch.manual_seed(0)
    model = build_model("regnety_160", 5, "imagenet").eval()
    with torch.no_grad():
        logits, feats = model(torch.randn(1, 3, 64, 64))
    assert logits.shape == (1, 5)
    assert [f.shape[1] for f in feats["feats"]] == [32, 224, 448, 1232, 3024]
    assert model.get_stage_channels() == [224, 448, 1232, 3024]
    assert feats["pooled_feat"].shape == (1, 3024)
    assert torch.allclose(feats["pooled_feat"], feats["feats"][-1].mean((2, 3)), atol=1e-5)
    assert "s4.b1.conv1.conv.weight" in model.state_dict()  # timm's (and DeiT's teacher file's) names


@needs_timm
def test_one_vkd_step_on_a_tiny_deit(tmp_path):
    """The DeiT-Ti VkD config at 32 px with a small CNN teacher (RegNetY-160's 3024-d projection is slow on a CPU)."""
    torch.manual_seed(0)
    teacher_file = tmp_path / "resnet18-f37072fd.pth"
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), teacher_file)
    cfg = load_cfg(str(REPO / "configs/imagenet/deit/deit_tiny_vkd.yaml"), [
        "DATASET.IMAGE_SIZE", "32", "VKD.INPUT_SIZE", "(32, 32)", "DISTILLER.TEACHER", "ResNet18",
        "DISTILLER.TEACHER_CKPT", str(teacher_file), "SOLVER.TYPE", "AdamW", "SOLVER.LR", "0.0005",
        "SOLVER.WEIGHT_DECAY", "0.05",
    ])
    distiller = build_distiller(cfg, 10)
    assert distiller.projection.weight.shape == (512, 192)  # D_t x D_s, from the mean of the output tokens
    optimizer = build_optimizer(cfg, distiller)
    distiller.train()
    image, target = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    before = distiller.projection.weight.detach().clone()
    logits, losses = distiller(image=image, target=target, epoch=1)
    assert logits.shape == (4, 10) and set(losses) == {"loss_ce", "loss_feat", "loss_kd"}
    loss = sum(losses.values())
    assert torch.isfinite(loss)
    optimizer.zero_grad()
    loss.backward()
    assert distiller.student.patch_embed.proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in distiller.teacher.parameters())
    optimizer.step()
    after = distiller.projection.weight.detach()
    assert not torch.allclose(before, after) and _semi_orthogonality_error(after) < 1e-4


class _TokenModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.pos_embed = nn.Parameter(torch.zeros(1, 4, 8))
        self.linear = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed"}


class _WithTeacher(Distiller):
    declares = Declaration(loss_terms=("loss_ce", "loss_kd"), distillation_terms=("loss_kd",))


class _Alone(Distiller):
    declares = Declaration(loss_terms=("loss_ce",), requires_teacher=False)


def test_adamw_skips_weight_decay_on_biases_norms_and_listed_tokens():
    cfg = default_cfg()
    cfg.SOLVER.TYPE, cfg.SOLVER.LR, cfg.SOLVER.WEIGHT_DECAY = "AdamW", 5e-4, 0.05
    distiller = _WithTeacher(_TokenModel(), nn.Linear(2, 2), cfg)  # the teacher is never optimised
    optimizer = build_optimizer(cfg, distiller)
    assert isinstance(optimizer, torch.optim.AdamW)
    decay, no_decay = optimizer.param_groups
    student = distiller.student
    assert decay["weight_decay"] == 0.05 and [id(p) for p in decay["params"]] == [id(student.linear.weight)]
    assert no_decay["weight_decay"] == 0.0
    assert {id(p) for p in no_decay["params"]} == {id(student.pos_embed), id(student.linear.bias),
                                                   id(student.norm.weight), id(student.norm.bias)}
    assert optimizer.defaults["betas"] == (0.9, 0.999) and optimizer.defaults["eps"] == 1e-8


def test_sgd_is_the_trainers_optimizer_and_other_types_are_refused():
    cfg = default_cfg()
    distiller = _Alone(_TokenModel(), None, cfg)
    optimizer = build_optimizer(cfg, distiller)
    assert isinstance(optimizer, torch.optim.SGD) and len(optimizer.param_groups) == 1
    group = optimizer.param_groups[0]
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (0.05, 0.9, 1e-4)
    assert len(group["params"]) == len(distiller.get_learnable_parameters())
    cfg.SOLVER.TYPE = "LAMB"
    with pytest.raises(MdistillerError, match="SOLVER.TYPE 'LAMB' is not supported; use one of SGD, AdamW"):
        validate_cfg(cfg)
    assert set(OPTIMIZER_BUILDERS) == set(OPTIMIZERS)  # every allowed name has a builder


@needs_timm
def test_the_deit_config_trains_an_epoch_with_its_recipe(tmp_path):
    """The DeiT-Ti VkD config as written (AdamW, cosine with warm-up, timm's DeiT view, Mixup/CutMix + smoothing,
    bf16 autocast) trains one epoch on a tiny ImageFolder at 32 px with a small CNN teacher."""
    from test_imagenet_data import write_imagenet

    from mdistiller.dataset import get_dataset
    from mdistiller.engine.trainer import Trainer
    from mdistiller.rng import set_seed

    root = write_imagenet(str(tmp_path / "data"), n_train=4, n_val=2)
    set_seed(0)  # python's and numpy's RNGs too: timm's RandAugment and Mixup draw from them
    teacher_file = tmp_path / "resnet18-f37072fd.pth"
    torch.save(torchvision.models.resnet18(num_classes=3).state_dict(), teacher_file)
    cfg = load_cfg(str(REPO / "configs/imagenet/deit/deit_tiny_vkd.yaml"), [
        "DATASET.ROOT", root, "DATASET.IMAGE_SIZE", "32", "VKD.INPUT_SIZE", "(32, 32)", "DATASET.NUM_CLASSES", "0",
        "DATASET.NUM_WORKERS", "0", "SOLVER.BATCH_SIZE", "4", "DATASET.TEST.BATCH_SIZE", "6",
        "DISTILLER.TEACHER", "ResNet18", "DISTILLER.TEACHER_CKPT", str(teacher_file),
    ])
    assert cfg.SOLVER.TYPE == "AdamW" and cfg.SOLVER.LR_SCHEDULE == "cosine" and cfg.DATASET.MIXUP.CUTMIX_ALPHA == 1.0
    train, val, num_train, num_classes = get_dataset(cfg, {"image": "standard"}, seed=0)
    transform = repr(train.dataset.views["image"])
    assert "RandAugment" in transform and "RandomErasing" in transform and "bicubic" in transform
    trainer = Trainer(str(tmp_path / "run"), build_distiller(cfg, num_classes), train, val, cfg, torch.device("cpu"))
    seen = []
    trainer.optimizer.register_step_pre_hook(lambda opt, args, kwargs: seen.append(opt.param_groups[0]["lr"]))
    metrics = trainer.train_epoch(1)
    assert len(seen) == 3 and seen[0] < seen[1] < seen[2] < 5e-4 / 5  # warm-up, step by step
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())
