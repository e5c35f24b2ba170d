"""DATASET.TYPE "coco" (detection/data.py) and evaluate_detection (detection/inference.py) on a synthetic COCO folder
written in detectron2's datasets/coco layout."""

import itertools
import json
import math
import os
import shutil

import pytest
import torch
from torch import nn

import mdistiller.detection  # noqa: F401  (registers "coco")
from mdistiller.dataset import DATASETS, check_data, get_dataset, get_test_set
from mdistiller.detection.coco import CocoDetection
from mdistiller.detection.data import coco_loaders, eval_loader, train_loader
from mdistiller.detection.detector import build_detector, model_inputs
from mdistiller.detection.inference import detect, evaluate_detection
from mdistiller.detection.transforms import EvalResize
from mdistiller.engine.cfg import default_cfg
from mdistiller.errors import MdistillerError

from coco_files import write_coco_split
from conftest import needs_gloo, run_torchrun

pytest.importorskip("pycocotools")

# write_coco_split: image ids 10..19; 18 has a crowd box only and 19 none: 8 training images (4 wide, 4 tall)


def make_cfg(root, workers=0, batch=4, test_batch=3):
    cfg = default_cfg()
    cfg.DATASET.TYPE = "coco"
    cfg.DATASET.ROOT = str(root)
    cfg.DATASET.NUM_WORKERS = workers
    cfg.DATASET.TEST.BATCH_SIZE = test_batch
    cfg.SOLVER.BATCH_SIZE = batch
    cfg.DETECTION.TRAIN_SPLIT = "train"
    cfg.DETECTION.TEST_SPLIT = "val"
    cfg.DETECTION.MIN_SIZE_TRAIN = (64, 80, 96, 112)
    cfg.DETECTION.MAX_SIZE_TRAIN = 1333
    cfg.DETECTION.MIN_SIZE_TEST = 64  # 96x128 -> 64x85: predictions must be scaled back
    cfg.DETECTION.MAX_SIZE_TEST = 1333
    return cfg


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    path = tmp_path_factory.mktemp("coco_root")
    write_coco_split(str(path), "train", seed=0)
    data = write_coco_split(str(path), "val", seed=1)
    return str(path), data


def one_line(err) -> str:
    assert "\n" not in str(err.value)
    return str(err.value)


def test_registered_as_detection_data():
    entry = DATASETS.get("coco")
    assert entry.task == "detection" and entry.loaders is coco_loaders
    assert entry.num_classes(default_cfg()) == 80


@pytest.mark.parametrize("remove, named", [
    ("annotations/instances_train.json", "COCO annotation file not found"),
    ("annotations/instances_val.json", "COCO annotation file not found"),
    ("train", "COCO image folder not found"),
    ("val", "COCO image folder not found"),
])
def test_check_names_the_missing_piece(tmp_path, remove, named):
    write_coco_split(str(tmp_path), "train")
    write_coco_split(str(tmp_path), "val")
    cfg = make_cfg(tmp_path)
    check_data(cfg)  # all there: nothing raised
    path = tmp_path / remove
    shutil.rmtree(path) if path.is_dir() else path.unlink()
    with pytest.raises(MdistillerError, match=named) as err:
        check_data(cfg)
    message = one_line(err)
    assert str(path) in message and "datasets/coco" in message and "docs/detection.md" in message


def test_mask_on_and_wrong_category_count_are_refused(tmp_path, root):
    cfg = make_cfg(root[0])
    cfg.DETECTION.MASK_ON = True
    with pytest.raises(MdistillerError, match="MASK_ON True: Mask R-CNN students are not built") as err:
        check_data(cfg)
    one_line(err)
    write_coco_split(str(tmp_path), "train", categories=[1, 18, 90])
    write_coco_split(str(tmp_path), "val", categories=[1, 18, 90])
    with pytest.raises(MdistillerError, match="has 3 categories; the detectors have 80") as err:
        get_dataset(make_cfg(tmp_path), seed=0, rank=0, world_size=1)
    one_line(err)


def test_training_batches_are_dicts_of_aspect_grouped_per_process_batches(root):
    cfg = make_cfg(root[0], batch=4)
    for world, per_process in ((1, 4), (2, 2)):
        train, val, num_train, num_classes = get_dataset(cfg, seed=3, rank=0, world_size=world)
        assert (num_train, num_classes) == (8, 80)
        assert train.generator is train.batch_sampler.generator
        with pytest.raises(TypeError):
            len(train)  # endless
        for batch in itertools.islice(iter(train), 6):  # more batches than one pass holds: the stream goes on
            assert list(batch) == ["images", "targets"] and len(batch["images"]) == per_process
            shapes = [tuple(im.shape) for im in batch["images"]]
            assert len({h < w for _, h, w in shapes}) == 1  # one orientation per batch
            for image, target in zip(batch["images"], batch["targets"]):
                assert image.dtype == torch.uint8 and target["size"] == tuple(image.shape[1:])
                assert min(image.shape[1:]) in (64, 80, 96, 112)
                assert target["image_id"] not in (18, 19)  # crowd-only and empty images are not trained on
                assert target["labels"].dtype == torch.int64 and len(target["boxes"]) == len(target["labels"])
    cfg.SOLVER.BATCH_SIZE = 3
    with pytest.raises(MdistillerError, match="SOLVER.BATCH_SIZE 3 .* must be a multiple of the 2 processes") as err:
        get_dataset(cfg, seed=3, rank=0, world_size=2)
    one_line(err)


