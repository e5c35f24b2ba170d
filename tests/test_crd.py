"""CRD: the NCE loss, the contrast memory (scores, Z, momentum update), the contrastive indices of both data paths,
upstream's checkpoint names, dims read from the models, exact resume and upstream's config through the CLI."""

from __future__ import annotations

import math
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from mdistiller.dataset import ImageArrayDataset, get_dataset
from mdistiller.dataset.contrastive import ContrastiveSampler
from mdistiller.dataset.device_cifar import DeviceCifarLoader, draw_crop_flip
from mdistiller.distillers import get_distiller_class
from mdistiller.distillers.crd import CRD, ContrastMemory, contrast_loss, divide_by_constant, l2_normalize
from mdistiller.engine.build import build_kwargs
from mdistiller.engine.cfg import default_cfg
from mdistiller.engine.checkpoint import strip_module_prefix
from mdistiller.errors import MdistillerError
from mdistiller.models import cifar_model_dict

from conftest import REPO, run_overrides

UPSTREAM_CRD = str(REPO / "tests/data/reference_configs/mdistiller/configs/cifar100/crd.yaml")
OUR_CRD = str(REPO / "configs/cifar100/crd/resnet56_resnet20.yaml")
CPU = torch.device("cpu")
STATS = ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: a second intra-op thread only waits


class TinyNet(torch.nn.Module):
    """A zoo-like (logits, {"pooled_feat"}) CNN, small enough for many steps on a loaded CPU."""

    def __init__(self, width: int = 12, num_classes: int = 10):
        super().__init__()
        nn = torch.nn
        self.body = nn.Sequential(nn.Conv2d(3, width, 3, stride=4, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1))
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        feat = self.body(x).flatten(1)
        return self.fc(feat), {"pooled_feat": feat}


def _crd(num_data: int = 64, k: int = 8, seed: int = 0, zoo: bool = False, **crd_keys) -> CRD:
    """CRD over two TinyNets (widths 12 and 20), or two zoo resnet8 (64 pooled features each)."""
    cfg = default_cfg()
    cfg.DISTILLER.TYPE, cfg.DISTILLER.STUDENT, cfg.DISTILLER.TEACHER = "CRD", "resnet8", "resnet8"
    cfg.CRD.NCE.K = k
    for key, value in crd_keys.items():
        node = cfg.CRD
        *path, leaf = key.split(".")
        for part in path:
            node = node[part]
        node[leaf] = value
    torch.manual_seed(seed)
    if zoo:
        student, teacher = (cifar_model_dict["resnet8"][0](num_classes=10) for _ in range(2))
    else:
        student, teacher = TinyNet(12), TinyNet(20)
    return CRD(student, teacher, cfg, num_data)


def _balanced(n: int = 60, classes: int = 4) -> torch.Tensor:
    return torch.arange(n) % classes


# ---- the loss and the memory, against independent computations ----

def test_nce_loss_on_a_hand_worked_case():
    """B 2, K 2, num_data 4: noise level c = 2/4. Positives 1.5, 0.5 give log(1.5/2), log(0.5/1); negatives 0.5, 1.0,
    1.5, 0 give log(0.5/1), log(0.5/1.5), log(0.5/2), log(0.5/0.5): the product of the ratios is 1/64, so the loss is
    ln(64) / 2 = 3 ln 2 (the 1e-7 eps moves it by < 1e-6)."""
    scores = torch.tensor([[1.5, 0.5, 1.0], [0.5, 1.5, 0.0]]).unsqueeze(-1)
    loss = contrast_loss(scores, 4)
    assert loss.shape == (1,) and loss.dtype == torch.float32
    assert loss.item() == pytest.approx(3 * math.log(2), rel=1e-6)


