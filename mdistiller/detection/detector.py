"""Faster R-CNN FPN detectors (students R18/R50/MV2, teachers R101/R50) from torchvision's detection parts, with
detectron2's numerics where the spec (detection.md 1.5-1.7, 3.3) says they differ from torchvision's defaults.

Deviations from torchvision's defaults, each on purpose (tested in tests/test_detection_model.py):
- anchors: `D2AnchorGenerator` keeps detectron2's unrounded cell anchors and its fixed strides 4..64 (torchvision
  rounds the cell anchors and infers strides as padded size // grid size, wrong for p6 when H/32 is odd);
- box pooler: `AlignedMultiScaleRoIAlign` = detectron2's ROIAlignV2 (aligned=True, sampling ratio 0, fixed scales
  1/4..1/32, level rule floor(4 + log2(sqrt(area)/224 + 1e-8)));
- RPN: 1000 post-NMS proposals per image in training (torchvision: 2000); L1 box loss and both losses summed and
  divided by 256 x #images (`rpn_losses`);
- ROI heads: L1 box loss summed over fg / #sampled (`roi_losses`; torchvision: smooth-L1 beta 1/9);
  detectron2's initialisation (box fcs kaiming_uniform(a=1), cls_score N(0, 0.01), bbox_pred N(0, 0.001));
- ResNet-50/101: STRIDE_IN_1X1 (stride 2 on block 0's 1x1 of layer2-4) for MSRA/detectron2 weights;
- FrozenBatchNorm2d everywhere, FREEZE_AT as the spec (2 for ResNets: stem and res2; 0 for MobileNetV2).
Classes are torchvision's order (0 = background, k = k-th foreground class); detectron2 puts background last:
`labels_to_detectron2` / `labels_from_detectron2` / `logits_to_detectron2` convert.

Remaining differences from detectron2 (documented, not changed): torchvision's RPN drops proposals smaller than
1e-3 (detectron2: only empty ones) and its box postprocess drops boxes smaller than 1e-2 after clipping; the random
anchor/proposal samplers draw differently (same quotas); `pretrained_source` is only recorded (nothing is loaded or
downloaded: checkpoints come through the converter); MV2 keeps upstream's BGR / std 1 input (with torchvision's
ImageNet MV2 weights one would use RGB + ImageNet mean/std instead). torchvision's model-side resize and
normalisation (GeneralizedRCNNTransform) are never used: callers give images already resized by the data pipeline
(detectron2's rule) in the model's `input_format`, and `to_image_list` normalises and pads them to /32.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import mobilenet_v2
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN, resnet_fpn_backbone
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.ops import MultiScaleRoIAlign, roi_align
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.ops.misc import FrozenBatchNorm2d

from mdistiller.errors import MdistillerError, did_you_mean

NUM_CLASSES = 80  # COCO foreground classes; the predictor has NUM_CLASSES + 1 outputs (background first)
ANCHOR_SIZES = (32, 64, 128, 256, 512)  # one size per level p2..p6
ANCHOR_RATIOS = (0.5, 1.0, 2.0)  # h / w
FPN_STRIDES = (4, 8, 16, 32, 64)  # p2..p6
FEATURE_NAMES = ("0", "1", "2", "3", "pool")  # torchvision's keys of p2..p6
BOX_REG_WEIGHTS = (10.0, 10.0, 5.0, 5.0)
SIZE_DIVISIBILITY = 32

# input format and normalisation per backbone (detection.md 1.5-1.6, values verbatim, quirks included)
D2_MEAN = (103.530, 116.280, 123.675)
INPUTS = {
    "R18": {"format": "RGB", "pixel_mean": D2_MEAN, "pixel_std": (57.375, 57.120, 58.395)},
    "R50": {"format": "BGR", "pixel_mean": D2_MEAN, "pixel_std": (1.0, 1.0, 1.0)},
    "R101": {"format": "BGR", "pixel_mean": D2_MEAN, "pixel_std": (1.0, 1.0, 1.0)},
    "MV2": {"format": "BGR", "pixel_mean": D2_MEAN, "pixel_std": (1.0, 1.0, 1.0)},
}
# where upstream's ImageNet-pretrained backbone weights come from (recorded on the model; nothing is downloaded)
PRETRAINED_SOURCES = {
    "R18": "torchvision ResNet18 ImageNet weights (detectron2's recipe for torchvision weights; in r18-r101.pth)",
    "R50": "MSRA caffe2 ImageNet R-50.pkl (detectron2 ImageNetPretrained/MSRA; in r50-r101.pth)",
    "R101": "detectron2 model zoo Faster R-CNN R101-FPN 3x model_final_f6e8b1.pkl (whole detector)",
    "MV2": "upstream's MobileNetV2 ImageNet weights (tonylins layout; in mv2-r50.pth)",
}
FREEZE_AT = {"R18": 2, "R50": 2, "R101": 2, "MV2": 0}


class D2AnchorGenerator(AnchorGenerator):
    """detectron2's DefaultAnchorGenerator, torchvision's interface: unrounded cell anchors, offset 0, fixed strides."""

    def __init__(self, sizes=ANCHOR_SIZES, aspect_ratios=ANCHOR_RATIOS, strides=FPN_STRIDES):
        super().__init__(tuple((s,) for s in sizes), tuple(tuple(aspect_ratios) for _ in sizes))
        self.strides = tuple(int(s) for s in strides)

    def generate_anchors(self, scales, aspect_ratios, dtype=torch.float32, device=None) -> Tensor:
        # detectron2 computes in Python floats (double) and converts once: w = sqrt(size^2 / r), h = r * w
        rows = []
        for size in scales:
            for ratio in aspect_ratios:
                w = math.sqrt(float(size) ** 2 / float(ratio))
                h = float(ratio) * w
                rows.append([-w / 2.0, -h / 2.0, w / 2.0, h / 2.0])
        return torch.tensor(rows, dtype=dtype, device=device)

    def forward(self, image_list: ImageList, feature_maps: list[Tensor]) -> list[Tensor]:
        if len(feature_maps) != len(self.strides):
            raise MdistillerError(f"anchor generator: {len(feature_maps)} feature maps for {len(self.strides)} strides")
        grid_sizes = [fm.shape[-2:] for fm in feature_maps]
        dtype, device = feature_maps[0].dtype, feature_maps[0].device
        strides = [[torch.tensor(s, dtype=torch.int64, device=device)] * 2 for s in self.strides]
        self.set_cell_anchors(dtype, device)
        per_level = self.grid_anchors(grid_sizes, strides)
        return [torch.cat(per_level) for _ in image_list.image_sizes]


class AlignedMultiScaleRoIAlign(MultiScaleRoIAlign):
    """detectron2's ROIPooler, ROIAlignV2: aligned=True, adaptive sampling, fixed scales, detectron2's level rule."""

    def __init__(self, featmap_names=FEATURE_NAMES[:4], output_size: int = 7, sampling_ratio: int = 0,
                 strides=FPN_STRIDES[:4], canonical_box_size: float = 224.0, canonical_level: int = 4):
        super().__init__(list(featmap_names), output_size, sampling_ratio)
        self.aligned = True
        self.strides = tuple(int(s) for s in strides)
        self.canonical_box_size = float(canonical_box_size)
        self.canonical_level = int(canonical_level)
        self.min_level = int(round(math.log2(self.strides[0])))
        self.max_level = int(round(math.log2(self.strides[-1])))

    def levels(self, boxes: list[Tensor]) -> Tensor:
        """Level index (0 = finest) of every box, detectron2's assign_boxes_to_levels."""
        b = torch.cat(boxes)
        size = torch.sqrt((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]))
        level = torch.floor(self.canonical_level + torch.log2(size / self.canonical_box_size + 1e-8))
        return (level.clamp(self.min_level, self.max_level) - self.min_level).to(torch.int64)

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes=None) -> Tensor:
        feats = [x[name] for name in self.featmap_names]
        rois = torch.cat([torch.cat([torch.full_like(b[:, :1], i), b], dim=1) for i, b in enumerate(boxes)])
        levels = self.levels(boxes)
        out = feats[0].new_zeros((rois.shape[0], feats[0].shape[1], *self.output_size))
        for lvl, (feat, stride) in enumerate(zip(feats, self.strides)):
            idx = torch.where(levels == lvl)[0]
            if idx.numel():
                out[idx] = roi_align(feat, rois[idx], self.output_size, spatial_scale=1.0 / stride,
                                     sampling_ratio=self.sampling_ratio, aligned=self.aligned).to(out.dtype)
        return out


