"""detector.model_inputs: the pipeline's RGB uint8 images in each model's input format (detection.md test 6)."""

import torch

from mdistiller.detection.detector import build_detector, model_inputs


def test_model_inputs_rgb_and_bgr_models():
    a, b, c = 200, 100, 50  # R, G, B
    image = torch.stack([torch.full((40, 56), v, dtype=torch.uint8) for v in (a, b, c)])
    r18 = build_detector("R18")
    il = model_inputs(r18, [image])
    assert tuple(il.tensors.shape) == (1, 3, 64, 64) and il.image_sizes == [(40, 56)]
    expect = torch.tensor([(a - 103.53) / 57.375, (b - 116.28) / 57.12, (c - 123.675) / 58.395])
    torch.testing.assert_close(il.tensors[0, :, 0, 0], expect)
    assert float(il.tensors[0, :, 40:, :].abs().sum()) == 0.0  # zero padding
    mv2 = build_detector("MV2")  # BGR, std 1
    il = model_inputs(mv2, [image])
    torch.testing.assert_close(il.tensors[0, :, 5, 7], torch.tensor([c - 103.53, b - 116.28, a - 123.675]))
    assert image[0, 0, 0] == a  # the caller's tensor is not modified