def test_scores_z_and_memory_update_against_a_float64_computation():
    """out = exp(<other memory's row, v> / T) / Z with Z = mean(first batch's exp-scores) * num_data; then each
    memory's rows y become l2norm(m * row + (1 - m) * v); the scores used the rows read before the update."""
    torch.manual_seed(1)
    memory = ContrastMemory(dim=3, num_data=5, k=2, temperature=0.5, momentum=0.25)
    m1, m2 = memory.memory_v1.double().clone(), memory.memory_v2.double().clone()
    v1 = l2_normalize(torch.randn(2, 3))
    v2 = l2_normalize(torch.randn(2, 3))
    y = torch.tensor([0, 3])
    idx = torch.tensor([[0, 1, 4], [3, 2, 0]])  # column 0: the positive (the sample's own row)
    out_v1, out_v2 = memory(v1, v2, y, idx)

    raw_v2 = np.exp(np.einsum("bkd,bd->bk", m1.numpy()[idx.numpy()], v2.double().numpy()) / 0.5)
    raw_v1 = np.exp(np.einsum("bkd,bd->bk", m2.numpy()[idx.numpy()], v1.double().numpy()) / 0.5)
    z_v1, z_v2 = raw_v1.mean() * 5, raw_v2.mean() * 5
    assert memory.params[2].item() == pytest.approx(z_v1, rel=1e-6)
    assert memory.params[3].item() == pytest.approx(z_v2, rel=1e-6)
    np.testing.assert_allclose(out_v1.squeeze(-1).detach().numpy(), raw_v1 / z_v1, rtol=1e-6)
    np.testing.assert_allclose(out_v2.squeeze(-1).detach().numpy(), raw_v2 / z_v2, rtol=1e-6)
    assert out_v1.shape == (2, 3, 1)

    for new, old, v in ((memory.memory_v1, m1, v1), (memory.memory_v2, m2, v2)):
        mixed = 0.25 * old[y] + 0.75 * v.double()
        expected = mixed / mixed.norm(dim=1, keepdim=True)
        torch.testing.assert_close(new[y].double(), expected, rtol=1e-6, atol=1e-7)
        assert torch.allclose(new[y].norm(dim=1), torch.ones(2))
        untouched = torch.tensor([1, 2, 4])
        assert torch.equal(new[untouched].double(), old[untouched])


def test_params_hold_float32_k_t_z_momentum_and_t_is_used_as_float32():
    memory = ContrastMemory(dim=4, num_data=10, k=16384, temperature=0.07, momentum=0.5)
    assert memory.params.dtype == torch.float32
    assert memory.params.tolist()[:4] == [16384.0, float(np.float32(0.07)), -1.0, -1.0]
    assert memory.temperature == float(np.float32(0.07)) != 0.07  # 0.0700000003, as upstream's .item()
    bound = 1 / math.sqrt(4 / 3)
    assert memory.memory_v1.abs().max() <= bound and memory.memory_v1.shape == (10, 4)


def test_z_is_set_once_then_constant_and_no_gradient_flows_through_it():
    torch.manual_seed(2)
    memory = ContrastMemory(dim=4, num_data=6, k=3, temperature=0.5)
    v1 = l2_normalize(torch.randn(2, 4)).requires_grad_()
    v2 = l2_normalize(torch.randn(2, 4)).requires_grad_()
    idx, y = torch.tensor([[0, 2, 3, 4], [1, 3, 4, 5]]), torch.tensor([0, 1])
    rows_v2 = memory.memory_v2[idx].detach().clone()
    out_v1, out_v2 = memory(v1, v2, y, idx)
    z = memory.params[2:4].clone()
    assert (z > 0).all() and not memory.params.requires_grad
    (contrast_loss(out_v1, 6) + contrast_loss(out_v2, 6)).sum().backward()

    # the gradient of the v1 term with Z a plain number, and (to show the check can fail) with Z depending on v1
    def grad_v1(z_from_batch: bool) -> torch.Tensor:
        v = v1.detach().clone().requires_grad_()
        raw = torch.exp(torch.bmm(rows_v2, v.view(2, 4, 1)) / memory.temperature)
        scale = raw.mean() * 6 if z_from_batch else z[0].item()
        contrast_loss(raw / scale, 6).sum().backward()
        return v.grad

    torch.testing.assert_close(v1.grad, grad_v1(False))
    assert not torch.allclose(v1.grad, grad_v1(True), rtol=1e-3)
    for _ in range(2):  # later batches leave Z alone
        memory(l2_normalize(torch.randn(2, 4)), l2_normalize(torch.randn(2, 4)), y, idx)
        assert torch.equal(memory.params[2:4], z)


def test_division_by_the_z_tensor_rounds_as_division_by_the_python_number():
    x = torch.rand(1000) * 3
    z = torch.tensor(1.2345678e5)
    assert torch.equal(divide_by_constant(x, z), x / z.item())


def test_a_wrong_number_of_negatives_is_named():
    memory = ContrastMemory(dim=4, num_data=6, k=3)
    with pytest.raises(MdistillerError, match=r"contrastive_index has shape \(2, 3\), expected \(2, 4\)"):
        memory(torch.randn(2, 4), torch.randn(2, 4), torch.tensor([0, 1]), torch.zeros(2, 3, dtype=torch.long))


# ---- the distiller ----