def rpn_losses(objectness: Tensor, deltas: Tensor, labels: Tensor, targets: Tensor, sampled_pos: Tensor,
               sampled_neg: Tensor, normalizer: float) -> tuple[Tensor, Tensor]:
    """detectron2's RPN losses: (sum of BCE over sampled anchors, sum of L1 over sampled positives) / normalizer."""
    sampled = torch.cat([sampled_pos, sampled_neg])
    loss_cls = F.binary_cross_entropy_with_logits(objectness.flatten()[sampled].float(), labels[sampled].float(),
                                                  reduction="sum")
    loss_loc = F.l1_loss(deltas[sampled_pos].float(), targets[sampled_pos].float(), reduction="sum")
    return loss_cls / normalizer, loss_loc / normalizer


def roi_losses(class_logits: Tensor, box_regression: Tensor, labels: Tensor, regression_targets: Tensor
               ) -> tuple[Tensor, Tensor]:
    """detectron2's box-head losses (bg-first labels): mean CE, and class-specific L1 over fg summed / #sampled."""
    class_logits, box_regression = class_logits.float(), box_regression.float()
    loss_cls = F.cross_entropy(class_logits, labels)
    fg = torch.where(labels > 0)[0]
    deltas = box_regression.reshape(box_regression.shape[0], -1, 4)[fg, labels[fg]]
    loss_box = F.l1_loss(deltas, regression_targets[fg].float(), reduction="sum") / max(labels.numel(), 1)
    return loss_cls, loss_box


