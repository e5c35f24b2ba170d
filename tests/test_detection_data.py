"""COCO-format reader, detectron2's resize/flip and aspect-ratio grouping (issue 26, spec detection.md 1.8 and 5.1)."""

import itertools
import json
import os

import numpy as np
import pytest
import torch

from mdistiller.detection.coco import (
    CocoDetection,
    GroupedBatchSampler,
    collate,
    group_by_aspect,
    infinite_shuffled,
    load_coco_records,
)
from mdistiller.detection.transforms import (
    TRAIN_SHORT_EDGES,
    EvalResize,
    Geometry,
    KeepSize,
    TrainAugment,
    hflip,
    resize,
    resized_shape,
)
from mdistiller.errors import MdistillerError

from coco_files import CATEGORY_IDS, write_synthetic_coco


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    image_dir, ann_file = write_synthetic_coco(str(root), n_images=5)
    with open(ann_file) as f:
        return image_dir, ann_file, json.load(f)


identity = KeepSize()


def test_labels_follow_sorted_category_ids(coco):
    _, ann_file, data = coco
    records, cats = load_coco_records(ann_file)
    assert cats == sorted(CATEGORY_IDS) == [1, 18, 90]
    by_id = {r.image_id: r for r in records}
    for ann in data["annotations"]:
        rec = by_id[ann["image_id"]]
        x, y, w, h = ann["bbox"]
        row = [list(b) for b in rec.boxes].index([x, y, x + w, y + h])
        assert rec.labels[row] == {1: 0, 18: 1, 90: 2}[ann["category_id"]]
        assert rec.iscrowd[row] == ann["iscrowd"]


def test_training_drops_crowd_only_and_empty_images_evaluation_keeps_them(coco):
    image_dir, ann_file, data = coco
    train = CocoDetection(image_dir, ann_file, train=True, transform=identity)
    evaluation = CocoDetection(image_dir, ann_file, train=False, transform=identity)
    assert [r.image_id for r in evaluation.records] == [10, 11, 12, 13, 14]
    assert [r.image_id for r in train.records] == [10, 11, 12]
    assert len(CocoDetection(image_dir, ann_file, train=True, filter_empty=False, transform=identity)) == 5
    _, crowd_target = evaluation[3]
    assert crowd_target["iscrowd"].tolist() == [1]


def test_training_targets_leave_crowd_boxes_out(tmp_path):
    image_dir, ann_file = write_synthetic_coco(str(tmp_path), n_images=3, crowd_only=False, empty=False)
    with open(ann_file) as f:
        data = json.load(f)
    data["annotations"][1]["iscrowd"] = 1  # image 11 has two boxes; make its first one crowd
    with open(ann_file, "w") as f:
        json.dump(data, f)
    assert data["annotations"][1]["image_id"] == 11
    train = CocoDetection(image_dir, ann_file, train=True, transform=identity)
    _, target = train[1]
    x, y, w, h = data["annotations"][2]["bbox"]
    assert target["boxes"].tolist() == [[x, y, x + w, y + h]]
    assert target["iscrowd"].tolist() == [0]
    _, eval_target = CocoDetection(image_dir, ann_file, train=False, transform=identity)[1]
    assert eval_target["iscrowd"].tolist() == [1, 0]


def test_item_image_and_target(coco):
    image_dir, ann_file, data = coco
    ds = CocoDetection(image_dir, ann_file, train=False, transform=identity)
    image, target = ds[0]
    assert image.dtype == torch.uint8 and image.shape == (3, 96, 128)
    ann = data["annotations"][0]
    x, y, w, h = (int(v) for v in ann["bbox"])
    assert target["boxes"].tolist() == [[x, y, x + w, y + h]]
    assert target["boxes"].dtype == torch.float32 and target["labels"].dtype == torch.int64
    # the rectangle's pixels are painted, the ones just outside are background
    assert (image[:, y:y + h, x:x + w] != 30).any(0).all()
    assert target["image_id"] == 10 and target["orig_size"] == (96, 128) and target["size"] == (96, 128)
    batch = collate([ds[0], ds[1]])
    assert list(batch) == ["images", "targets"]
    images, targets = batch["images"], batch["targets"]
    assert len(images) == 2 and targets[1]["image_id"] == 11