def test_distiller_losses_shapes_learnable_parameters_and_training_lowers_the_loss():
    crd = _crd(num_data=32, k=8, **{"NCE.TEMPERATURE": 0.2})
    assert (crd.embed_s.linear.in_features, crd.embed_t.linear.in_features) == (12, 20)  # read from the models
    names = {n for n, _ in crd.named_parameters() if not n.startswith(("student.", "teacher."))}
    assert names == {"embed_s.linear.weight", "embed_s.linear.bias", "embed_t.linear.weight", "embed_t.linear.bias"}
    learnable = {id(p) for p in crd.get_learnable_parameters()}
    assert all(id(p) in learnable for p in crd.embed_t.parameters())  # the teacher's embedding trains too
    assert not any(id(p) in learnable for p in crd.teacher.parameters())
    crd.train()
    generator = torch.Generator().manual_seed(0)
    image = torch.randn(16, 3, 32, 32, generator=generator)
    labels = torch.arange(32) % 4
    index = torch.arange(16)
    sampler = ContrastiveSampler(labels, 8)
    contrastive = sampler.draw(index, labels[index], generator)
    optimizer = torch.optim.SGD(crd.get_learnable_parameters(), lr=0.05)
    first = None
    for _ in range(6):
        _, losses = crd.forward_train(image=image, target=labels[index], index=index, contrastive_index=contrastive,
                                      epoch=1)
        assert losses["loss_kd"].shape == (1,) and losses["loss_ce"].shape == ()
        total = sum(term.mean() for term in losses.values())
        first = total.item() if first is None else first
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
    assert total.item() < first


def test_built_by_keyword_or_positionally_and_without_num_data_refused():
    cfg = default_cfg()
    cfg.DISTILLER.TYPE = "CRD"
    models = [cifar_model_dict["resnet8"][0](num_classes=10) for _ in range(2)]
    assert CRD(*models, cfg, 20).contrast.memory_v1.shape == (20, 128)
    assert CRD(*models, cfg, num_data=30).contrast.memory_v2.shape == (30, 128)
    assert build_kwargs(CRD, num_data=30) == {"num_data": 30}
    with pytest.raises(MdistillerError, match="CRD needs num_data to be built"):
        build_kwargs(CRD)
    assert build_kwargs(get_distiller_class("KD")) == {}


def test_set_dims_must_match_the_models_and_the_error_names_both_sizes():
    assert _crd(zoo=True, **{"FEAT.STUDENT_DIM": 64, "FEAT.TEACHER_DIM": 64}).embed_t.linear.in_features == 64
    with pytest.raises(MdistillerError) as info:
        _crd(zoo=True, **{"FEAT.STUDENT_DIM": 256})
    message = str(info.value)
    assert "\n" not in message and "CRD.FEAT.STUDENT_DIM 256 does not match" in message
    assert "student resnet8 pools 64 features, teacher resnet8 64" in message


def test_dims_probe_draws_no_random_number_and_moves_no_bn_statistic():
    """The dry forward that reads the pooled sizes runs in eval mode on zeros: the first draws after the seed are
    still embed_s's (as upstream, whose dims come from the config), and no BN running statistic moves."""
    student, teacher = (cifar_model_dict["resnet8"][0](num_classes=10) for _ in range(2))
    before = [b.clone() for b in [*student.buffers(), *teacher.buffers()]]
    cfg = default_cfg()
    cfg.DISTILLER.TYPE = "CRD"
    torch.manual_seed(5)
    crd = CRD(student, teacher, cfg, 10)
    torch.manual_seed(5)
    reference = torch.nn.Linear(64, 128)
    assert torch.equal(crd.embed_s.linear.weight, reference.weight)
    assert all(torch.equal(a, b) for a, b in zip(before, [*student.buffers(), *teacher.buffers()]))
    assert crd.student.training and not crd.teacher.training  # modes restored


def test_upstream_checkpoint_names_with_the_dataparallel_prefix_load_strictly():
    """Upstream saves the DataParallel-wrapped distiller: `module.student...`, `module.embed_s.linear.weight`, ...,
    `module.contrast.params/memory_v1/memory_v2`; its Z's and memory come back and are used as loaded."""
    source = _crd(num_data=20, k=4, seed=1)
    source.contrast.params[2:4] = torch.tensor([123.0, 456.0])
    upstream = {f"module.{k}": v for k, v in source.state_dict().items()}
    extras = {k for k in upstream if not k.startswith(("module.student.", "module.teacher."))}
    assert extras == {"module.embed_s.linear.weight", "module.embed_s.linear.bias", "module.embed_t.linear.weight",
                      "module.embed_t.linear.bias", "module.contrast.params", "module.contrast.memory_v1",
                      "module.contrast.memory_v2"}
    target = _crd(num_data=20, k=4, seed=2)
    target(image=torch.randn(4, 3, 32, 32), target=torch.arange(4), index=torch.arange(4),
           contrastive_index=torch.randint(0, 20, (4, 5)))  # its own Z set first
    target.load_state_dict(strip_module_prefix(upstream))  # strict
    assert torch.equal(target.contrast.memory_v1, source.contrast.memory_v1)
    assert not target.contrast.z_checked and target.contrast.k == 4
    target(image=torch.randn(4, 3, 32, 32), target=torch.arange(4), index=torch.arange(4),
           contrastive_index=torch.randint(0, 20, (4, 5)))
    assert target.contrast.params[2:4].tolist() == [123.0, 456.0]  # the loaded Z's, not re-estimated