def draw(loader, n):
    batches = list(itertools.islice(iter(loader), n))
    return [[(t["image_id"], im) for im, t in zip(b["images"], b["targets"])] for b in batches]


def same_batches(a, b) -> bool:
    return len(a) == len(b) and all(
        [i for i, _ in x] == [i for i, _ in y] and all(torch.equal(p, q) for (_, p), (_, q) in zip(x, y))
        for x, y in zip(a, b))


def test_stream_is_a_function_of_the_generator_state(root):
    cfg = make_cfg(root[0], batch=2)
    train0, _, _, _ = get_dataset(cfg, seed=7, rank=0, world_size=1)
    state = train0.generator.get_state()
    first = draw(train0, 3)
    later = draw(train0, 3)  # the next period: a new iter() from the advanced state
    assert not same_batches(first, later)
    torch.manual_seed(123)  # the global RNG plays no part
    train0.generator.set_state(state)
    assert same_batches(draw(train0, 3), first)
    assert same_batches(draw(train0, 3), later)
    cfg.DATASET.NUM_WORKERS = 2
    train2, _, _, _ = get_dataset(cfg, seed=7, rank=0, world_size=1)
    state2 = train2.generator.get_state()
    with_workers = draw(train2, 3)
    train2.generator.set_state(state2)
    torch.rand(5)
    assert same_batches(draw(train2, 3), with_workers)
    assert same_batches(with_workers, first)  # per-item seeds: the pixels do not depend on the workers
    assert same_batches(draw(train2, 3), later)  # nor the generator's advance (prefetching draws nothing from it)
    for loader in (train0, train2):  # a mid-period resume: the boundary's state, then skip what was trained on
        loader.generator.set_state(state)
        loader.batch_sampler.skip_next(2)
        assert same_batches(draw(loader, 1), first[2:])
        assert same_batches(draw(loader, 3), later)
    # the augmentation is really drawn: each image is its file resized to a drawn short edge, mirrored or not
    train_set = train0.dataset
    row = {r.image_id: k for k, r in enumerate(train_set.records)}
    sizes, flips = set(), set()
    for image_id, image in (pair for b in first + later for pair in b):
        short = min(image.shape[1:])
        plain = CocoDetection(train_set.image_dir, train_set.ann_file, train=True,
                              transform=EvalResize(short, 1333))[row[image_id]][0]
        sizes.add(short)
        if torch.equal(plain, plain.flip(-1)):
            continue  # image 10's one box happens to be centred
        mirrored = torch.equal(image, plain.flip(-1))
        assert mirrored != torch.equal(image, plain)
        flips.add(mirrored)
    assert len(sizes) > 1 and flips == {False, True}


def test_two_ranks_split_one_stream(root):
    data = root[1]
    cfg = make_cfg(root[0], batch=2)
    train_set = get_test_set(cfg)  # any CocoDetection works for the index stream; use the 10-image test split
    streams = []
    for rank in (0, 1):
        loader = train_loader(train_set, 1, 0, seed=11, rank=rank, world_size=2)
        streams.append([b[0][0] for b in itertools.islice(iter(loader.batch_sampler), 15)])
    assert set(streams[0][:5]).isdisjoint(streams[1][:5])
    assert sorted(streams[0][:5] + streams[1][:5]) == list(range(len(data["images"])))  # one pass, split
    one = train_loader(train_set, 1, 0, seed=11)
    whole = [b[0][0] for b in itertools.islice(iter(one.batch_sampler), 30)]
    assert whole[0::2] == streams[0] and whole[1::2] == streams[1]


def test_eval_loader_is_sequential_and_sharded(root):
    cfg = make_cfg(root[0], test_batch=3)
    _, val, _, _ = get_dataset(cfg, seed=0, rank=0, world_size=1)
    ids = [t["image_id"] for b in val for t in b["targets"]]
    assert ids == list(range(10, 20))  # crowd-only and empty images are evaluated
    assert [len(b["images"]) for b in val] == [3, 3, 3, 1]
    test_set = get_test_set(cfg)
    shards = [[t["image_id"] for b in eval_loader(test_set, 3, 0, r, 3) for t in b["targets"]] for r in range(3)]
    assert shards == [[10, 11, 12, 13], [14, 15, 16], [17, 18, 19]]