def test_resize_rule_matches_detectron2():
    assert resized_shape(480, 640, 800, 1333) == (800, 1067)
    assert resized_shape(333, 1000, 800, 1333) == (444, 1333)
    assert resized_shape(640, 480, 800, 1333) == (1067, 800)
    assert resized_shape(96, 128, 64, 1333) == (64, 85)  # 85.33 rounds down
    assert resized_shape(96, 120, 64, 1333) == (64, 80)
    assert resized_shape(100, 150, 64, 1333) == (64, 96)


def test_resize_scales_boxes_and_image():
    image = torch.zeros(3, 40, 60, dtype=torch.uint8)
    image[:, 10:20, 30:60] = 200
    boxes = torch.tensor([[30.0, 10.0, 60.0, 20.0]])
    out, scaled = resize(image, boxes, 80, 120)
    assert out.shape == (3, 80, 120) and out.dtype == torch.uint8
    assert scaled.tolist() == [[60.0, 20.0, 120.0, 40.0]]
    assert (out[:, 22:38, 62:118] == 200).all() and (out[:, :18] == 0).all()


def test_hflip_mirrors_image_and_boxes():
    image = torch.arange(2 * 3 * 5, dtype=torch.uint8).reshape(2, 3, 5)
    boxes = torch.tensor([[1.0, 0.0, 2.5, 3.0], [0.0, 1.0, 5.0, 2.0]])
    flipped, fboxes = hflip(image, boxes)
    for col in range(5):
        assert torch.equal(flipped[:, :, col], image[:, :, 4 - col])
    assert fboxes.tolist() == [[2.5, 0.0, 4.0, 3.0], [0.0, 1.0, 5.0, 2.0]]
    assert torch.equal(hflip(*hflip(image, boxes))[1], boxes)


def test_train_augment_draws_every_scale_and_both_flips():
    aug = TrainAugment()
    gen = torch.Generator().manual_seed(0)
    draws = [aug.draw(gen) for _ in range(400)]
    assert {s for s, _ in draws} == set(TRAIN_SHORT_EDGES)
    flips = sum(f for _, f in draws)
    assert 150 < flips < 250
    image = torch.zeros(3, 96, 128, dtype=torch.uint8)
    boxes = torch.tensor([[10.0, 20.0, 40.0, 50.0]])
    small = TrainAugment(short_edges=(48,), max_size=1333, flip_prob=1.0)
    out, fboxes = small(image, boxes)
    assert out.shape == (3, 48, 64)
    assert fboxes.tolist() == [[64 - 20.0, 10.0, 64 - 5.0, 25.0]]
    assert EvalResize(short_edge=48)(image, boxes)[1].tolist() == [[5.0, 10.0, 20.0, 25.0]]


def test_train_augment_is_reproducible_from_a_seed(coco):
    image_dir, ann_file, _ = coco
    aug = TrainAugment(short_edges=(32, 48, 64), max_size=200)

    def run():
        ds = CocoDetection(image_dir, ann_file, train=True, transform=aug, generator=torch.Generator().manual_seed(3))
        return [ds[i % 3] for i in range(6)]

    for (a_img, a_t), (b_img, b_t) in zip(run(), run()):
        assert torch.equal(a_img, b_img) and torch.equal(a_t["boxes"], b_t["boxes"])


def test_training_boxes_are_clipped_and_empty_ones_dropped(tmp_path):
    image_dir, ann_file = write_synthetic_coco(str(tmp_path), n_images=1, crowd_only=False, empty=False)
    with open(ann_file) as f:
        data = json.load(f)
    ann = data["annotations"][0]
    data["annotations"] += [dict(ann, id=50, bbox=[100.0, 80.0, 60.0, 40.0]),  # sticks out of the 128x96 image
                            dict(ann, id=51, bbox=[5.0, 5.0, 0.0, 10.0])]  # zero width
    with open(ann_file, "w") as f:
        json.dump(data, f)
    _, target = CocoDetection(image_dir, ann_file, train=True, transform=identity)[0]
    assert target["boxes"][-1].tolist() == [100.0, 80.0, 128.0, 96.0]
    assert len(target["boxes"]) == 2