def test_upstream_trainer_name_crd_is_accepted_for_crd_only():
    from mdistiller.engine.validate import check_recipe

    cfg = default_cfg()
    cfg.DISTILLER.TYPE, cfg.DISTILLER.TEACHER, cfg.DISTILLER.STUDENT = "CRD", "resnet32x4", "resnet8x4"
    for name in ("base", "crd"):
        cfg.SOLVER.TRAINER = name
        assert check_recipe(cfg) is CRD
    cfg.SOLVER.TRAINER = "ours"
    with pytest.raises(MdistillerError, match="DISTILLER.TYPE CRD trains with base or crd"):
        check_recipe(cfg)
    cfg.DISTILLER.TYPE, cfg.SOLVER.TRAINER = "KD", "crd"
    with pytest.raises(MdistillerError, match="SOLVER.TRAINER crd is upstream's trainer for another method"):
        check_recipe(cfg)


def test_bad_crd_keys_give_one_line_errors():
    for keys, message in ((("MODE", "loose"), "CRD.MODE 'loose' is not one of exact, relax"),
                          (("NCE.K", 0), "CRD.NCE.K must be positive"),
                          (("NCE.MOMENTUM", 1.0), r"CRD.NCE.MOMENTUM must be in \[0, 1\)")):
        with pytest.raises(MdistillerError, match=message):
            _crd(**{keys[0]: keys[1]})
    with pytest.raises(MdistillerError, match="CRD trains on batches with 'index' and 'contrastive_index'"):
        _crd().forward_train(image=torch.randn(2, 3, 32, 32), target=torch.tensor([0, 1]))


# ---- configs ----

CRD_TABLE = {  # spec: the CRD paper's CIFAR-100 column (teacher, student) -> CRD top-1
    ("wrn_40_2", "wrn_16_2"): 75.48, ("wrn_40_2", "wrn_40_1"): 74.14, ("resnet56", "resnet20"): 71.16,
    ("resnet110", "resnet20"): 71.46, ("resnet110", "resnet32"): 73.48, ("resnet32x4", "resnet8x4"): 75.51,
    ("vgg13", "vgg8"): 73.94, ("vgg13", "MobileNetV2"): 69.73, ("ResNet50", "MobileNetV2"): 69.11,
    ("ResNet50", "vgg8"): 74.30, ("resnet32x4", "ShuffleV1"): 75.11, ("resnet32x4", "ShuffleV2"): 75.65,
    ("wrn_40_2", "ShuffleV1"): 76.05,
}


def test_cifar_configs_cover_the_crd_table_with_upstreams_recipe():
    from mdistiller.engine.cfg import load_cfg

    paths = sorted((REPO / "configs/cifar100/crd").glob("*.yaml"))
    upstream = load_cfg(UPSTREAM_CRD)
    assert {p.stem for p in paths} == {f"{t}_{s}" for t, s in CRD_TABLE}
    for path in paths:
        cfg = load_cfg(str(path))
        pair = (cfg.DISTILLER.TEACHER, cfg.DISTILLER.STUDENT)
        assert path.stem == "_".join(pair) and cfg.DISTILLER.TYPE == "CRD" and cfg.SOLVER.TRAINER == "crd"
        assert f"CRD {CRD_TABLE[pair]:.2f}" in path.read_text().splitlines()[2]
        low_lr = cfg.DISTILLER.STUDENT in ("MobileNetV2", "ShuffleV1", "ShuffleV2")
        assert cfg.SOLVER.LR == (0.01 if low_lr else upstream.SOLVER.LR)
        for key in ("BATCH_SIZE", "EPOCHS", "LR_DECAY_STAGES", "LR_DECAY_RATE", "WEIGHT_DECAY", "MOMENTUM"):
            assert cfg.SOLVER[key] == upstream.SOLVER[key], (path.name, key)
        assert cfg.CRD == upstream.CRD  # upstream's CRD defaults (dims: read from the models)
    for pair in ("r34_r18", "r50_mv1"):
        ours = load_cfg(str(REPO / "configs/imagenet" / pair / "crd.yaml"))
        theirs = load_cfg(str(REPO / "tests/data/reference_configs/mdistiller/configs/imagenet" / pair / "crd.yaml"))
        assert ours.SOLVER == theirs.SOLVER and ours.CRD == theirs.CRD and ours.DISTILLER == theirs.DISTILLER


# ---- the contrastive indices ----