class D2RPN(RegionProposalNetwork):
    """torchvision's RPN with detectron2's loss (`rpn_losses`), normalised by batch_size_per_image x #images."""

    def compute_loss(self, objectness, pred_bbox_deltas, labels, regression_targets):
        pos, neg = self.fg_bg_sampler(labels)
        pos = torch.where(torch.cat(pos))[0]
        neg = torch.where(torch.cat(neg))[0]
        normalizer = float(self.fg_bg_sampler.batch_size_per_image * len(labels))
        return rpn_losses(objectness, pred_bbox_deltas, torch.cat(labels), torch.cat(regression_targets), pos, neg,
                          normalizer)


class D2RoIHeads(RoIHeads):
    """torchvision's RoIHeads with detectron2's box losses (`roi_losses`); eval is torchvision's postprocess."""

    def forward(self, features, proposals, image_shapes, targets=None):
        if not self.training:
            return super().forward(features, proposals, image_shapes, targets)
        if targets is None:
            raise MdistillerError("detector: training forward needs targets (boxes and labels per image)")
        return [], box_losses(self, features, proposals, image_shapes, targets)[0]


@dataclass
class Sample:
    """The box head's training sample: proposals per image (GT appended, sampled), bg-first labels, targets."""

    proposals: list[Tensor]
    labels: Tensor  # (N,), 0 = background, k = k-th class
    regression_targets: Tensor  # (N, 4), encoded with BOX_REG_WEIGHTS
    class_logits: Tensor | None = None  # (N, 81) once the box head ran on them

    @property
    def labels_detectron2(self) -> Tensor:
        """The labels in detectron2's order (0..79 foreground, 80 background)."""
        return labels_to_detectron2(self.labels)


