"""detectron2 model-zoo weights -> torchvision FasterRCNN: a synthetic model-zoo `.pkl` is made from a torchvision
model by an inverse name map written here independently (string edits, not the module's regexes), converted back and
compared tensor by tensor; bad files are refused in one line; a malicious pickle runs nothing."""

from __future__ import annotations

import io
import os
import pickle
import struct

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mdistiller.cli import convert_detectron2 as tool
from mdistiller.cli import run_cli
from mdistiller.detection.detectron2_weights import (
    build_torchvision_faster_rcnn,
    check_against_model,
    convert_detectron2_state_dict,
    infer_depth,
    load_detectron2_faster_rcnn,
    read_detectron2_checkpoint,
)
from mdistiller.errors import MdistillerError

from detectron2_files import random_state_dict, to_detectron2_name, to_detectron2_weights, write_pkl


@pytest.fixture(scope="module")
def r18(tmp_path_factory):
    """(torchvision weights, detectron2 weights, model-zoo .pkl path) of a random R18-FPN."""
    tv = random_state_dict(18)
    d2 = to_detectron2_weights(tv)
    d2_with_extras = {**d2, "pixel_mean": np.zeros((3, 1, 1), np.float32),
                      "proposal_generator.anchor_generator.cell_anchors.0": np.zeros((3, 4), np.float32)}
    path = write_pkl(tmp_path_factory.mktemp("d2") / "model_final.pkl", d2_with_extras)
    return tv, d2, path


@pytest.fixture(scope="module")
def r18_loaded(r18):
    """load_detectron2_faster_rcnn of the R18 fixture's .pkl: (model, converted state dict, depth)."""
    return load_detectron2_faster_rcnn(r18[2])


def one_line_error(fn, *args, **kwargs) -> str:
    with pytest.raises(MdistillerError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_tensor_counts_match_the_spec():
    for depth, count in ((18, 130), (50, 295), (101, 550)):
        assert len(build_torchvision_faster_rcnn(depth).state_dict()) == count


def test_inverse_map_covers_every_name_once():
    sd = build_torchvision_faster_rcnn(50).state_dict()
    names = {to_detectron2_name(k) for k in sd}
    assert len(names) == len(sd) == 295
    for expected in ("backbone.bottom_up.res2.0.shortcut.norm.running_var", "backbone.bottom_up.res5.2.conv3.weight",
                     "backbone.fpn_lateral5.bias", "backbone.fpn_output2.weight",
                     "proposal_generator.rpn_head.anchor_deltas.weight", "roi_heads.box_head.fc1.weight"):
        assert expected in names


def test_pkl_round_trip_every_tensor_equal_and_strict_load(r18, r18_loaded):
    tv, _, _ = r18
    model, converted, depth = r18_loaded
    assert depth == 18 and set(converted) == set(tv)
    for name, value in converted.items():
        if name.startswith("roi_heads.box_predictor.bbox_pred."):
            assert torch.equal(value[4:], tv[name][4:]) and not value[:4].any(), name
        else:
            assert torch.equal(value, tv[name]), name
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], converted[k]) for k in converted)


def test_class_rows_reordered_by_hand(r18, r18_loaded):
    _, d2, _ = r18
    _, sd, _ = r18_loaded
    for field in ("weight", "bias"):
        score = sd[f"roi_heads.box_predictor.cls_score.{field}"]
        d2_score = torch.from_numpy(d2[f"roi_heads.box_predictor.cls_score.{field}"])
        assert score.shape[0] == d2_score.shape[0] == 81
        assert torch.equal(score[0], d2_score[80])  # background: detectron2's last row -> torchvision label 0
        assert torch.equal(score[1], d2_score[0])  # detectron2 class 0 -> label 1
        assert torch.equal(score[17], d2_score[16])
        assert torch.equal(score[80], d2_score[79])
        deltas = sd[f"roi_heads.box_predictor.bbox_pred.{field}"]
        d2_deltas = torch.from_numpy(d2[f"roi_heads.box_predictor.bbox_pred.{field}"])
        assert deltas.shape[0] == 324 and d2_deltas.shape[0] == 320
        assert not deltas[0:4].any()  # background deltas: zeros
        assert torch.equal(deltas[4:8], d2_deltas[0:4])  # label 1 = detectron2 class 0
        assert torch.equal(deltas[4 * 17:4 * 18], d2_deltas[4 * 16:4 * 17])
        assert torch.equal(deltas[320:324], d2_deltas[316:320])