@pytest.mark.parametrize("mode", ["exact", "relax"])
@pytest.mark.parametrize("k", [20, 45, 60])  # 45 of the other classes each: without / just enough / with replacement
def test_negatives_come_from_other_classes_without_replacement_when_enough_exist(mode, k):
    labels = _balanced(60, 4)
    sampler = ContrastiveSampler(labels, k, mode)
    index = torch.arange(60)
    rows = sampler.draw(index, labels, torch.Generator().manual_seed(k))
    assert rows.shape == (60, k + 1) and rows.dtype == torch.long
    positive, negatives = rows[:, 0], rows[:, 1:]
    assert (labels[negatives] != labels[:, None]).all()
    if mode == "exact":
        assert torch.equal(positive, index)
    else:
        assert torch.equal(labels[positive], labels) and not torch.equal(positive, index)
    distinct = torch.tensor([len(set(row.tolist())) for row in negatives])
    if k <= 45:
        assert sampler.branch == "without" and (distinct == k).all()
    else:
        assert sampler.branch == "with" and (distinct < k).all()


def test_draws_are_uniform_over_the_other_classes_and_relax_positives_over_the_own_class():
    labels = torch.tensor([0] * 3 + [1] * 5 + [2] * 2)
    generator = torch.Generator().manual_seed(0)
    index = torch.zeros(4000, dtype=torch.long)  # sample 0, class 0: negatives uniform over samples 3..9
    for k, branch in ((4, "without"), (9, "with")):
        sampler = ContrastiveSampler(labels, k, "relax")
        assert sampler.branch == branch
        rows = sampler.draw(index, labels[index], generator)
        counts = torch.bincount(rows[:, 1:].reshape(-1), minlength=10).double()
        assert counts[:3].sum() == 0
        assert torch.allclose(counts[3:] / counts[3:].sum(), torch.full((7,), 1 / 7).double(), atol=0.01)
        positives = torch.bincount(rows[:, 0], minlength=10).double() / len(index)
        assert torch.allclose(positives[:3], torch.full((3,), 1 / 3).double(), atol=0.03) and positives[3:].sum() == 0


def test_unequal_classes_take_each_rows_branch_and_always_means_with_replacement():
    labels = torch.tensor([0] * 2 + [1] * 8)  # class 0 sees 8 others, class 1 sees 2
    sampler = ContrastiveSampler(labels, 4)
    assert sampler.branch == "mixed"
    rows = sampler.draw(torch.tensor([0, 1, 5]), labels[[0, 1, 5]], torch.Generator().manual_seed(0))
    assert all(len(set(rows[i, 1:].tolist())) == 4 for i in (0, 1))  # 8 others: no repeats
    assert set(rows[2, 1:].tolist()) <= {0, 1}  # 2 others: drawn with replacement
    always = ContrastiveSampler(_balanced(60, 4), 5, replacement="always")
    assert always.branch == "with"
    with pytest.raises(MdistillerError, match="at least two classes"):
        ContrastiveSampler(torch.zeros(5, dtype=torch.long), 2)


def test_a_batch_draw_equals_one_draw_per_row_from_the_same_generator_state():
    labels = _balanced(40, 4)
    index = torch.tensor([3, 17, 22, 8, 39])
    for k, mode in ((10, "relax"), (35, "exact"), (35, "relax")):
        sampler = ContrastiveSampler(labels, k, mode)
        batch = sampler.draw(index, labels[index], torch.Generator().manual_seed(7))
        generator = torch.Generator().manual_seed(7)
        rows = [sampler.draw_one(int(i), int(labels[i]), generator) for i in index]
        assert torch.equal(batch, torch.stack(rows))


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def test_both_data_paths_draw_the_same_negatives_from_the_same_rng_state():
    """The device-resident loader (run on the CPU) draws a batch's rows from its generator right after the crop/flip
    numbers; the DataLoader path's items, fed that very RNG state, draw the same rows one item after the other."""
    labels = _balanced(48, 4).numpy()
    images = _images(48)
    sampler = ContrastiveSampler(torch.as_tensor(labels), 12, "relax")
    loader = DeviceCifarLoader(images, labels, 16, *STATS, CPU, train=True, seed=4, contrastive=sampler)
    batches = list(loader)
    dataset = ImageArrayDataset(images, labels, {})
    dataset.contrastive = sampler
    replay = torch.Generator().manual_seed(4)  # the loader's stream, replayed
    order = torch.randperm(48, generator=replay)
    for step, batch in enumerate(batches):
        index = order[16 * step:16 * (step + 1)]
        draw_crop_flip(16, replay, CPU)
        saved = torch.get_rng_state()
        torch.set_rng_state(replay.get_state())
        items = [dataset[int(i)] for i in index]
        replay.set_state(torch.get_rng_state())
        torch.set_rng_state(saved)
        assert torch.equal(batch["index"], index)
        assert torch.equal(batch["contrastive_index"], torch.stack([item["contrastive_index"] for item in items]))
        assert all(item["index"] == int(i) and item["target"] == labels[i] for item, i in zip(items, index))


