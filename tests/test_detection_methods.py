"""The detection distillers (RCNN_NONE / RCNN_DKD / RCNN_REVIEWKD / RCNN_REVIEWDKD) and the detectors built from the
config: the teacher's input (upstream's channel quirk), the wiring of loss_dkd and loss_reviewkd recomputed by hand
from the same sampled proposals, the frozen teacher, training steps, and the weights files (torchvision, bundled,
caffe2, detectron2 .pkl, converted) written here in their formats (spec detection.md, test plan items 3-6, 8)."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch
import torchvision
from test_detection_weights import to_detectron2_weights, write_pkl
from torchvision.ops.misc import FrozenBatchNorm2d

import mdistiller.detection  # noqa: F401  (registers the RCNN_* methods and their sections)
from mdistiller.cli import convert_detectron2 as convert_tool
from mdistiller.detection.detector import Detector, build_student, build_teacher, model_inputs
from mdistiller.detection.distill import dkd_roi_loss, reviewkd_fpn_loss
from mdistiller.detection.methods import RCNNDKD, RCNNNone, RCNNReviewDKD, detector_targets, teacher_inputs
from mdistiller.detection.models import (
    build_detection_student,
    build_detection_teacher,
    check_detection_models,
    teacher_weights_path,
)
from mdistiller.distillers import distiller_dict, get_distiller_class, method_sections
from mdistiller.distillers.config import to_cfgnode
from mdistiller.engine.cfg import default_cfg
from mdistiller.errors import MdistillerError

pytestmark = pytest.mark.usefixtures("one_thread")

TASK = ("loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg")
METHODS = {"RCNN_NONE": TASK, "RCNN_DKD": TASK + ("loss_dkd",), "RCNN_REVIEWKD": TASK + ("loss_reviewkd",),
           "RCNN_REVIEWDKD": TASK + ("loss_dkd", "loss_reviewkd")}
D2_MEAN_BGR = (103.53, 116.28, 123.675)


def make_cfg(method: str = "RCNN_DKD", student: str = "R18-FPN", teacher: str = "R50-FPN", **keys):
    """The defaults with the detection sections (present once the engine imports mdistiller.detection first)."""
    cfg = default_cfg()
    for name in ("RCNN_DKD", "RCNN_REVIEWKD"):
        if name not in cfg:
            cfg[name] = to_cfgnode(method_sections()[name])
    cfg.DISTILLER.TYPE, cfg.DISTILLER.STUDENT, cfg.DISTILLER.TEACHER = method, student, teacher
    for key, value in keys.items():
        section, name = key.split("__")
        cfg[section][name] = value
    return cfg


def batch():
    """Two tiny RGB uint8 images (64x96, 96x64) with one box each (labels 0 and 79, the loaders' 0..79)."""
    a = torch.full((3, 64, 96), 50, dtype=torch.uint8)
    a[0, 10:50, 20:70] = 230
    a[1, 10:50, 20:70] = 30
    b = torch.full((3, 96, 64), 120, dtype=torch.uint8)
    b[:, 30:90, 5:45] = 10
    targets = [{"boxes": torch.tensor([[20.0, 10.0, 70.0, 50.0]]), "labels": torch.tensor([0])},
               {"boxes": torch.tensor([[5.0, 30.0, 45.0, 90.0]]), "labels": torch.tensor([79])}]
    return [a, b], targets


def one_line(fn, *args, **kwargs) -> str:
    with pytest.raises(MdistillerError) as info:
        fn(*args, **kwargs)
    assert "\n" not in str(info.value)
    return str(info.value)


def models(student: str = "R18", teacher: str = "R50", seed: int = 0) -> tuple[Detector, Detector]:
    """Random detectors. The random teacher's FPN maps are ~2000 (0-255 input, identity FrozenBN, 50 layers); its
    body is positively homogeneous (no biases before the FPN), so its stem scaled by 1/500 scales them to ~4, the
    student's order, as a trained teacher's would be: HCL and the teacher logits stay in a trainable range. A random
    R50 student (the same 0-255 input) likewise."""
    torch.manual_seed(seed)
    student, teacher = build_student(student, None), build_teacher(teacher, None)
    with torch.no_grad():
        teacher.backbone.body.conv1.weight.mul_(1 / 500)
        if student.arch == "R50":
            student.backbone.body.conv1.weight.mul_(1 / 500)
    return student, teacher


# ---- registry ----------------------------------------------------------------------------------------------------


def test_the_four_methods_are_registered_with_their_declarations_and_sections() -> None:
    for name, terms in METHODS.items():
        declares = get_distiller_class(name).declares
        assert declares.task == "detection"
        assert declares.loss_terms == terms
        assert set(declares.distillation_terms) == set(terms) - set(TASK)
        assert declares.requires_teacher == (name != "RCNN_NONE")
        assert declares.extra_modules == (("kd_trans",) if "REVIEW" in name else ())
    assert distiller_dict["RCNN_REVIEWDKD"].declares.config_sections == ("RCNN_DKD", "RCNN_REVIEWKD")
    cfg = make_cfg()
    assert (cfg.RCNN_DKD.ALPHA, cfg.RCNN_DKD.BETA, cfg.RCNN_DKD.T, cfg.RCNN_REVIEWKD.LOSS_WEIGHT) == (1.0, 0.25, 1.0,
                                                                                                      1.0)
    assert RCNNReviewDKD.from_config(make_cfg(RCNN_REVIEWKD__LOSS_WEIGHT=1.2)) == {
        "alpha": 1.0, "beta": 0.25, "temperature": 1.0, "loss_weight": 1.2, "teacher_flip_before_normalize": False}
    assert RCNNNone.from_config(make_cfg()) == {}


def test_out_of_range_hyperparameters_are_refused_in_one_line() -> None:
    assert "RCNN_DKD.T 0.0 must be a finite number > 0" in one_line(RCNNDKD.from_config, make_cfg(RCNN_DKD__T=0.0))
    assert "RCNN_DKD.ALPHA -1.0" in one_line(RCNNDKD.from_config, make_cfg(RCNN_DKD__ALPHA=-1.0))
    assert "RCNN_DKD.BETA nan" in one_line(RCNNReviewDKD.from_config, make_cfg(RCNN_DKD__BETA=float("nan")))
    assert "RCNN_REVIEWKD.LOSS_WEIGHT -0.5" in one_line(
        get_distiller_class("RCNN_REVIEWKD").from_config, make_cfg(RCNN_REVIEWKD__LOSS_WEIGHT=-0.5))
    student, teacher = models()
    assert "RCNN_DKD.T -1.0" in one_line(RCNNDKD, student, teacher, alpha=1.0, beta=0.25, temperature=-1.0)
    with pytest.raises(TypeError):  # a hyperparameter the method does not read
        RCNNNone(student, None, alpha=1.0)
    assert "trains a detection student" in one_line(RCNNNone, torch.nn.Linear(2, 2))


# ---- models from the config ------------------------------------------------------------------------------------


def test_unknown_model_names_and_mask_on_are_refused_in_one_line() -> None:
    assert "did you mean R18-FPN?" in one_line(check_detection_models, make_cfg(student="R18-PFN"))
    assert "did you mean R101-FPN?" in one_line(check_detection_models, make_cfg(teacher="R101"))
    check_detection_models(make_cfg("RCNN_NONE", teacher="ResNet50"))  # no teacher: its name is not read
    assert "not a detection teacher" in one_line(check_detection_models, make_cfg("RCNN_DKD", teacher="ResNet50"))
    assert "MASK_ON" in one_line(check_detection_models, make_cfg(DETECTION__MASK_ON=True))
    assert "not a detection student" in one_line(build_detection_student, make_cfg(student="MV3-FPN"))
    assert "not a detection teacher" in one_line(build_detection_teacher, make_cfg(teacher="R18-FPN"), True)


def test_a_teacher_needs_a_local_checkpoint(tmp_path) -> None:
    message = one_line(teacher_weights_path, make_cfg())
    assert "DISTILLER.TEACHER_CKPT" in message and "docs/detectron2_teachers.md" in message
    assert "tools/convert_detectron2.py" in message
    missing = str(tmp_path / "nope.pkl")
    message = one_line(build_detection_teacher, make_cfg(DISTILLER__TEACHER_CKPT=missing))
    assert f"{missing} not found" in message and "docs/detectron2_teachers.md" in message


def _random_detector_state(model: Detector, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(v.shape, generator=gen) for k, v in model.state_dict().items()}
    for field in ("weight", "bias"):  # background's deltas, which detectron2 does not have: zeros after conversion
        state[f"roi_heads.box_predictor.bbox_pred.{field}"][:4] = 0.0
    return state


@pytest.fixture(scope="module")
def r50_teacher_pkl(tmp_path_factory):
    """(random R50-FPN detector weights in the detector's names, their detectron2 model-zoo .pkl)."""
    state = _random_detector_state(build_teacher("R50", None), 11)
    d2 = to_detectron2_weights(state)
    d2["roi_heads.mask_head.mask_fcn1.weight"] = np.zeros((256, 256, 3, 3), np.float32)  # a Mask R-CNN teacher
    path = write_pkl(tmp_path_factory.mktemp("teacher") / "model_final_280758.pkl", d2)
    return state, path


def _assert_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    got = model.state_dict()
    assert set(got) == set(state)
    for name, value in state.items():
        assert torch.equal(got[name], value), name


def test_teacher_from_a_detectron2_pkl_loads_strictly_frozen_in_eval(r50_teacher_pkl) -> None:
    state, path = r50_teacher_pkl
    teacher = build_detection_teacher(make_cfg(DISTILLER__TEACHER_CKPT=path))
    _assert_state(teacher, state)  # the mask head dropped, background moved first, names mapped
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert teacher.pretrained_source == f"detectron2 checkpoint {path}"
    message = one_line(build_detection_teacher, make_cfg(teacher="R101-FPN", DISTILLER__TEACHER_CKPT=path))
    assert "holds R-50-FPN weights, DISTILLER.TEACHER is R101-FPN" in message


def test_teacher_from_upstreams_bundled_pth_and_from_our_converted_file(r50_teacher_pkl, tmp_path) -> None:
    state, path = r50_teacher_pkl
    with open(path, "rb") as f:
        d2 = pickle.load(f)["model"]
    bundled = {f"teacher.{k}": torch.from_numpy(v) for k, v in d2.items()}
    bundled["backbone.bottom_up.stem.conv1.weight"] = torch.zeros(64, 3, 7, 7)  # the student's, ignored here
    torch.save({"model": bundled}, tmp_path / "mv2-r50.pth")
    teacher = build_detection_teacher(make_cfg(DISTILLER__TEACHER_CKPT=str(tmp_path / "mv2-r50.pth")))
    _assert_state(teacher, state)
    assert teacher.pretrained_source.startswith("upstream's bundled teacher")
    # tools/convert_detectron2.py --rgb reverses the stem's input channels; the teacher gets them back (BGR input)
    out = str(tmp_path / "converted_rgb.pth")
    convert_tool.main([path, "-o", out, "--rgb", "--drop-mask-head"])
    assert torch.equal(torch.load(out)["model"]["backbone.body.conv1.weight"],
                       state["backbone.body.conv1.weight"].flip(1))
    teacher = build_detection_teacher(make_cfg(DISTILLER__TEACHER_CKPT=out))
    _assert_state(teacher, state)
    assert teacher.input_format == "BGR"
    message = one_line(build_detection_teacher, make_cfg(teacher="R101-FPN", DISTILLER__TEACHER_CKPT=out))
    assert "R-50-FPN weights" in message
    torch.save({"model": {"fc.weight": torch.zeros(2, 2)}}, tmp_path / "other.pth")
    assert "no detector weights" in one_line(build_detection_teacher,
                                             make_cfg(DISTILLER__TEACHER_CKPT=str(tmp_path / "other.pth")))


def _tv_resnet_state(name: str, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = getattr(torchvision.models, name)(weights=None)
    with torch.no_grad():  # non-trivial BN statistics, so a FrozenBN loaded from them is tested
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model.state_dict()


def test_student_backbone_from_torchvision_state_dicts(tmp_path) -> None:
    assert build_detection_student(make_cfg()).pretrained_source is None  # empty: random
    tv = _tv_resnet_state("resnet18", 1)
    torch.save(tv, tmp_path / "resnet18.pth")
    student = build_detection_student(make_cfg(DETECTION__STUDENT_WEIGHTS=str(tmp_path / "resnet18.pth")))
    body = student.backbone.body.state_dict()
    assert len(body) == len([k for k in tv if not k.startswith("fc.") and not k.endswith("num_batches_tracked")])
    for name, value in body.items():
        assert torch.equal(value, tv[name]), name
    assert student.input_format == "RGB" and student.pixel_std == (57.375, 57.120, 58.395)  # upstream's R18 input
    assert "torchvision ResNet" in student.pretrained_source

    # ResNet-50: torchvision's stride placement and input come back, so the body computes torchvision's features
    tv50 = torchvision.models.resnet50(weights=None)
    tv50.load_state_dict(_tv_resnet_state("resnet50", 2))
    torch.save(tv50.state_dict(), tmp_path / "resnet50.pth")
    student = build_detection_student(make_cfg(student="R50-FPN",
                                               DETECTION__STUDENT_WEIGHTS=str(tmp_path / "resnet50.pth")))
    assert student.backbone.body.layer2[0].conv1.stride == (1, 1) and student.backbone.body.layer2[0].conv2.stride \
        == (2, 2)
    assert student.input_format == "RGB" and student.pixel_mean == (123.675, 116.280, 103.530)
    x = torch.randn(1, 3, 64, 64)
    tv50.eval()
    with torch.no_grad():
        want = tv50.layer4(tv50.layer3(tv50.layer2(tv50.layer1(tv50.maxpool(tv50.relu(tv50.bn1(tv50.conv1(x))))))))
        torch.testing.assert_close(student.backbone.body(x)["3"], want, rtol=1e-4, atol=1e-4)

    mv2 = torchvision.models.mobilenet_v2(weights=None).state_dict()
    torch.save(mv2, tmp_path / "mv2.pth")
    student = build_detection_student(make_cfg(student="MV2-FPN", DETECTION__STUDENT_WEIGHTS=str(tmp_path / "mv2.pth")))
    body = student.backbone.body.state_dict()
    for name, value in body.items():
        assert torch.equal(value, mv2[f"features.{name}"]), name
    assert student.input_format == "RGB" and "deviation" in student.pretrained_source

    message = one_line(build_detection_student, make_cfg(DETECTION__STUDENT_WEIGHTS=str(tmp_path / "resnet50.pth")))
    assert "does not fit the R18-FPN backbone" in message
    torch.save({"foo.weight": torch.zeros(1)}, tmp_path / "foo.pth")
    assert "not a format read here" in one_line(
        build_detection_student, make_cfg(DETECTION__STUDENT_WEIGHTS=str(tmp_path / "foo.pth")))
    assert "not found" in one_line(build_detection_student,
                                   make_cfg(DETECTION__STUDENT_WEIGHTS=str(tmp_path / "none.pth")))


def test_student_backbone_from_upstreams_bundled_pth(tmp_path) -> None:
    reference = build_student("R18", None)
    state = _random_detector_state(reference, 3)
    body = {k: v for k, v in state.items() if k.startswith("backbone.body.")}
    d2 = {name: torch.from_numpy(v) for name, v in to_detectron2_weights(body).items()}
    bundled = {**d2, "teacher.backbone.bottom_up.stem.conv1.weight": torch.zeros(64, 3, 7, 7)}
    torch.save({"model": bundled}, tmp_path / "r18-r101.pth")
    student = build_detection_student(make_cfg(DETECTION__STUDENT_WEIGHTS=str(tmp_path / "r18-r101.pth")))
    for name, value in student.backbone.body.state_dict().items():
        assert torch.equal(value, body[f"backbone.body.{name}"]), name
    assert student.pretrained_source.startswith("upstream's bundled student backbone")
    torch.save({"model": {**bundled, "backbone.fpn_lateral2.weight": torch.zeros(256, 64, 1, 1)}},
               tmp_path / "with_fpn.pth")
    assert "outside the backbone" in one_line(
        build_detection_student, make_cfg(DETECTION__STUDENT_WEIGHTS=str(tmp_path / "with_fpn.pth")))
    assert "MobileNetV2" in one_line(build_detection_student, make_cfg(
        student="MV2-FPN", DETECTION__STUDENT_WEIGHTS=str(tmp_path / "r18-r101.pth")))


def test_student_r50_from_msra_caffe2_blobs(tmp_path) -> None:
    """MSRA's R-50.pkl: {'blobs': {caffe2 name: array}}, affine norms (scale, bias), momenta and the classifier."""
    gen = np.random.default_rng(5)
    blobs, expected = {}, {}
    body = build_student("R50", None).backbone.body

    def add(c2: str, tv: str, shape) -> None:
        value = gen.standard_normal(shape).astype(np.float32)
        blobs[c2] = value
        expected[tv] = torch.from_numpy(value)

    add("conv1_w", "conv1.weight", (64, 3, 7, 7))
    add("res_conv1_bn_s", "bn1.weight", (64,))
    add("res_conv1_bn_b", "bn1.bias", (64,))
    for layer, blocks in enumerate((3, 4, 6, 3), start=1):
        for b in range(blocks):
            block = getattr(body, f"layer{layer}")[b]
            for branch, conv, bn in (("2a", "conv1", "bn1"), ("2b", "conv2", "bn2"), ("2c", "conv3", "bn3")):
                prefix = f"res{layer + 1}_{b}_branch{branch}"
                add(f"{prefix}_w", f"layer{layer}.{b}.{conv}.weight", tuple(getattr(block, conv).weight.shape))
                add(f"{prefix}_bn_s", f"layer{layer}.{b}.{bn}.weight", (getattr(block, conv).out_channels,))
                add(f"{prefix}_bn_b", f"layer{layer}.{b}.{bn}.bias", (getattr(block, conv).out_channels,))
                blobs[f"{prefix}_w_momentum"] = np.zeros(1, np.float32)
            if b == 0:
                prefix = f"res{layer + 1}_0_branch1"
                add(f"{prefix}_w", f"layer{layer}.0.downsample.0.weight", tuple(block.downsample[0].weight.shape))
                add(f"{prefix}_bn_s", f"layer{layer}.0.downsample.1.weight", (block.downsample[0].out_channels,))
                add(f"{prefix}_bn_b", f"layer{layer}.0.downsample.1.bias", (block.downsample[0].out_channels,))
    blobs["pred_w"], blobs["pred_b"] = np.zeros((1000, 2048), np.float32), np.zeros(1000, np.float32)
    with open(tmp_path / "R-50.pkl", "wb") as f:
        pickle.dump({"blobs": blobs}, f, protocol=2)
    student = build_detection_student(make_cfg(student="R50-FPN",
                                               DETECTION__STUDENT_WEIGHTS=str(tmp_path / "R-50.pkl")))
    loaded = student.backbone.body.state_dict()
    for name, value in expected.items():
        assert torch.equal(loaded[name], value), name
    stats = [n for n in loaded if n.endswith(("running_mean", "running_var"))]
    assert len(stats) == 2 * 53 and len(loaded) == len(expected) + len(stats)
    assert all(torch.equal(loaded[n], torch.zeros_like(loaded[n]) if n.endswith("mean") else torch.ones_like(loaded[n]))
               for n in stats)
    assert student.input_format == "BGR" and student.backbone.body.layer2[0].conv1.stride == (2, 2)  # MSRA's
    assert "MSRA caffe2" in student.pretrained_source
    assert "fits R50-FPN, not R18-FPN" in one_line(
        build_detection_student, make_cfg(DETECTION__STUDENT_WEIGHTS=str(tmp_path / "R-50.pkl")))


# ---- inputs ------------------------------------------------------------------------------------------------------


def _constant(a: int, b: int, c: int, h: int = 40, w: int = 70) -> torch.Tensor:
    return torch.tensor([a, b, c], dtype=torch.uint8).view(3, 1, 1).expand(3, h, w).contiguous()


def test_student_and_teacher_inputs_of_a_constant_rgb_image() -> None:
    a, b, c = 10, 200, 90
    image = [_constant(a, b, c)]
    r18, r50 = build_student("R18", None), build_student("R50", None)
    mv2, teacher = build_student("MV2", None), build_teacher("R50", None)
    pixel = lambda il: il.tensors[0, :, 5, 5].tolist()  # noqa: E731
    s18 = model_inputs(r18, image)
    assert s18.tensors.shape == (1, 3, 64, 96) and s18.image_sizes == [(40, 70)]
    assert pixel(s18) == pytest.approx([(a - 103.53) / 57.375, (b - 116.28) / 57.12, (c - 123.675) / 58.395])
    quirk = teacher_inputs(teacher, image, r18.input_format)
    assert quirk.tensors.shape == s18.tensors.shape and quirk.image_sizes == s18.image_sizes
    assert pixel(quirk) == pytest.approx([c - 123.675, b - 116.28, a - 103.53])  # R and B means swapped
    correct = teacher_inputs(teacher, image, r18.input_format, flip_before_normalize=True)
    assert pixel(correct) == pytest.approx([c - 103.53, b - 116.28, a - 123.675])
    assert quirk.tensors[0, :, 40:].abs().sum() == 0 and quirk.tensors[0, :, :, 70:].abs().sum() == 0  # zero padding
    for student in (r50, mv2):  # BGR students: the teacher sees exactly the student's input
        s = model_inputs(student, image)
        assert pixel(s) == pytest.approx([c - 103.53, b - 116.28, a - 123.675])
        for flip in (False, True):
            assert torch.equal(teacher_inputs(teacher, image, student.input_format, flip).tensors, s.tensors)


@pytest.mark.parametrize("flip", [False, True])
def test_the_distiller_feeds_its_teacher_the_configured_input(flip) -> None:
    student, teacher = models()
    cfg = make_cfg("RCNN_DKD", DETECTION__TEACHER_FLIP_BEFORE_NORMALIZE=flip)
    distiller = RCNNDKD(student, teacher, cfg).train()
    seen = []
    teacher.backbone.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    image = _constant(10, 200, 90, 64, 96)
    distiller(images=[image], targets=[{"boxes": torch.tensor([[10.0, 10.0, 50.0, 40.0]]),
                                        "labels": torch.tensor([3])}], epoch=1)
    assert len(seen) == 1 and seen[0].shape == (1, 3, 64, 96)
    want = [90 - 103.53, 200 - 116.28, 10 - 123.675] if flip else [90 - 123.675, 200 - 116.28, 10 - 103.53]
    assert seen[0][0, :, 7, 9].tolist() == pytest.approx(want)


def test_labels_become_background_first_on_a_copy() -> None:
    _, targets = batch()
    moved = detector_targets(targets)
    assert [t["labels"].tolist() for t in moved] == [[1], [80]]
    assert [t["labels"].tolist() for t in targets] == [[0], [79]]
    assert moved[0]["boxes"] is targets[0]["boxes"]


# ---- wiring ------------------------------------------------------------------------------------------------------


def _by_hand(distiller, images, targets, seed: int):
    """The student's training step (same random draws as the distiller's) and the teacher's FPN on its input
    computed by hand: the quirk for an RGB student, padded to /32 with zeros."""
    student, teacher = distiller.student, distiller.teacher
    torch.manual_seed(seed)
    student_in = model_inputs(student, images)
    out = student.train_forward(student_in, [{**t, "labels": t["labels"] + 1} for t in targets])
    padded = torch.zeros_like(student_in.tensors)
    for i, im in enumerate(images):
        im = im.float()
        rows = torch.stack([im[2] - 123.675, im[1] - 116.28, im[0] - 103.53])
        padded[i, :, : im.shape[1], : im.shape[2]] = rows
    with torch.no_grad():
        teacher_features = teacher.backbone(padded)
    return student_in, out, teacher_features


def test_loss_dkd_is_dkd_of_the_teachers_box_head_on_the_students_sampled_proposals() -> None:
    student, teacher = models(seed=1)
    distiller = RCNNDKD(student, teacher, make_cfg("RCNN_DKD", RCNN_DKD__BETA=0.5, RCNN_DKD__T=2.0)).train()
    images, targets = batch()
    torch.manual_seed(7)
    _, losses = distiller(images=images, targets=targets, epoch=1)
    assert tuple(losses) == METHODS["RCNN_DKD"]
    student_in, out, teacher_features = _by_hand(distiller, images, targets, 7)
    for name in TASK:
        assert torch.equal(losses[name], out.losses[name]), name
    labels = out.sample.labels
    assert {1, 80} <= set(labels.tolist()) and 0 in labels.tolist()  # the GT classes, moved, and background
    heads = teacher.roi_heads
    with torch.no_grad():
        pooled = heads.box_roi_pool(teacher_features, out.sample.proposals, student_in.image_sizes)
        teacher_logits = heads.box_predictor(heads.box_head(pooled))[0]
    assert teacher_logits.shape == (labels.numel(), 81)
    want = dkd_roi_loss(out.sample.class_logits, teacher_logits, labels, 1.0, 0.5, 2.0)
    torch.testing.assert_close(losses["loss_dkd"], want, rtol=1e-5, atol=1e-6)
    assert losses["loss_dkd"].item() > 0
    assert losses["loss_dkd"].item() != pytest.approx(
        dkd_roi_loss(out.sample.class_logits, teacher_logits, labels, 1.0, 0.25, 1.0).item(), rel=1e-3)


def test_reviewdkd_has_both_terms_on_one_teacher_forward() -> None:
    student, teacher = models(seed=2)
    distiller = RCNNReviewDKD(student, teacher, make_cfg("RCNN_REVIEWDKD", RCNN_REVIEWKD__LOSS_WEIGHT=1.2)).train()
    assert distiller.get_extra_parameters() == 3_286_024
    assert [name for name, _ in distiller.named_extra_modules()] == ["kd_trans"]
    calls = []
    teacher.backbone.register_forward_hook(lambda *args: calls.append(1))
    images, targets = batch()
    torch.manual_seed(8)
    _, losses = distiller(images=images, targets=targets, epoch=3)
    assert tuple(losses) == METHODS["RCNN_REVIEWDKD"] and len(calls) == 1
    _, out, teacher_features = _by_hand(distiller, images, targets, 8)
    names = ("0", "1", "2", "3", "pool")
    want = reviewkd_fpn_loss(distiller.kd_trans([out.features[n] for n in names]),
                             [teacher_features[n] for n in names], 1.2)
    torch.testing.assert_close(losses["loss_reviewkd"], want, rtol=1e-5, atol=0)
    # the total the trainer backpropagates is the plain sum: kd_trans' gradient is loss_reviewkd's alone
    sum(losses.values()).backward()
    total_grad = distiller.kd_trans.abfs[4].conv1[0].weight.grad.clone()
    distiller.zero_grad(set_to_none=True)
    torch.manual_seed(8)
    _, again = distiller(images=images, targets=targets, epoch=3)
    again["loss_reviewkd"].backward()
    torch.testing.assert_close(distiller.kd_trans.abfs[4].conv1[0].weight.grad, total_grad)


def test_the_teacher_stays_frozen_and_kd_trans_trains() -> None:
    student, teacher = models(seed=3)
    distiller = RCNNReviewDKD(student, teacher, make_cfg("RCNN_REVIEWDKD")).train()
    assert not teacher.training and distiller.training
    learnable = {id(p) for p in distiller.get_learnable_parameters()}
    assert not learnable & {id(p) for p in teacher.parameters()}
    assert {id(p) for p in distiller.kd_trans.parameters()} <= learnable
    assert not learnable & {id(p) for p in student.backbone.body.layer1.parameters()}
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student_before = {k: v.clone() for k, v in student.state_dict().items()}
    frozen_bn = [f"backbone.body.{n}.{f}" for n, m in student.backbone.body.named_modules()
                 if isinstance(m, FrozenBatchNorm2d) for f in ("weight", "bias", "running_mean", "running_var")]
    stem_res2 = [k for k in student_before if k.startswith(("backbone.body.conv1.", "backbone.body.layer1."))]
    images, targets = batch()
    opt = torch.optim.SGD(distiller.get_learnable_parameters(), lr=1e-3, momentum=0.9)
    _, losses = distiller(images=images, targets=targets, epoch=1)
    sum(losses.values()).backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in distiller.kd_trans.parameters())
    opt.step()
    for name, value in teacher.state_dict().items():
        assert torch.equal(value, teacher_before[name]), name
    after = student.state_dict()
    for name in frozen_bn + stem_res2:
        assert torch.equal(after[name], student_before[name]), name
    assert not torch.equal(after["backbone.fpn.inner_blocks.0.0.weight"], student_before[
        "backbone.fpn.inner_blocks.0.0.weight"])
    teacher_in = teacher_inputs(teacher, images, "RGB")
    with torch.no_grad():
        eval_maps = teacher.backbone(teacher_in.tensors)
        teacher.train()
        train_maps = teacher.backbone(teacher_in.tensors)
    teacher.eval()
    assert all(torch.equal(eval_maps[k], train_maps[k]) for k in eval_maps)  # FrozenBN, no dropout


# ---- training and eval forwards ----------------------------------------------------------------------------------


@pytest.mark.parametrize("method,student_arch", [
    # RCNN_DKD's names and value are checked by the wiring test; every method x student pair also trains through
    # tools/train.py in test_detection_recipes.py (each configs/coco recipe)
    ("RCNN_NONE", "R18"), ("RCNN_REVIEWKD", "R18"), ("RCNN_REVIEWDKD", "R18")])
def test_training_steps_give_finite_losses_with_the_declared_names(method, student_arch) -> None:
    student, teacher = models(student_arch, "R50", seed=4)
    cls = get_distiller_class(method)
    distiller = cls(student, teacher, make_cfg(method, student=f"{student_arch}-FPN")).train()
    opt = torch.optim.SGD(distiller.get_learnable_parameters(), lr=1e-3, momentum=0.9)
    images, targets = batch()
    for step in range(2):
        opt.zero_grad()
        out, losses = distiller(images=images, targets=targets, epoch=step + 1)
        assert out is None and tuple(losses) == cls.declares.loss_terms
        assert all(v.dim() == 0 and math.isfinite(v.item()) for v in losses.values()), losses
        sum(losses.values()).backward()
        opt.step()
    distiller.eval()
    with torch.no_grad():
        detections = distiller(images=images, targets=targets)
    assert len(detections) == 2 and not teacher.training
    for det in detections:
        assert set(det) == {"boxes", "scores", "labels"}
        assert det["labels"].numel() == 0 or (det["labels"].min() >= 1 and det["labels"].max() <= 80)