def test_aspect_grouping_batches_share_orientation():
    wide = [True, False, True, True, False, False, True, False]
    batches = list(group_by_aspect(range(8), wide, 2))
    assert batches == [[0, 2], [1, 4], [3, 6], [5, 7]]
    assert list(group_by_aspect([0, 1, 2], wide, 2)) == [[0, 2]]  # the lone tall one waits
    gen = torch.Generator().manual_seed(0)
    stream = group_by_aspect(infinite_shuffled(8, gen), wide, 3)
    for _ in range(20):
        batch = next(stream)
        assert len(batch) == 3 and len({wide[i] for i in batch}) == 1


def test_dataset_is_wide_follows_json_sizes(coco):
    image_dir, ann_file, _ = coco
    assert CocoDetection(image_dir, ann_file, train=False).is_wide() == [True, False, True, False, True]


@pytest.mark.parametrize("break_it, message", [
    (lambda d, f, a: os.remove(a), "COCO annotation file not found"),
    (lambda d, f, a: open(a, "w").write("{not json"), "is not valid JSON"),
    (lambda d, f, a: json.dump({"images": []}, open(a, "w")), "has no 'annotations' list"),
    (lambda d, f, a: json.dump(dict(f, annotations=[{"image_id": 10}]), open(a, "w")), "is malformed"),
    (lambda d, f, a: json.dump(dict(f, categories=f["categories"][:1]), open(a, "w")), "not in 'categories'"),
    (lambda d, f, a: os.rename(d, d + "_gone"), "COCO image folder not found"),
])
def test_bad_inputs_give_one_line_errors(tmp_path, break_it, message):
    image_dir, ann_file = write_synthetic_coco(str(tmp_path), n_images=2)
    with open(ann_file) as f:
        data = json.load(f)
    break_it(image_dir, data, ann_file)
    with pytest.raises(MdistillerError, match=message) as err:
        CocoDetection(image_dir, ann_file, train=True)
    assert "\n" not in str(err.value)


def test_missing_or_mismatched_image_file(tmp_path):
    image_dir, ann_file = write_synthetic_coco(str(tmp_path), n_images=2)
    ds = CocoDetection(image_dir, ann_file, train=False, transform=identity)
    os.remove(os.path.join(image_dir, ds.records[1].file_name))
    with pytest.raises(MdistillerError, match="image file not found"):
        ds[1]
    ds.records[0].height = 50
    with pytest.raises(MdistillerError, match="the JSON says 50x128"):
        ds[0]
    assert np.all(ds.records[0].labels >= 0)


def painted_boxes_mask(data, image_id, h, w):
    out = []
    for ann in data["annotations"]:
        if ann["image_id"] == image_id and not ann["iscrowd"]:
            x, y, bw, bh = (int(v) for v in ann["bbox"])
            m = np.zeros((h, w), dtype=np.uint8)
            m[y:y + bh, x:x + bw] = 1
            out.append(m)
    return np.stack(out)


def test_polygons_become_masks_that_follow_resize_and_flip(coco):
    pytest.importorskip("pycocotools")
    image_dir, ann_file, data = coco
    plain = CocoDetection(image_dir, ann_file, train=True, masks=True, transform=identity)
    image, target = plain[2]
    expected = painted_boxes_mask(data, 12, 96, 128)
    assert target["masks"].dtype == torch.uint8 and np.array_equal(target["masks"].numpy(), expected)
    assert ((image != 30).any(0).numpy() == expected.any(0)).all()  # masks cover exactly the painted pixels
    flipped = CocoDetection(image_dir, ann_file, train=True, masks=True,
                            transform=TrainAugment(short_edges=(96,), flip_prob=1.0))
    assert np.array_equal(flipped[2][1]["masks"].numpy(), expected[:, :, ::-1])
    doubled = CocoDetection(image_dir, ann_file, train=True, masks=True, transform=EvalResize(short_edge=192))
    assert np.array_equal(doubled[2][1]["masks"].numpy(), expected.repeat(2, 1).repeat(2, 2))