def test_device_loader_is_deterministic_resumable_and_shards_the_global_batch():
    labels = _balanced(40, 4).numpy()
    images = _images(40, 1)

    def loader(rank: int = 0, world: int = 1) -> DeviceCifarLoader:
        sampler = ContrastiveSampler(torch.as_tensor(labels), 8)
        return DeviceCifarLoader(images, labels, 16, *STATS, CPU, train=True, seed=9, rank=rank, world_size=world,
                                 contrastive=sampler)

    one = loader()
    saved = one.generator.get_state()
    first = list(one)
    assert all(b["contrastive_index"].shape == (len(b["index"]), 9) for b in first)
    assert all(torch.equal(b["contrastive_index"][:, 0], b["index"]) for b in first)
    assert all((torch.as_tensor(labels)[b["contrastive_index"][:, 1:]] != b["target"][:, None]).all() for b in first)
    second = list(one)
    assert not torch.equal(first[0]["contrastive_index"], second[0]["contrastive_index"])  # a new epoch's draws
    one.generator.set_state(saved)  # what resume restores
    replayed = list(one)
    fresh = list(loader())
    for a, b, c in zip(first, replayed, fresh):
        assert torch.equal(a["contrastive_index"], b["contrastive_index"])
        assert torch.equal(a["contrastive_index"], c["contrastive_index"])
    ranks = [list(loader(r, 2)) for r in range(2)]
    for step, batch in enumerate(first):
        for key in ("index", "contrastive_index"):
            assert torch.equal(torch.cat([ranks[0][step][key], ranks[1][step][key]]), batch[key])


def test_get_dataset_serves_the_need_on_the_dataloader_path_only_for_training(cifar100_tiny_root):
    cfg = default_cfg()
    cfg.DATASET.ROOT, cfg.DATASET.NUM_WORKERS, cfg.SOLVER.BATCH_SIZE = cifar100_tiny_root, 0, 16
    needs = CRD.batch_needs_of(_with(cfg, "CRD.NCE.K", 20))
    assert needs == {"contrastive_index": {"k": 20, "mode": "exact"}}
    train, val, num_train, _ = get_dataset(cfg, seed=0, needs=needs)
    batch = next(iter(train))
    assert batch["contrastive_index"].shape == (16, 21)
    assert torch.equal(batch["contrastive_index"][:, 0], batch["index"])
    labels = train.dataset.labels
    assert (labels[batch["contrastive_index"][:, 1:]] != batch["target"][:, None]).all()
    assert "contrastive_index" not in next(iter(val))
    plain, _, _, _ = get_dataset(cfg, seed=0)
    assert "contrastive_index" not in next(iter(plain))
    with pytest.raises(MdistillerError, match="the data path cannot serve nearest_neighbours"):
        get_dataset(cfg, seed=0, needs={"nearest_neighbours": {}})


def _with(cfg, key: str, value):
    cfg = cfg.clone()
    node = cfg
    *path, leaf = key.split(".")
    for part in path:
        node = node[part]
    node[leaf] = value
    return cfg


@pytest.mark.parametrize("gpu_decode", [False, True], ids=["pil", "decode-path-on-cpu"])
def test_imagenet_folders_serve_exact_positives_and_negatives_with_replacement(tmp_path, monkeypatch, gpu_decode):
    from test_imagenet_data import imagenet_cfg, write_imagenet

    from mdistiller.dataset.imagenet import DECODE_ON_CPU_ENV

    monkeypatch.setenv(DECODE_ON_CPU_ENV, "1")
    cfg = imagenet_cfg(write_imagenet(str(tmp_path), n_train=4, n_val=1), batch=6)
    cfg.DATASET.GPU_DECODE = gpu_decode
    train, _, num_train, _ = get_dataset(cfg, seed=0, device=CPU, needs={"contrastive_index": {"k": 6}})
    assert train.dataset.contrastive.branch == "with"  # 8 others >= 6, but upstream's folders always replace
    batch = next(iter(train))
    rows = batch["contrastive_index"]
    assert rows.shape == (6, 7) and torch.equal(rows[:, 0], batch["index"])
    targets = torch.as_tensor(train.dataset.targets)
    assert (targets[rows[:, 1:]] != batch["target"][:, None]).all() and batch["image"].shape == (6, 3, 32, 32)


# ---- training runs ----