def sample_proposals(roi_heads: RoIHeads, proposals: list[Tensor], targets: list[dict[str, Tensor]]) -> Sample:
    """Label and sample proposals as the box head trains on them (IoU 0.5, 512 per image, <= 25 % fg)."""
    props, _, labels, reg = roi_heads.select_training_samples(proposals, targets)
    return Sample(props, torch.cat(labels), torch.cat(reg))


def box_outputs(roi_heads: RoIHeads, features: dict[str, Tensor], proposals: list[Tensor], image_sizes
                ) -> tuple[Tensor, Tensor]:
    """(class logits (N, 81), class-specific box deltas (N, 324)) of the box head on the given proposals."""
    pooled = roi_heads.box_roi_pool(features, proposals, image_sizes)
    return roi_heads.box_predictor(roi_heads.box_head(pooled))


def box_losses(roi_heads: RoIHeads, features: dict[str, Tensor], proposals: list[Tensor], image_sizes,
               targets: list[dict[str, Tensor]]) -> tuple[dict[str, Tensor], Sample]:
    """The box head's training step: {loss_cls, loss_box_reg} and its sample (with the class logits)."""
    sample = sample_proposals(roi_heads, proposals, targets)
    class_logits, box_regression = box_outputs(roi_heads, features, sample.proposals, image_sizes)
    loss_cls, loss_box = roi_losses(class_logits, box_regression, sample.labels, sample.regression_targets)
    sample.class_logits = class_logits
    return {"loss_cls": loss_cls, "loss_box_reg": loss_box}, sample


def roi_logits(model: Detector, features: dict[str, Tensor], proposals: list[Tensor], image_sizes) -> Tensor:
    """Box-head class logits (N, 81, bg first) of `model` on given proposals over its own FPN features."""
    return box_outputs(model.roi_heads, features, proposals, image_sizes)[0]


def labels_to_detectron2(labels: Tensor) -> Tensor:
    """Bg-first labels (0 = bg, 1..80) to detectron2's bg-last labels (0..79, 80 = bg)."""
    return (labels - 1) % (NUM_CLASSES + 1)


def labels_from_detectron2(labels: Tensor) -> Tensor:
    """detectron2's bg-last labels (80 = bg) to bg-first labels (0 = bg)."""
    return (labels + 1) % (NUM_CLASSES + 1)


def logits_to_detectron2(logits: Tensor) -> Tensor:
    """Bg-first class logits (N, 81) to detectron2's column order (background last)."""
    return torch.cat([logits[:, 1:], logits[:, :1]], dim=1)


def to_image_list(images: list[Tensor], pixel_mean, pixel_std, size_divisibility: int = SIZE_DIVISIBILITY
                  ) -> ImageList:
    """Normalise (x - mean) / std per channel, zero-pad to a multiple of size_divisibility (detectron2's ImageList)."""
    if not images:
        raise MdistillerError("detector: no images")
    mean = torch.as_tensor(pixel_mean, dtype=torch.float32, device=images[0].device).view(-1, 1, 1)
    std = torch.as_tensor(pixel_std, dtype=torch.float32, device=images[0].device).view(-1, 1, 1)
    sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
    h = math.ceil(max(s[0] for s in sizes) / size_divisibility) * size_divisibility
    w = math.ceil(max(s[1] for s in sizes) / size_divisibility) * size_divisibility
    batch = images[0].new_zeros((len(images), images[0].shape[0], h, w), dtype=torch.float32)
    for i, im in enumerate(images):
        batch[i, :, : im.shape[-2], : im.shape[-1]] = (im.float() - mean) / std
    return ImageList(batch, sizes)