def test_frozen_bn_buffers_and_fpn_rpn_names_by_hand(r18, r18_loaded):
    _, d2, _ = r18
    _, sd, _ = r18_loaded
    pairs = {
        "backbone.body.bn1.running_var": "backbone.bottom_up.stem.conv1.norm.running_var",
        "backbone.body.layer3.1.bn2.weight": "backbone.bottom_up.res4.1.conv2.norm.weight",
        "backbone.body.layer2.0.downsample.1.running_mean": "backbone.bottom_up.res3.0.shortcut.norm.running_mean",
        "backbone.fpn.inner_blocks.3.0.weight": "backbone.fpn_lateral5.weight",
        "backbone.fpn.layer_blocks.0.0.bias": "backbone.fpn_output2.bias",
        "rpn.head.conv.0.0.weight": "proposal_generator.rpn_head.conv.weight",
        "rpn.head.cls_logits.bias": "proposal_generator.rpn_head.objectness_logits.bias",
        "roi_heads.box_head.fc7.weight": "roi_heads.box_head.fc2.weight",
    }
    for tv_name, d2_name in pairs.items():
        assert torch.equal(sd[tv_name], torch.from_numpy(d2[d2_name])), tv_name


def test_r50_and_r101_convert_and_load_strictly():
    for depth in (50, 101):
        model = build_torchvision_faster_rcnn(depth)
        tv = model.state_dict()  # kaiming-initialised convs and fcs: distinct values
        d2 = {k: torch.from_numpy(v) for k, v in to_detectron2_weights(tv).items()}
        assert infer_depth(d2) == depth
        sd = convert_detectron2_state_dict(d2)
        check_against_model(sd, model)
        model.load_state_dict(sd, strict=True)
        assert len(sd) == {50: 295, 101: 550}[depth]
        name = "backbone.body.layer3.5.conv3.weight"
        assert torch.equal(sd[name], tv[name]) and torch.equal(sd[name], d2["backbone.bottom_up.res4.5.conv3.weight"])
        assert model.backbone.body.layer4[0].conv1.stride == (2, 2)


def test_torch_files_zip_and_legacy_and_a_teacher_prefix(r18, tmp_path):
    tv, d2, _ = r18
    tensors = {k: torch.from_numpy(v) for k, v in d2.items()}
    path = str(tmp_path / "model_final.pth")
    torch.save({"model": tensors, "iteration": 5}, path)
    _, sd, depth = load_detectron2_faster_rcnn(path)
    assert depth == 18 and torch.equal(sd["roi_heads.box_head.fc6.weight"], tv["roi_heads.box_head.fc6.weight"])
    legacy = str(tmp_path / "legacy.pkl")  # torch.save's pre-1.6 format, whatever the extension says
    small = {"backbone.fpn_output2.bias": tensors["backbone.fpn_output2.bias"]}
    torch.save({"model": small}, legacy, _use_new_zipfile_serialization=False)
    assert torch.equal(read_detectron2_checkpoint(legacy)["backbone.fpn_output2.bias"], tv[
        "backbone.fpn.layer_blocks.0.0.bias"])
    bundle = str(tmp_path / "r18-r101.pth")  # ReviewKD's files: teacher.* beside the student's own names
    torch.save({"model": {**{f"teacher.{k}": v for k, v in tensors.items()}, "backbone.bottom_up.stem.conv1.weight":
                          torch.zeros(1)}}, bundle)
    _, from_bundle, _ = load_detectron2_faster_rcnn(bundle, prefix="teacher.")
    assert all(torch.equal(from_bundle[k], sd[k]) for k in sd)
    assert "no weights named student.*" in one_line_error(read_detectron2_checkpoint, bundle, "student.")