def _run_args(tmp: Path, root: str, teacher: str, *extra: str) -> list[str]:
    return ["--cfg", OUR_CRD, *run_overrides(tmp, root), "DISTILLER.TEACHER", "resnet8", "DISTILLER.STUDENT",
            "resnet8", "DISTILLER.TEACHER_CKPT", teacher, "SOLVER.BATCH_SIZE", "16", "CRD.NCE.K", "24", *extra]


def test_sigint_mid_epoch_then_resume_is_bitwise_exact_memory_included(tmp_path, cifar100_tiny_root, teacher_ckpt,
                                                                        monkeypatch, capsys):
    from mdistiller.cli import train as train_tool

    teacher = teacher_ckpt("resnet8")
    whole = train_tool.main(_run_args(tmp_path / "whole", cifar100_tiny_root, teacher))
    calls = []
    original = CRD.forward_train

    def interrupting(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # epoch 1, step 2 of 4
            signal.raise_signal(signal.SIGINT)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(CRD, "forward_train", interrupting)
    args = _run_args(tmp_path / "split", cifar100_tiny_root, teacher)
    with pytest.raises(SystemExit):
        train_tool.main(args)
    monkeypatch.setattr(CRD, "forward_train", original)
    split = train_tool.main(["--resume", *args])
    a = torch.load(Path(whole["run_dir"]) / "latest", weights_only=False)["model"]
    b = torch.load(Path(split["run_dir"]) / "latest", weights_only=False)["model"]
    assert set(a) == set(b) and "contrast.memory_v1" in a
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert a["contrast.params"][2] > 0
    assert torch.load(Path(split["run_dir"]) / "latest", weights_only=False)["epoch"] == 1


@pytest.mark.slow
def test_upstream_crd_config_trains_one_epoch_unchanged(tmp_path, cifar100_tiny_root, teacher_ckpt):
    """Upstream's configs/cifar100/crd.yaml (resnet32x4 -> resnet8x4, SOLVER.TRAINER crd, dims left at their default)
    on 64 images: K lowered to 32 so that the negatives (about 57 per class) are drawn without replacement."""
    from mdistiller.cli import train as train_tool

    result = train_tool.main(["--cfg", UPSTREAM_CRD, *run_overrides(tmp_path, cifar100_tiny_root),
                              "DISTILLER.TEACHER_CKPT", teacher_ckpt("resnet32x4"), "CRD.NCE.K", "32"])
    state = torch.load(Path(result["run_dir"]) / "latest", weights_only=False)["model"]
    assert state["embed_s.linear.weight"].shape == (128, 256) and state["contrast.memory_v1"].shape == (64, 128)
    assert state["contrast.params"].tolist()[0] == 32.0 and state["contrast.params"][2] > 0
    assert (Path(result["run_dir"]) / "student_best").exists()


# ---- under torchrun ----

class LinearNet(torch.nn.Module):
    """No BatchNorm: a sample's pooled feature does not depend on the rest of its batch (rank slices compare)."""

    def __init__(self, width: int):
        super().__init__()
        self.proj = torch.nn.Linear(3 * 32 * 32, width)
        self.fc = torch.nn.Linear(width, 4)

    def forward(self, x):
        feat = self.proj(x.flatten(1))
        return self.fc(feat), {"pooled_feat": feat}


def ddp_crd() -> CRD:
    """The same CRD in every process (global batch 16, K 6, 40 samples of 4 classes)."""
    cfg = default_cfg()
    cfg.DISTILLER.TYPE, cfg.CRD.NCE.K, cfg.SOLVER.BATCH_SIZE = "CRD", 6, 16
    torch.manual_seed(0)
    return CRD(LinearNet(12), LinearNet(20), cfg, num_data=40)


def ddp_batches() -> list[dict]:
    """Two global batches: 16 samples, then a partial 5 (split 3 / 2: rank 1 pads its update rows)."""
    generator = torch.Generator().manual_seed(1)
    labels = torch.arange(40) % 4
    order = torch.randperm(40, generator=generator)
    sampler = ContrastiveSampler(labels, 6)
    batches = []
    for index in (order[:16], order[16:21]):
        batches.append({"image": torch.randn(len(index), 3, 32, 32, generator=generator), "target": labels[index],
                        "index": index, "contrastive_index": sampler.draw(index, labels[index], generator)})
    return batches


DDP_SCRIPT = """
import sys
import torch
from mdistiller import distributed
from mdistiller.engine.cfg import default_cfg
from mdistiller.engine.placement import wrap_ddp
from test_crd import ddp_batches, ddp_crd

with distributed.process_group():
    crd = ddp_crd()
    ddp = wrap_ddp(crd, default_cfg(), torch.device("cpu"))
    for batch in ddp_batches():
        lo, hi = distributed.shard_bounds(len(batch["target"]), distributed.rank(), distributed.world_size())
        _, losses = ddp(**{k: v[lo:hi] for k, v in batch.items()}, epoch=1)
        sum(term.mean() for term in losses.values()).backward()
    state = {k: v.clone() for k, v in crd.state_dict().items() if k.startswith("contrast.")}
    gathered = distributed.all_gather_object(state)
    if distributed.is_main_process():
        torch.save({"ranks": gathered, "ignored": sorted(ddp.parameters_to_ignore)}, sys.argv[1])
"""


@pytest.mark.slow
def test_under_torchrun_every_rank_updates_its_memory_with_the_whole_global_batch(tmp_path):
    """Two ranks, each its slice of two global batches (the second partial and split unevenly): both memories equal
    each other bitwise, and the one-process memories after the same global batches; Z is the global mean; DDP does
    not broadcast the memories."""
    from conftest import run_torchrun as _torchrun

    if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
        pytest.skip("torch.distributed with the gloo backend is not available")
    script = tmp_path / "crd_ddp.py"
    script.write_text(DDP_SCRIPT)
    result = _torchrun(str(script), str(tmp_path / "state.pt"))
    assert result.returncode == 0, result.stderr[-3000:]
    saved = torch.load(tmp_path / "state.pt", weights_only=False)
    rank0, rank1 = saved["ranks"]
    assert {"contrast.memory_v1", "contrast.memory_v2", "contrast.params"} <= set(saved["ignored"])
    reference = ddp_crd()
    for batch in ddp_batches():
        reference(**batch, epoch=1)
    for key, value in reference.state_dict().items():
        if key.startswith("contrast."):
            assert torch.equal(rank0[key], rank1[key]), key
            torch.testing.assert_close(rank0[key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_bench_times_crd_steps_with_the_data_paths_indices(capsys):
    """tools/bench.py --cfg <a CRD config>: the loaders come from get_dataset with CRD's needs, the distiller gets
    num_data, and the timed steps are CRD's (the memory holds the training set's rows)."""
    from mdistiller.cli import bench

    rows = bench.main(["--device", "cpu", "--cfg", "configs/cifar100/crd/resnet32x4_resnet8x4.yaml", "--tiny",
                       "--data", "synthetic", "--synthetic-size", "40", "--steps", "1", "--warmup", "0", "--rows",
                       "ours", "--opts", "SOLVER.BATCH_SIZE", "8", "CRD.NCE.K", "16", "DATASET.NUM_WORKERS", "0"])
    assert [r["name"] for r in rows] == ["ours"] and rows[0]["images_per_s"] > 0
    assert "CRD resnet20 -> resnet8" in capsys.readouterr().out


def test_tiny_imagenet_serves_the_need_like_upstreams_folder(tmp_path):
    from test_tiny_imagenet_data import tiny_cfg, write_tiny_imagenet

    cfg = tiny_cfg(write_tiny_imagenet(str(tmp_path)), batch=6)
    train, _, _, _ = get_dataset(cfg, seed=0, needs=CRD.batch_needs_of(_with(cfg, "CRD.NCE.K", 5)))
    batch = next(iter(train))
    rows, targets = batch["contrastive_index"], torch.as_tensor(train.dataset.targets)
    assert train.dataset.contrastive.branch == "with" and rows.shape == (6, 6)
    assert torch.equal(rows[:, 0], batch["index"]) and (targets[rows[:, 1:]] != batch["target"][:, None]).all()


# ---- CUDA (skipped without a GPU) ----

@pytest.mark.cuda
def test_on_cuda_the_device_loader_draws_valid_reproducible_rows_and_z_divides_as_a_python_number():
    cuda = torch.device("cuda")
    labels = _balanced(200, 10)
    images = _images(200, 2)

    def batches() -> list[dict]:
        sampler = ContrastiveSampler(labels.to(cuda), 64, "relax")
        return list(DeviceCifarLoader(images, labels.numpy(), 32, *STATS, cuda, train=True, seed=3,
                                      contrastive=sampler))

    first, again = batches(), batches()
    for a, b in zip(first, again):
        rows = a["contrastive_index"]
        assert rows.device.type == "cuda" and rows.shape == (len(a["index"]), 65)
        assert torch.equal(rows, b["contrastive_index"])
        cls = labels.to(cuda)
        assert torch.equal(cls[rows[:, 0]], a["target"]) and (cls[rows[:, 1:]] != a["target"][:, None]).all()
        assert all(len(set(row.tolist())) == 64 for row in rows[:, 1:])
    x = torch.rand(4096, device=cuda) * 3
    z = torch.tensor(1.2345678e5, device=cuda)
    assert torch.equal(divide_by_constant(x, z), x / z.item())  # CUDA: a * (1 / b) for a host scalar b