def test_rle_segmentation_becomes_the_same_mask(tmp_path):
    mask_util = pytest.importorskip("pycocotools.mask")
    image_dir, ann_file = write_synthetic_coco(str(tmp_path), n_images=3, crowd_only=False, empty=False)
    with open(ann_file) as f:
        data = json.load(f)
    expected = painted_boxes_mask(data, 11, 128, 96)
    rle = mask_util.encode(np.asfortranarray(expected[0]))
    data["annotations"][1]["segmentation"] = dict(rle, counts=rle["counts"].decode())
    with open(ann_file, "w") as f:
        json.dump(data, f)
    for transform, flip in ((identity, False), (TrainAugment(short_edges=(96,), flip_prob=1.0), True)):
        ds = CocoDetection(image_dir, ann_file, train=True, masks=True, transform=transform)
        got = ds[1][1]["masks"].numpy()
        assert np.array_equal(got, expected[:, :, ::-1] if flip else expected)


def test_geometry_of_plans():
    assert KeepSize().plan(96, 128) == Geometry(96, 128, False)
    assert EvalResize().plan(480, 640) == Geometry(800, 1067, False)
    assert TrainAugment(short_edges=(640,), flip_prob=0.0).plan(333, 1000) == Geometry(444, 1333, False)  # capped


def test_grouped_batch_sampler_follows_its_generator_and_shards():
    wide = [i % 3 == 0 for i in range(10)]
    gen = torch.Generator().manual_seed(5)
    sampler = GroupedBatchSampler(wide, 2, gen)
    state = gen.get_state()
    first = list(itertools.islice(iter(sampler), 6))
    assert all(len(b) == 2 and len({wide[i] for i, _ in b}) == 1 for b in first)
    gen.set_state(state)
    assert list(itertools.islice(iter(sampler), 6)) == first  # a function of the generator's state only
    gen.set_state(state)
    sampler.skip_next(4)
    assert list(itertools.islice(iter(sampler), 2)) == first[4:6]
    assert list(itertools.islice(iter(sampler), 1)) != first[:1]  # the skip was for one iter() only, state moved on
    gen.set_state(state)
    iter(sampler)  # not used: no draw
    next(iter(sampler)), list(itertools.islice(iter(sampler), 9))  # one draw each, however much is taken
    third = torch.Generator().set_state(state)
    torch.randint(0, 2**62, (2,), generator=third)
    assert torch.equal(gen.get_state(), third.get_state())
    # by hand: a stream seed from the generator, then per pass randperm(10) and 10 seeds from a generator with that
    # seed; rank r takes positions r, r + 2, ... of the stream
    stream_seed = int(torch.randint(0, 2**62, (), generator=torch.Generator().manual_seed(5)))
    reference = torch.Generator().manual_seed(stream_seed)
    stream = []
    for _ in range(4):
        order = torch.randperm(10, generator=reference).tolist()
        stream += list(zip(order, torch.randint(0, 2**62, (10,), generator=reference).tolist()))
    for rank in (0, 1):
        own = GroupedBatchSampler(wide, 1, torch.Generator().manual_seed(5), rank=rank, world_size=2)
        assert [b[0] for b in itertools.islice(iter(own), 20)] == stream[rank::2]
    with pytest.raises(MdistillerError, match="rank 2 outside 0..1"):
        GroupedBatchSampler(wide, 2, gen, rank=2, world_size=2)


def test_seeded_key_gives_the_same_augmentation(coco):
    image_dir, ann_file, _ = coco
    ds = CocoDetection(image_dir, ann_file, train=True, transform=TrainAugment(short_edges=(64, 96, 128)))
    draws = [ds[(0, seed)] for seed in range(8)]
    again = [ds[(0, seed)] for seed in range(8)]
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1]["boxes"], b[1]["boxes"]) for a, b in zip(draws, again))
    assert len({(tuple(d[0].shape), tuple(d[1]["boxes"][0].tolist())) for d in draws}) > 2  # seeds draw differently