def test_extra_or_missing_key_refused_in_one_line(r18, tmp_path):
    _, d2, _ = r18
    extra = write_pkl(tmp_path / "extra.pkl", {**d2, "roi_heads.box_head.fc3.weight": np.zeros((2, 2), np.float32)},
                      protocol=4)
    assert "roi_heads.box_head.fc3.weight" in one_line_error(load_detectron2_faster_rcnn, extra)
    missing = write_pkl(tmp_path / "missing.pkl", {k: v for k, v in d2.items() if k != "backbone.fpn_output3.bias"},
                        protocol=4)
    assert "backbone.fpn.layer_blocks.1.0.bias" in one_line_error(load_detectron2_faster_rcnn, missing)
    wrong = dict(d2)
    wrong["backbone.fpn_output3.bias"] = np.zeros(255, np.float32)
    bad_shape = write_pkl(tmp_path / "shape.pkl", wrong, protocol=4)
    assert "backbone.fpn.layer_blocks.1.0.bias" in one_line_error(load_detectron2_faster_rcnn, bad_shape)


def test_mask_head_refused_unless_dropped(r18):
    _, d2, _ = r18
    with_mask = {k: torch.from_numpy(v) for k, v in d2.items()}
    with_mask["roi_heads.mask_head.mask_fcn1.weight"] = torch.zeros(256, 256, 3, 3)
    assert "--drop-mask-head" in one_line_error(convert_detectron2_state_dict, with_mask)
    assert len(convert_detectron2_state_dict(with_mask, drop_mask_head=True)) == 130