def model_inputs(detector: Detector, images: list[Tensor]) -> ImageList:
    """The data pipeline's RGB uint8 (3, H, W) images as `detector`'s input: channels reversed for a BGR model, then
    normalised with its mean/std and padded (`Detector.preprocess`)."""
    if detector.input_format not in ("RGB", "BGR"):
        raise MdistillerError(f"detector: input_format must be RGB or BGR, got {detector.input_format!r}")
    if detector.input_format == "BGR":
        images = [im.flip(0) for im in images]
    return detector.preprocess(images)


@dataclass
class TrainOutput:
    """A training forward: the losses by upstream's names and what distillation needs."""

    losses: dict[str, Tensor]
    features: dict[str, Tensor]  # p2..p6 under FEATURE_NAMES
    sample: Sample  # the box head's sampled proposals, labels and class logits


class Detector(nn.Module):
    """Faster R-CNN FPN: `backbone` (BackboneWithFPN), `rpn`, `roi_heads` named as torchvision's FasterRCNN."""

    def __init__(self, backbone: BackboneWithFPN, arch: str, pretrained_source: str | None = None):
        super().__init__()
        self.backbone = backbone
        self.arch = arch
        self.input_format = INPUTS[arch]["format"]
        self.pixel_mean = INPUTS[arch]["pixel_mean"]
        self.pixel_std = INPUTS[arch]["pixel_std"]
        self.pretrained_source = pretrained_source
        anchors = D2AnchorGenerator()
        self.rpn = D2RPN(
            anchors, RPNHead(backbone.out_channels, anchors.num_anchors_per_location()[0]),
            fg_iou_thresh=0.7, bg_iou_thresh=0.3, batch_size_per_image=256, positive_fraction=0.5,
            pre_nms_top_n={"training": 2000, "testing": 1000}, post_nms_top_n={"training": 1000, "testing": 1000},
            nms_thresh=0.7, score_thresh=0.0,
        )
        box_head = TwoMLPHead(backbone.out_channels * 7 * 7, 1024)
        predictor = FastRCNNPredictor(1024, NUM_CLASSES + 1)
        for fc in (box_head.fc6, box_head.fc7):
            nn.init.kaiming_uniform_(fc.weight, a=1)
            nn.init.zeros_(fc.bias)
        nn.init.normal_(predictor.cls_score.weight, std=0.01)
        nn.init.normal_(predictor.bbox_pred.weight, std=0.001)
        nn.init.zeros_(predictor.cls_score.bias)
        nn.init.zeros_(predictor.bbox_pred.bias)
        self.roi_heads = D2RoIHeads(
            AlignedMultiScaleRoIAlign(), box_head, predictor,
            fg_iou_thresh=0.5, bg_iou_thresh=0.5, batch_size_per_image=512, positive_fraction=0.25,
            bbox_reg_weights=BOX_REG_WEIGHTS, score_thresh=0.05, nms_thresh=0.5, detections_per_img=100,
        )

    def preprocess(self, images: list[Tensor]) -> ImageList:
        """Images (C, H, W, 0-255, already in this model's input_format and resized) to a normalised, padded batch."""
        return to_image_list(images, self.pixel_mean, self.pixel_std)

    def train_forward(self, images: ImageList, targets: list[dict[str, Tensor]]) -> TrainOutput:
        """Losses (loss_rpn_cls, loss_rpn_loc, loss_cls, loss_box_reg), FPN features and the box head's sample."""
        features = self.backbone(images.tensors)
        if targets is None:
            raise MdistillerError("detector: training forward needs targets (boxes and labels per image)")
        proposals, rpn = self.rpn(images, features, targets)
        roi, sample = box_losses(self.roi_heads, features, proposals, images.image_sizes, targets)
        losses = {"loss_rpn_cls": rpn["loss_objectness"], "loss_rpn_loc": rpn["loss_rpn_box_reg"], **roi}
        return TrainOutput(losses, features, sample)

    def forward(self, images: ImageList, targets: list[dict[str, Tensor]] | None = None):
        """Training: the loss dict; eval: detections per image (boxes in the resized image, bg-first labels)."""
        if self.training:
            return self.train_forward(images, targets).losses
        features = self.backbone(images.tensors)
        proposals, _ = self.rpn(images, features)
        detections, _ = self.roi_heads(features, proposals, images.image_sizes)
        return detections