class GroundTruthModel(nn.Module):
    """A detection distiller's eval forward that returns the non-crowd targets (shifted by `shift` box widths)."""

    def __init__(self, shift=0.0, empty=False):
        super().__init__()
        self.shift, self.empty, self.modes = shift, empty, []
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, images, targets):
        self.modes.append((self.training, torch.is_grad_enabled()))
        out = []
        for image, target in zip(images, targets):
            assert tuple(image.shape[1:]) == target["size"]
            keep = (target["iscrowd"] == 0) & torch.tensor(not self.empty)
            boxes = target["boxes"][keep].clone()
            boxes[:, 0::2] += self.shift * (boxes[:, 2:3] - boxes[:, 0:1])
            out.append({"boxes": boxes, "scores": torch.ones(len(boxes)), "labels": target["labels"][keep] + 1})
        return out


def test_ground_truth_scores_100_and_shifted_boxes_0(root, tmp_path):
    cfg = make_cfg(root[0])
    _, val, _, _ = get_dataset(cfg, seed=0, rank=0, world_size=1)
    model = GroundTruthModel().train()
    results = str(tmp_path / "out" / "coco_results.json")
    metrics = evaluate_detection(model, val, "cpu", results_json=results)
    assert model.training and model.modes and all(m == (False, False) for m in model.modes)
    assert {k: metrics[k] for k in ("AP", "AP50", "AP75", "APs", "APm")} == pytest.approx(
        {"AP": 100.0, "AP50": 100.0, "AP75": 100.0, "APs": 100.0, "APm": 100.0})
    assert math.isnan(metrics["APl"])  # no large box in the set: COCO has no value
    assert json.loads(json.dumps(metrics))["AP"] == 100.0 and f"{metrics['APl']:.2f}" == "nan"
    data = root[1]
    non_crowd = [a for a in data["annotations"] if not a["iscrowd"]]
    assert metrics["detections"] == len(non_crowd)
    # the results file: COCO ids, boxes back in the original pixels (64x85 -> 96x128), readable by pycocotools
    from pycocotools.coco import COCO
    gt = COCO(os.path.join(root[0], "annotations", "instances_val.json"))
    with open(results) as f:
        written = json.load(f)
    dt = gt.loadRes(results)
    assert len(dt.getAnnIds()) == len(written) == len(non_crowd)
    by_box = sorted((r["image_id"], r["category_id"], *r["bbox"]) for r in written)
    expected = sorted((a["image_id"], a["category_id"], *a["bbox"]) for a in non_crowd)
    for got, want in zip(by_box, expected):
        assert got[:2] == want[:2] and got[2:] == pytest.approx(want[2:], abs=1e-3)
    shifted = evaluate_detection(GroundTruthModel(shift=1.0), val, "cpu")
    assert shifted["AP50"] == 0.0 and shifted["AP"] == 0.0
    empty = evaluate_detection(GroundTruthModel(empty=True), val, "cpu")
    assert empty["AP"] == 0.0 and empty["detections"] == 0.0


def test_a_bare_detector_goes_through_model_inputs(root):
    torch.manual_seed(0)
    model = build_detector("MV2").eval()
    cfg = make_cfg(root[0], test_batch=2)
    images = [b for b in get_dataset(cfg, seed=0, rank=0, world_size=1)[1]][0]["images"]
    with torch.no_grad():
        got = detect(model, images)
        want = model(model_inputs(model, images))
    assert len(got) == 2 and all(torch.equal(g["boxes"], w["boxes"]) for g, w in zip(got, want))


EVAL_SCRIPT = """
import json, sys
import torch
from mdistiller import distributed
from mdistiller.dataset import get_test_set
from mdistiller.detection.data import eval_loader
from mdistiller.detection.inference import evaluate_detection
from test_detection_run_data import GroundTruthModel, make_cfg

root, out = sys.argv[1], sys.argv[2]
with distributed.process_group():
    rank, world = distributed.rank(), distributed.world_size()
    loader = eval_loader(get_test_set(make_cfg(root)), 2, 0, rank, world)
    model = GroundTruthModel()
    metrics = evaluate_detection(model, loader, "cpu", results_json=f"{out}/results.json")
    seen = [t["image_id"] for b in loader for t in b["targets"]]
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump({"metrics": metrics, "seen": seen}, f)
"""


@pytest.mark.slow
@needs_gloo
def test_torchrun_ranks_share_one_score(root, tmp_path):
    script = tmp_path / "eval_script.py"
    script.write_text(EVAL_SCRIPT)
    result = run_torchrun(str(script), root[0], str(tmp_path), timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["seen"] == list(range(10, 15)) and ranks[1]["seen"] == list(range(15, 20))
    single = evaluate_detection(GroundTruthModel(), eval_loader(get_test_set(make_cfg(root[0])), 2, 0), "cpu")
    assert single["AP"] == pytest.approx(100.0) and math.isnan(single["APl"])
    for metrics in (r["metrics"] for r in ranks):  # every rank returns the one-process scores
        assert set(metrics) == set(single)
        assert all(metrics[k] == v or (math.isnan(metrics[k]) and math.isnan(v)) for k, v in single.items())
    written = json.loads((tmp_path / "results.json").read_text())
    assert len(written) == single["detections"] == ranks[0]["metrics"]["detections"]
    assert {r["image_id"] for r in written} == {a["image_id"] for a in root[1]["annotations"] if not a["iscrowd"]}