class _Python2Pickler(pickle._Pickler):
    """Writes bytes as Python 2's `str` (BINSTRING), as the model-zoo files written by Python 2 hold them."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_bytes(self, obj):
        self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_bytes


def test_python2_style_model_zoo_pickle(tmp_path):
    arrays = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.array([1, -2], dtype=np.int64)}
    buf = io.BytesIO()
    _Python2Pickler(buf, protocol=2).dump({"model": arrays, "__author__": "Detectron2 Model Zoo"})
    data = buf.getvalue().replace(b"numpy._core.multiarray", b"numpy.core.multiarray")  # numpy 1's module name
    assert b"numpy.core.multiarray" in data and b"_codecs" not in data
    path = tmp_path / "py2.pkl"
    path.write_bytes(data)
    got = read_detectron2_checkpoint(str(path))
    assert torch.equal(got["a"], torch.arange(6.0).reshape(2, 3)) and got["b"].tolist() == [1, -2]


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned_by_pickle",))


def test_malicious_pickle_refused_and_runs_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": {"x": _Evil()}}, f, protocol=2)
    message = one_line_error(read_detectron2_checkpoint, str(path))
    assert "system" in message and "not a safe numpy pickle" in message
    assert not (tmp_path / "pwned_by_pickle").exists()
    with open(path, "wb") as f:  # a builtin that would run code
        f.write(b"cbuiltins\neval\n(V1+1\ntR.")
    assert "builtins.eval" in one_line_error(read_detectron2_checkpoint, str(path))
    renamed = tmp_path / "evil.pth"  # the extension does not decide: a non-zip file goes to the restricted unpickler
    path.rename(renamed)
    assert "builtins.eval" in one_line_error(read_detectron2_checkpoint, str(renamed))
    weights = tmp_path / "obj.pkl"
    write_pkl(weights, {"x": np.array(["a", "b"], dtype=object)})
    assert "not an array" in one_line_error(read_detectron2_checkpoint, str(weights))


def test_flip_input_channels_reverses_the_stem(r18):
    tv, d2, _ = r18
    weights = {k: torch.from_numpy(v) for k, v in d2.items()}
    sd = convert_detectron2_state_dict(weights, flip_input_channels=True)
    w = tv["backbone.body.conv1.weight"]
    assert torch.equal(sd["backbone.body.conv1.weight"][:, 0], w[:, 2])
    assert torch.equal(sd["backbone.body.conv1.weight"][:, 2], w[:, 0])


def test_stride_in_1x1_block_equals_plain_conv_ops():
    torch.manual_seed(0)
    model = build_torchvision_faster_rcnn(50)
    block = model.backbone.body.layer2[0]
    for bn in (block.bn1, block.bn2, block.bn3, block.downsample[1]):
        for name in ("weight", "bias", "running_mean"):
            getattr(bn, name).normal_()
        bn.running_var.uniform_(0.5, 2)
    x = torch.randn(1, 256, 12, 10)

    def frozen_bn(y, bn):  # y * w / sqrt(var + 1e-5) + (b - mean * w / sqrt(var + 1e-5))
        scale = bn.weight / torch.sqrt(bn.running_var + 1e-5)
        return y * scale[None, :, None, None] + (bn.bias - bn.running_mean * scale)[None, :, None, None]

    y = F.relu(frozen_bn(F.conv2d(x, block.conv1.weight, stride=2), block.bn1))  # stride on the 1x1
    y = F.relu(frozen_bn(F.conv2d(y, block.conv2.weight, padding=1), block.bn2))
    y = frozen_bn(F.conv2d(y, block.conv3.weight), block.bn3)
    expected = F.relu(y + frozen_bn(F.conv2d(x, block.downsample[0].weight, stride=2), block.downsample[1]))
    with torch.no_grad():
        torch.testing.assert_close(block(x), expected, rtol=1e-4, atol=1e-4)


def test_cli_in_process(r18, tmp_path, capsys):
    tv, _, path = r18
    out = str(tmp_path / "sub" / "teacher.pth")
    assert tool.main([path, "-o", out]) == out
    ckpt = torch.load(out, map_location="cpu", weights_only=True)
    assert ckpt["arch"] == "fasterrcnn_resnet18_fpn_detectron2" and ckpt["num_classes"] == 81
    assert ckpt["input"]["format"] == "BGR" and ckpt["input"]["pixel_mean"] == [103.530, 116.280, 123.675]
    build_torchvision_faster_rcnn(18).load_state_dict(ckpt["model"], strict=True)
    assert torch.equal(ckpt["model"]["backbone.body.layer4.1.conv2.weight"], tv["backbone.body.layer4.1.conv2.weight"])
    assert not [n for n in os.listdir(tmp_path / "sub") if n.endswith(".tmp")]
    with pytest.raises(SystemExit) as info:
        run_cli(lambda: tool.main([str(tmp_path / "absent.pkl"), "-o", out]))
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: detectron2 checkpoint not found") and err.count("\n") == 1


def test_a_converted_model_zoo_teacher_loads_into_the_distillation_teacher(r18, tmp_path):
    """The converter's output is the teacher the detection pipeline builds: detector.build_teacher's R50-FPN takes
    converted detectron2 weights strictly (same names and shapes), stride on the 1x1 conv included."""
    from mdistiller.detection.detector import build_teacher

    tv = random_state_dict(50, seed=1)
    d2 = {k: torch.from_numpy(v) for k, v in to_detectron2_weights(tv).items()}
    teacher = build_teacher("R50")
    teacher.load_state_dict(convert_detectron2_state_dict(d2), strict=True)
    name = "roi_heads.box_predictor.cls_score.weight"
    assert torch.equal(teacher.state_dict()[name], tv[name])
    assert teacher.backbone.body.layer2[0].conv1.stride == (2, 2) and not teacher.training