def stride_in_1x1_(body: nn.Module) -> None:
    """MSRA / detectron2 bottlenecks put block 0's stride on the 1x1 conv (torchvision: on the 3x3), in place."""
    for name in ("layer2", "layer3", "layer4"):
        block = getattr(body, name)[0]
        block.conv1.stride, block.conv2.stride = (2, 2), (1, 1)


def _mv2_fpn() -> BackboneWithFPN:
    features = mobilenet_v2(weights=None, norm_layer=FrozenBatchNorm2d).features
    return BackboneWithFPN(features, {"3": "0", "6": "1", "13": "2", "17": "3"}, [24, 32, 96, 320], 256,
                           extra_blocks=LastLevelMaxPool())


ARCHS = {"R18": "resnet18", "R50": "resnet50", "R101": "resnet101", "MV2": None}


def build_detector(arch: str, pretrained_source: str | None = "default", stride_in_1x1: bool = True,
                   freeze_at: int | None = None) -> Detector:
    """A Faster R-CNN FPN with random weights (nothing downloaded); `pretrained_source` records where the backbone's
    ImageNet weights would come from ("default": upstream's, PRETRAINED_SOURCES)."""
    if arch not in ARCHS:
        raise MdistillerError(f"detector: unknown backbone {arch!r}{did_you_mean(arch, ARCHS)}; one of {list(ARCHS)}")
    freeze_at = FREEZE_AT[arch] if freeze_at is None else int(freeze_at)
    if arch == "MV2":
        if freeze_at != 0:
            raise MdistillerError("detector: MV2 supports FREEZE_AT 0 only (upstream's setting)")
        backbone = _mv2_fpn()
    else:
        if not 0 <= freeze_at <= 5:
            raise MdistillerError(f"detector: FREEZE_AT must be in 0..5, got {freeze_at}")
        backbone = resnet_fpn_backbone(backbone_name=ARCHS[arch], weights=None, norm_layer=FrozenBatchNorm2d,
                                       trainable_layers=5 - freeze_at)
        if arch != "R18" and stride_in_1x1:
            stride_in_1x1_(backbone.body)
    source = PRETRAINED_SOURCES[arch] if pretrained_source == "default" else pretrained_source
    return Detector(backbone, arch, source)


def build_student(arch: str, pretrained_source: str | None = "default") -> Detector:
    """Student R18-FPN, R50-FPN or MV2-FPN (trainable apart from FREEZE_AT and FrozenBN)."""
    if arch not in ("R18", "R50", "MV2"):
        raise MdistillerError(f"detector: student backbone must be R18, R50 or MV2, got {arch!r}")
    return build_detector(arch, pretrained_source)


def build_teacher(arch: str, weights_source: str | None = "default") -> Detector:
    """Teacher R101-FPN or R50-FPN: every parameter frozen, eval mode (FrozenBN only, so numerics equal train mode)."""
    if arch not in ("R101", "R50"):
        raise MdistillerError(f"detector: teacher backbone must be R101 or R50, got {arch!r}")
    model = build_detector(arch, weights_source)
    if weights_source == "default" and arch == "R50":
        model.pretrained_source = "detectron2 model zoo Faster R-CNN R50-FPN 3x model_final_280758.pkl"
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def fpn_features(model: Detector, images: ImageList) -> OrderedDict[str, Tensor]:
    """The FPN levels p2..p6 (keys '0'..'3', 'pool'; 256 channels, strides 4..64)."""
    return model.backbone(images.tensors)
