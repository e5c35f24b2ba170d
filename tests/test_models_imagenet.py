"""The ImageNet zoo: torchvision-identical ResNets, mdistiller's MobileNetV1, zoo lookup, teacher files, configs."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from mdistiller.dataset.contrastive import ContrastiveSampler
from mdistiller.distillers import get_distiller_class
from mdistiller.distillers.kdpp import save_centres
from mdistiller.engine.build import build_kwargs, build_model, model_builder, teacher_checkpoint_path
from mdistiller.engine.cfg import default_cfg, load_cfg, validate_cfg
from mdistiller.errors import MdistillerError
from mdistiller.models import imagenet_model_dict

REPO = Path(__file__).resolve().parents[1]
IMAGENET_CONFIGS = sorted((REPO / "configs" / "imagenet").rglob("*.yaml"))
REFERENCE = Path(__file__).parent / "data" / "reference_configs"
HAS_TIMM = importlib.util.find_spec("timm") is not None
VIT_NAMES = {"deit_tiny", "deit_small", "regnety_160"}


def _signature(model: nn.Module) -> dict:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", ["ResNet18", "ResNet34", "ResNet50"])
def test_resnet_state_dict_is_torchvisions(name):
    with torch.device("meta"):
        ours = build_model(name, 1000, "imagenet")
        theirs = getattr(torchvision.models, name.lower())()
    assert list(_signature(ours).items()) == list(_signature(theirs).items())  # same keys, order and shapes


@pytest.mark.parametrize("name", ["ResNet18", "ResNet50"])
def test_torchvision_weights_give_torchvisions_logits(name):
    torch.manual_seed(0)
    theirs = getattr(torchvision.models, name.lower())(num_classes=10).eval()
    for m in theirs.modules():  # non-trivial BN statistics, so eval mode really uses them
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    ours = build_model(name, 10, "imagenet").eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        logits, feats = ours(x)
        expected = theirs(x)
    assert torch.allclose(logits, expected, atol=1e-5)
    channels = [f.shape[1] for f in feats["feats"]]
    assert channels == [64, *ours.get_stage_channels()] and len(feats["preact_feats"]) == 5
    assert [f.shape[-1] for f in feats["feats"]] == [32, 16, 8, 4, 2]  # stem before max-pool, then /4 ... /32
    assert feats["pooled_feat"].shape == (2, ours.get_stage_channels()[-1])
    assert torch.equal(feats["feats"][-1], feats["preact_feats"][-1].relu())
    assert [bn.num_features for bn in ours.get_bn_before_relu()] == ours.get_stage_channels()


def test_mobilenetv1_has_mdistillers_names_and_feature_layout():
    model = build_model("MobileNetV1", 1000, "imagenet").eval()
    keys = list(model.state_dict())
    assert keys[:2] == ["model.0.0.weight", "model.0.1.weight"] and keys[-2:] == ["fc.weight", "fc.bias"]
    assert "model.13.3.weight" in keys and "model.13.4.running_var" in keys and len(keys) == 164
    assert model.state_dict()["model.1.0.weight"].shape == (32, 1, 3, 3)  # depthwise
    with torch.no_grad():
        logits, feats = model(torch.randn(2, 3, 64, 64))
    assert logits.shape == (2, 1000)
    assert [tuple(f.shape[1:]) for f in feats["feats"]] == [(32, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4),
                                                            (1024, 2, 2)]
    assert [f.shape[1] for f in feats["feats"][1:]] == model.get_stage_channels()
    assert torch.equal(feats["feats"][2], feats["preact_feats"][2].relu())
    assert feats["pooled_feat"].shape == (2, 1024)
    assert all(isinstance(bn, nn.BatchNorm2d) for bn in model.get_bn_before_relu())


def test_the_zoo_follows_the_data_set():
    assert hasattr(build_model("ResNet18", 10, "imagenet"), "maxpool")
    assert hasattr(build_model("ResNet18", 10, "cifar100"), "linear")  # the CIFAR zoo's 32x32 ResNet18
    with pytest.raises(MdistillerError, match=r"unknown model 'ResNet19' \(did you mean ResNet18\?\); ImageNet models"):
        model_builder("ResNet19", "imagenet")
    with pytest.raises(MdistillerError, match="unknown model 'MobileNetV1'.*; CIFAR models: "):
        model_builder("MobileNetV1", "cifar100")
    assert set(imagenet_model_dict) >= {"ResNet18", "ResNet34", "ResNet50", "ResNet101", "ResNet152", "MobileNetV1"}


def test_mobilenetv2_on_imagenet_is_mobilenetv1_with_a_one_line_warning(capsys):
    model = build_model("MobileNetV2", 1000, "imagenet")
    assert type(model).__name__ == "MobileNetV1"
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "MobileNetV2 is read as MobileNetV1 on ImageNet" in err


def _imagenet_cfg(teacher: str = "ResNet34"):
    cfg = default_cfg()
    cfg.DATASET.TYPE = "imagenet"
    cfg.DISTILLER.TEACHER = teacher
    return cfg


def test_teacher_files_by_zoo_name_or_torchvisions_published_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "download_ckpts" / "imagenet_teachers"
    with pytest.raises(MdistillerError, match=r"teacher checkpoint not found for ResNet34: put its weights at "
                                              r"download_ckpts/imagenet_teachers/ResNet34\.pth \(or the published "
                                              r"resnet34-b627a593\.pth"):
        teacher_checkpoint_path(_imagenet_cfg())
    folder.mkdir(parents=True)
    (folder / "resnet34-b627a593.pth").write_bytes(b"")
    assert teacher_checkpoint_path(_imagenet_cfg()).endswith("imagenet_teachers/resnet34-b627a593.pth")
    (folder / "ResNet34.pth").write_bytes(b"")
    assert teacher_checkpoint_path(_imagenet_cfg()).endswith("imagenet_teachers/ResNet34.pth")
    (folder / "resnet50-11ad3fa6.pth").write_bytes(b"")  # V2 found when it is the only one
    assert teacher_checkpoint_path(_imagenet_cfg("ResNet50")).endswith("resnet50-11ad3fa6.pth")
    (folder / "resnet50-0676ba61.pth").write_bytes(b"")  # V1 (the tables' teacher) preferred
    assert teacher_checkpoint_path(_imagenet_cfg("ResNet50")).endswith("resnet50-0676ba61.pth")
    with pytest.raises(MdistillerError, match="no teacher file for MobileNetV1: pass DISTILLER.TEACHER_CKPT"):
        teacher_checkpoint_path(_imagenet_cfg("MobileNetV1"))


def test_the_vanilla_run_hint_names_the_file_the_teacher_lookup_reads(tmp_path, monkeypatch):
    """A vanilla run ends by naming `teacher_home`: a student copied there is what a later run loads as teacher."""
    from mdistiller.engine.build import teacher_home

    monkeypatch.chdir(tmp_path)
    home = teacher_home("ResNet34", "imagenet")
    assert home == "download_ckpts/imagenet_teachers/ResNet34.pth"
    Path(home).parent.mkdir(parents=True)
    Path(home).write_bytes(b"")
    assert teacher_checkpoint_path(_imagenet_cfg()).endswith(home)
    assert teacher_home("resnet56", "cifar100") == "download_ckpts/cifar_teachers/resnet56_vanilla/ckpt_epoch_240.pth"


@pytest.mark.slow
def test_a_torchvision_weight_file_loads_as_teacher(tmp_path):
    from mdistiller.engine.build import build_teacher

    torch.manual_seed(0)
    path = tmp_path / "resnet18-f37072fd.pth"
    torch.save(torchvision.models.resnet18(num_classes=5).state_dict(), path)  # torchvision's bare format
    cfg = _imagenet_cfg("ResNet18")
    cfg.DISTILLER.TEACHER_CKPT = str(path)
    teacher = build_teacher(cfg, 5)
    assert teacher.training is False and teacher.fc.out_features == 5
    found = "holds weights of ResNet18 with 5 classes \\(ImageNet zoo\\), not "
    with pytest.raises(MdistillerError, match=found + "ResNet18 \\(7 classes\\)"):
        build_teacher(cfg, 7)
    cfg = _imagenet_cfg("ResNet34")  # a ResNet18 file given for a ResNet34 teacher: the error names both
    cfg.DISTILLER.TEACHER_CKPT = str(path)
    with pytest.raises(MdistillerError, match=found + "ResNet34"):
        build_teacher(cfg, 1000)


@pytest.mark.parametrize("path", IMAGENET_CONFIGS, ids=lambda p: "/".join(p.parts[-2:]))
def test_imagenet_config_loads_and_builds_its_models_on_meta(path):
    cfg = load_cfg(str(path))
    validate_cfg(cfg)
    names = [cfg.DISTILLER.STUDENT] + ([cfg.DISTILLER.TEACHER]
                                       if get_distiller_class(cfg.DISTILLER.TYPE).declares.requires_teacher else [])
    if VIT_NAMES & set(names) and not HAS_TIMM:
        pytest.skip('timm is not installed (pip install -e ".[vit]"): the DeiT/RegNetY models cannot be built')
    assert cfg.DATASET.TYPE == "imagenet" and cfg.DATASET.NUM_CLASSES == 1000
    assert cfg.SOLVER.EPOCHS == (300 if path.parent.name == "deit" else 100)
    if path.parent.name != "deit":
        assert cfg.SOLVER.LR_DECAY_STAGES == [30, 60, 90] and cfg.SOLVER.WEIGHT_DECAY == 1e-4
        # (128, 0.05): upstream's OFD file
        assert (cfg.SOLVER.BATCH_SIZE, cfg.SOLVER.LR) in ((256, 0.1), (512, 0.1), (512, 0.2), (128, 0.05))
    for name in names:
        with torch.device("meta"):
            model = build_model(name, 1000, "imagenet", cfg.DATASET.IMAGE_SIZE)
        assert sum(p.numel() for p in model.parameters()) > 0


def test_every_method_has_both_imagenet_pairs():
    methods = {"kd", "dkd", "mlkd", "ctkd", "wkd_l", "wkd_f", "wkd_lf", "vkd", "at", "reviewkd", "crd", "dot",
               "dist", "wttm", "nkd", "rld", "sdd_kd", "sdd_dkd", "sdd_nkd", "cat_kd", "kdpp", "dkdpp"}
    # TTM: the authors publish ImageNet numbers for WTTM only; USKD has no teacher (configs/imagenet/uskd/)
    only_r50_mv1 = {"ofd"}  # as upstream, which ships no R34 -> R18 OFD file
    for pair in ("r34_r18", "r50_mv1"):
        expected = methods | (only_r50_mv1 if pair == "r50_mv1" else set())
        assert {p.stem for p in (REPO / "configs" / "imagenet" / pair).glob("*.yaml")} == expected


@pytest.mark.parametrize("pair,beta", [("r34_r18", 0.5), ("r50_mv1", 2.0)])
def test_dkd_ctkd_and_mlkd_imagenet_values(pair, beta):
    dkd = load_cfg(str(REPO / "configs/imagenet" / pair / "dkd.yaml")).DKD
    assert (dkd.T, dkd.WARMUP, dkd.ALPHA, dkd.BETA, dkd.CE_WEIGHT) == (1.0, 1, 1.0, beta, 1.0)
    assert load_cfg(str(REPO / "configs/imagenet" / pair / "ctkd.yaml")).CTKD.COSINE_EPOCHS == 5
    ours = load_cfg(str(REPO / "configs/imagenet" / pair / "mlkd.yaml"))
    ls_pair = "r34_r18" if pair == "r34_r18" else "r50_mv2"
    theirs = load_cfg(str(REFERENCE / "logit-standardization-KD/configs/imagenet" / ls_pair / "mlkd.yaml"))
    assert ours.DISTILLER.TYPE == "MLKD" and theirs.DISTILLER.TYPE == "KD_ours"
    assert (ours.SOLVER.BATCH_SIZE, ours.SOLVER.LR, ours.KD) == (theirs.SOLVER.BATCH_SIZE, theirs.SOLVER.LR, theirs.KD)
    kd = load_cfg(str(REPO / "configs/imagenet" / pair / "kd.yaml")).KD
    assert (kd.TEMPERATURE, kd.LOSS.CE_WEIGHT, kd.LOSS.KD_WEIGHT) == (1.0, 0.5, 0.5)


def _leaves(node, prefix=""):
    for key, value in node.items():
        if hasattr(value, "items"):
            yield from _leaves(value, prefix + key + ".")
        else:
            yield prefix + key, value


@pytest.mark.parametrize("pair", ["r34_r18", "r50_mv1"])
@pytest.mark.parametrize("family", ["wkd_l", "wkd_f", "wkd_lf"])
def test_wkd_imagenet_configs_carry_the_authors_values(pair, family):
    ours = load_cfg(str(REPO / "configs/imagenet" / pair / f"{family}.yaml"))
    theirs = load_cfg(str(REFERENCE / "WKD/configs/imagenet" / pair / f"{family}.yaml"))
    assert dict(_leaves(ours.WKD)) | {"INPUT_SIZE": None} == dict(_leaves(theirs.WKD)) | {"INPUT_SIZE": None}
    for key in ("BATCH_SIZE", "EPOCHS", "LR", "LR_DECAY_STAGES", "WEIGHT_DECAY", "MOMENTUM"):
        assert ours.SOLVER[key] == theirs.SOLVER[key], key
    if ours.WKD.LOSS.WKD_FEAT_WEIGHT > 0:
        assert ours.WKD.INPUT_SIZE == (224, 224)  # the dry forward must see ImageNet-sized maps


def test_every_published_imagenet_config_still_loads():
    for path in sorted(REFERENCE.glob("*/configs/imagenet/*/*.yaml")):
        validate_cfg(load_cfg(str(path)))


PAIR_CONFIGS = [p for p in IMAGENET_CONFIGS if p.parent.name != "deit"]  # DeiT: tests/test_vit.py


@pytest.mark.slow
@pytest.mark.parametrize("path", PAIR_CONFIGS, ids=lambda p: "/".join(p.parts[-2:]))
def test_imagenet_config_trains_a_cpu_smoke_step(tmp_path, path):
    """Each method's ImageNet config, with its real student and teacher at 64 px (last maps 2x2: WKD-F needs a
    std over positions) and 10 classes (random weights; the WKD-L cost matrix from the teacher's classifier instead
    of a CKA file), makes one training step on the CPU."""
    from mdistiller.engine.trainer import Trainer

    cfg = load_cfg(str(path), ["DATASET.IMAGE_SIZE", "64", "DATASET.NUM_CLASSES", "10", "WKD.COST_MATRIX", "fc",
                               "WKD.INPUT_SIZE", "(64, 64)", "VKD.INPUT_SIZE", "(64, 64)",
                               # ReviewKD's map sizes at 64 px (its files carry those at 224)
                               "REVIEWKD.SHAPES", "[1,2,4,8,16]", "REVIEWKD.OUT_SHAPES", "[1,2,4,8,16]"])
    distiller_class = get_distiller_class(cfg.DISTILLER.TYPE)
    torch.manual_seed(0)
    student = build_model(cfg.DISTILLER.STUDENT, 10, "imagenet", 64)
    teacher = build_model(cfg.DISTILLER.TEACHER, 10, "imagenet", 64)
    if cfg.DISTILLER.TYPE in ("KDPP", "DKDPP"):  # class centres of this random teacher's embedding size
        with torch.no_grad():
            dim = teacher.eval()(torch.zeros(1, 3, 64, 64))[1]["pooled_feat"].shape[1]
        save_centres(str(tmp_path / "centres.json"), torch.randn(10, dim))
        cfg[cfg.DISTILLER.TYPE].CENTERS = str(tmp_path / "centres.json")
    distiller = distiller_class(student, teacher, cfg, **build_kwargs(distiller_class, num_data=40))
    trainer = Trainer(str(tmp_path), distiller, [], [], cfg, torch.device("cpu"))
    trainer.distiller.train()
    image, target = torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 2, 3])
    batch = {key: image for key in distiller_class.declares.train_views} | {"target": target, "index": torch.arange(4)}
    if "contrastive_index" in distiller_class.batch_needs_of(cfg):  # CRD: rows as the ImageNet folder draws them
        sampler = ContrastiveSampler(torch.arange(40) % 10, cfg.CRD.NCE.K, replacement="always")
        batch["contrastive_index"] = sampler.draw(batch["index"], target)
    before = [p.detach().clone() for p in trainer.distiller.student.parameters()]
    logits, losses = trainer.train_step(batch, 1)
    assert logits.shape == (4, 10) and losses and all(torch.isfinite(term) for term in losses.values())
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.distiller.student.parameters()))
