"""DistributedDataParallel under torchrun (CPU, gloo): the sharded sampler and loaders, one DDP step against one
process, rank-0-only outputs, resume under torchrun, and the errors of a run that cannot be split."""

from __future__ import annotations

import copy
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import BatchSampler, RandomSampler

from mdistiller.dataset import ShardedBatchSampler, eval_loader
from mdistiller.dataset.device_cifar import DeviceCifarLoader
from mdistiller.distributed import rank_seed, shard_bounds
from mdistiller.engine.cfg import default_cfg
from mdistiller.engine.placement import check_distributed
from mdistiller.errors import MdistillerError

from conftest import REPO, needs_gloo, run_overrides
from conftest import run_torchrun as _torchrun
from dot_protocol import upstream_dot_step

pytestmark = pytest.mark.slow  # subprocesses / multi-process runs: the full suite runs them, `-m "not slow"` skips them

VANILLA = str(REPO / "configs/cifar100/vanilla/resnet8.yaml")
RUN_NAME = "vanilla,resnet8,SOLVER.EPOCHS:2,SOLVER.BATCH_SIZE:16"


# ---- the sampler and the loaders (no process group) ----

def test_rank_slices_of_each_global_batch_make_up_the_one_process_batch():
    n, batch = 70, 16  # the last global batch (6) is partial and splits 3 / 3
    reference = list(BatchSampler(RandomSampler(range(n), generator=torch.Generator().manual_seed(5)), batch, False))
    shards = [list(ShardedBatchSampler(n, batch, r, 2, torch.Generator().manual_seed(5))) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == len(reference) == len(ShardedBatchSampler(n, batch, 0, 2, None))
    for step, expected in enumerate(reference):
        assert shards[0][step] + shards[1][step] == expected
        assert abs(len(shards[0][step]) - len(shards[1][step])) <= 1


def test_each_pass_draws_a_new_permutation_and_a_restored_generator_replays_it():
    generator = torch.Generator().manual_seed(0)
    sampler = ShardedBatchSampler(64, 16, 1, 2, generator)
    first = list(sampler)
    saved = generator.get_state()  # what the trainer saves at an epoch's start
    second = list(sampler)
    assert first != second  # the next epoch's permutation
    generator.set_state(saved)
    iterator = iter(sampler)
    for _ in range(2):  # a mid-epoch resume loads (not trains on) the batches already seen
        next(iterator)
    assert list(iterator) == second[2:]


def test_a_last_batch_smaller_than_the_world_is_dropped_on_every_rank():
    shards = [list(ShardedBatchSampler(33, 16, r, 4, torch.Generator().manual_seed(0))) for r in range(4)]
    assert [len(s) for s in shards] == [2, 2, 2, 2]
    assert len(ShardedBatchSampler(33, 16, 0, 4, None)) == 2


def test_shards_of_the_test_set_are_contiguous_and_count_every_sample_once():
    for count, world in [(10, 3), (2, 4), (128, 8)]:
        bounds = [shard_bounds(count, r, world) for r in range(world)]
        assert bounds[0][0] == 0 and bounds[-1][1] == count
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    dataset = list(range(11))
    loaded = [torch.cat(list(eval_loader(dataset, 4, 0, r, 3))).tolist() for r in range(3)]
    assert sum(loaded, []) == dataset


def _device_loader(rank: int, world: int, train: bool = True) -> DeviceCifarLoader:
    images = np.random.default_rng(0).integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)
    labels = np.arange(40) % 10
    return DeviceCifarLoader(images, labels, 16, (0.5,) * 3, (0.25,) * 3, torch.device("cpu"), train=train, seed=3,
                             rank=rank, world_size=world)


def test_device_loader_ranks_train_on_the_one_process_augmented_global_batches():
    one = list(_device_loader(0, 1))
    ranks = [list(_device_loader(r, 2)) for r in range(2)]
    assert len(one) == len(ranks[0]) == len(ranks[1]) == len(_device_loader(1, 2)) == 3
    for step, batch in enumerate(one):
        for key in ("image", "target", "index"):
            assert torch.equal(torch.cat([ranks[0][step][key], ranks[1][step][key]]), batch[key])
    # each rank's own images got their own crops: the ranks' random numbers differ
    assert not torch.equal(ranks[0][0]["image"], ranks[1][0]["image"])


def test_device_test_loader_gives_each_rank_a_contiguous_share():
    shares = [torch.cat([b["index"] for b in _device_loader(r, 3, train=False)]) for r in range(3)]
    assert torch.equal(torch.cat(shares), torch.arange(40))


def test_rank_seeds_differ_between_ranks_and_are_stable():
    assert rank_seed(0, 1) != rank_seed(0, 2) and rank_seed(0, 1) == rank_seed(0, 1)
    assert 0 <= rank_seed(2**40, 7) < 2**63


def test_batch_not_divisible_by_the_world_and_syncbn_off_cuda_are_clear_errors():
    cfg = default_cfg()
    cfg.SOLVER.BATCH_SIZE = 30
    with pytest.raises(MdistillerError, match="SOLVER.BATCH_SIZE 30 .* not divisible by the 4 processes"):
        check_distributed(cfg, torch.device("cpu"), 4)
    check_distributed(cfg, torch.device("cpu"), 1)  # one process: any batch
    cfg.SOLVER.BATCH_SIZE = 32
    cfg.DISTRIBUTED.SYNC_BN = True
    with pytest.raises(MdistillerError, match="DISTRIBUTED.SYNC_BN needs CUDA"):
        check_distributed(cfg, torch.device("cpu"), 2)


# ---- one DDP step against one process ----

GLOBAL_BATCH = 8


def step_cfg(trainer: str = "base"):
    """KD with a BatchNorm student, SGD with momentum and weight decay (DOT's under trainer "dot"): what one step's
    comparison needs."""
    cfg = default_cfg()
    cfg.DISTILLER.TYPE = "KD"
    cfg.SOLVER.TRAINER = trainer
    cfg.SOLVER.LR = 0.1
    return cfg


def build_kd(cfg):
    """The same KD distiller (resnet8 student, resnet8 teacher, 10 classes) in every process."""
    from mdistiller.distillers import get_distiller_class
    from mdistiller.models import cifar_model_dict

    torch.manual_seed(0)
    student = cifar_model_dict["resnet8"][0](num_classes=10)
    teacher = cifar_model_dict["resnet8"][0](num_classes=10)
    return get_distiller_class("KD")(student, teacher, cfg)


def global_batch() -> dict[str, torch.Tensor]:
    """A fixed global batch (no augmentation: the comparison is about the step, not the data)."""
    generator = torch.Generator().manual_seed(1)
    return {"image": torch.randn(GLOBAL_BATCH, 3, 32, 32, generator=generator),
            "target": torch.randint(0, 10, (GLOBAL_BATCH,), generator=generator)}


STEP_SCRIPT = """
import sys
import torch
from mdistiller import distributed
from mdistiller.engine.trainer import Trainer
from test_distributed import DOT_STEPS, build_kd, global_batch, step_cfg

out = sys.argv[1]
with distributed.process_group():
    cfg = step_cfg()
    trainer = Trainer(out, build_kd(cfg), [], [], cfg, torch.device("cpu"))
    lo, hi = distributed.shard_bounds(len(global_batch()["target"]), distributed.rank(), distributed.world_size())
    trainer.distiller.train()
    _, losses = trainer.train_step({k: v[lo:hi] for k, v in global_batch().items()}, 1)
    loss = float(sum(term.mean() for term in losses.values()))
    gathered = distributed.all_gather_object((loss, {k: v.clone() for k, v in trainer.distiller.state_dict().items()}))
    if distributed.is_main_process():
        torch.save({"ranks": gathered, "ignored": sorted(trainer.ddp.parameters_to_ignore)}, out + "/step.pt")

    # SOLVER.TRAINER dot: DOT_STEPS steps of the DOT update on the same halves (test_ddp_dot_steps_...)
    cfg = step_cfg("dot")
    trainer = Trainer(out, build_kd(cfg), [], [], cfg, torch.device("cpu"))
    trainer.distiller.train()
    for _ in range(DOT_STEPS):
        trainer.train_step({k: v[lo:hi] for k, v in global_batch().items()}, 1)
    params = {k: v.detach().clone() for k, v in trainer.distiller.named_parameters() if not k.startswith("teacher.")}
    gathered = distributed.all_gather_object((params, trainer.optimizer.state_dict()))
    if distributed.is_main_process():
        torch.save(gathered, out + "/dot_step.pt")
"""
DOT_STEPS = 2


@pytest.fixture(scope="module")
def ddp_steps(tmp_path_factory) -> Path:
    """One torchrun of STEP_SCRIPT (2 processes): the folder holding step.pt (plain SGD) and dot_step.pt (DOT)."""
    tmp = tmp_path_factory.mktemp("ddp_steps")
    script = tmp / "ddp_step.py"
    script.write_text(STEP_SCRIPT)
    result = _torchrun(str(script), str(tmp))
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp


@needs_gloo
def test_one_ddp_step_on_two_halves_equals_one_process_on_the_mean_of_the_halves_losses(ddp_steps):
    """DDP averages the ranks' gradients, so its step is the gradient step of (L0 + L1) / 2, L_r the mean loss of
    rank r's half of the global batch. BatchNorm (no SyncBN) normalises each half with that half's own statistics, so
    the one-process reference runs the halves through the model separately and steps on the mean of their losses:
    the weights must agree up to float summation order. Each rank's BN running statistics follow its own half; the
    teacher is excluded from DDP and unchanged."""
    saved = torch.load(ddp_steps / "step.pt", weights_only=False)
    (loss0, state0), (loss1, state1) = saved["ranks"]

    cfg = step_cfg()
    from mdistiller.engine.optim import build_optimizer

    reference = build_kd(cfg)
    before = copy.deepcopy(reference)
    reference.train()
    optimizer = build_optimizer(cfg, reference)
    batch = global_batch()
    halves = [{k: v[lo:hi] for k, v in batch.items()} for lo, hi in (shard_bounds(GLOBAL_BATCH, r, 2) for r in (0, 1))]
    losses = [sum(t.mean() for t in reference(**half, epoch=1)[1].values()) for half in halves]
    optimizer.zero_grad()
    ((losses[0] + losses[1]) / 2).backward()
    optimizer.step()
    assert loss0 == pytest.approx(losses[0].item(), rel=1e-5) and loss1 == pytest.approx(losses[1].item(), rel=1e-5)

    assert not any(k.startswith("module.") for k in state0)
    for name, param in reference.named_parameters():
        torch.testing.assert_close(state0[name], param.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(state1[name], param.detach(), rtol=1e-5, atol=1e-6)
    for rank, (state, half) in enumerate(zip((state0, state1), halves)):  # running statistics: the rank's own half
        own = copy.deepcopy(before).train()
        with torch.no_grad():
            own(**half, epoch=1)
        for name, buffer in own.named_buffers():
            torch.testing.assert_close(state[name], buffer, rtol=1e-5, atol=1e-6, msg=f"rank {rank} {name}")
    teacher = {f"teacher.{k}" for k in before.teacher.state_dict()}
    assert set(saved["ignored"]) == teacher
    for name in teacher:
        assert torch.equal(state0[name], before.state_dict()[name])


@needs_gloo
def test_ddp_dot_steps_equal_one_process_stepping_on_the_mean_of_the_halves_losses(ddp_steps):
    """SOLVER.TRAINER dot under torchrun: one DDP forward, two backward passes (KD, then task), each gradient averaged
    over the ranks. Two steps on two halves equal one process running upstream's DOT protocol on the mean of the
    halves' KD losses and the mean of their CE losses (BatchNorm: each half with its own statistics, as each rank's);
    both ranks hold the same weights and optimizer state, and the second step's DDP forward found nothing pending."""
    (params0, optim0), (params1, optim1) = torch.load(ddp_steps / "dot_step.pt", weights_only=False)

    from mdistiller.engine.optim import build_optimizer

    cfg = step_cfg("dot")
    reference = build_kd(cfg).train()
    optimizer = build_optimizer(cfg, reference)
    batch = global_batch()
    halves = [{k: v[lo:hi] for k, v in batch.items()} for lo, hi in (shard_bounds(GLOBAL_BATCH, r, 2) for r in (0, 1))]
    for _ in range(DOT_STEPS):
        terms = [reference(**half, epoch=1)[1] for half in halves]
        loss_kd = sum(t["loss_kd"].mean() for t in terms) / 2
        loss_ce = sum(t["loss_ce"].mean() for t in terms) / 2
        upstream_dot_step(optimizer, loss_kd, loss_ce)
    for name, param in reference.named_parameters():
        if name.startswith("teacher."):
            continue
        torch.testing.assert_close(params0[name], param.detach(), rtol=1e-5, atol=1e-6, msg=name)
        assert torch.equal(params0[name], params1[name]), name
    for state0, state1 in zip(optim0["state"].values(), optim1["state"].values()):
        assert set(state0) == {"momentum_buffer", "momentum_kd_buffer"}
        assert all(torch.equal(state0[k], state1[k]) for k in state0)


# ---- tools/train.py under torchrun ----

def _train_args(tmp: Path, data_root: str, *extra: str) -> list[str]:
    return ["--cfg", VANILLA, *run_overrides(tmp, data_root), "SOLVER.EPOCHS", "2", "SOLVER.BATCH_SIZE", "16",
            "LOG.SAVE_CHECKPOINT_FREQ", "1", "EXPERIMENT.DETERMINISTIC", "True", *extra]


def _run_dir(tmp: Path) -> Path:
    return tmp / "output" / "cifar100_baselines" / RUN_NAME


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, cifar100_tiny_root):
    """A finished 2-process run of tools/train.py (2 epochs of 4 global batches of 16)."""
    tmp = tmp_path_factory.mktemp("ddp_run")
    result = _torchrun(str(REPO / "tools" / "train.py"), *_train_args(tmp, cifar100_tiny_root))
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp, result


@needs_gloo
def test_torchrun_run_writes_every_file_once_from_rank_0(ddp_run):
    tmp, result = ddp_run
    run_dir = _run_dir(tmp)
    assert sorted(os.listdir(run_dir)) == ["best", "config.yaml", "epoch_1", "epoch_2", "identity.json", "latest",
                                           "log.txt", "student_1", "student_2", "student_best", "student_latest",
                                           "train.events", "worklog.txt"]
    assert (run_dir / "log.txt").read_text().count("epoch 2/2") == 1  # rank 0 alone writes the run log
    assert len(os.listdir(run_dir / "train.events")) == 1  # one tensorboard writer
    worklog = (run_dir / "worklog.txt").read_text()
    assert re.findall(r"^epoch: (\d+)$", worklog, re.M) == ["1", "2"]
    assert len(re.findall(r"^best_acc\t", worklog, re.M)) == 1
    results = list((tmp / "logs").iterdir())
    assert len(results) == 1 and len(results[0].read_text().splitlines()) == 1
    output = result.stdout + result.stderr
    assert output.count("epoch 1/2") == 1 and output.count("result appended") == 1
    assert "x 2 processes (global batch 16)" in output
    latest = torch.load(run_dir / "latest", weights_only=False)
    assert not any(k.startswith("module.") for k in latest["model"])
    assert len(latest["rng_ranks"]) == 2
    assert not torch.equal(latest["rng_ranks"][0]["torch"], latest["rng_ranks"][1]["torch"])


@needs_gloo
def test_torchrun_resume_from_an_epoch_checkpoint_finishes_bitwise_equal(ddp_run, tmp_path, cifar100_tiny_root):
    """`latest` as it was after epoch 1 (the run's epoch_1), continued with --resume under torchrun: every rank
    loads it and its own RNG state, and the run ends with the uninterrupted run's weights, to the bit."""
    tmp, _ = ddp_run
    shutil.copytree(_run_dir(tmp), _run_dir(tmp_path))
    run_dir = _run_dir(tmp_path)
    shutil.copy(run_dir / "epoch_1", run_dir / "latest")
    result = _torchrun(str(REPO / "tools" / "train.py"), "--resume", *_train_args(tmp_path, cifar100_tiny_root))
    assert result.returncode == 0, result.stderr[-3000:]
    assert (result.stdout + result.stderr).count("resumed from") == 1
    resumed = torch.load(run_dir / "student_latest", weights_only=False)["model"]
    reference = torch.load(_run_dir(tmp) / "student_latest", weights_only=False)["model"]
    assert resumed.keys() == reference.keys()
    for key in reference:
        assert torch.equal(resumed[key], reference[key]), key
    assert re.findall(r"^epoch: (\d+)$", (run_dir / "worklog.txt").read_text(), re.M) == ["1", "2"]


@needs_gloo
def test_torchrun_with_a_batch_the_processes_cannot_split_fails_with_one_clear_line(tmp_path, cifar100_tiny_root):
    args = _train_args(tmp_path, cifar100_tiny_root, "SOLVER.BATCH_SIZE", "15")
    result = _torchrun(str(REPO / "tools" / "train.py"), *args)
    assert result.returncode != 0
    message = "error: SOLVER.BATCH_SIZE 15 (the global batch) is not divisible by the 2 processes"
    assert result.stderr.count(message) == 1  # rank 0 reports what every rank found alike
    assert not (tmp_path / "output").exists()


SIGTERM_ON_RANK_1 = """
import os, runpy, signal, sys
from mdistiller.engine.trainer import Trainer

calls = 0
original = Trainer.forward_step


def forward_step(self, batch, epoch):
    global calls
    calls += 1
    if calls == 6 and int(os.environ["RANK"]) == 1:  # epoch 2, step 2: only rank 1 is signalled
        os.kill(os.getpid(), signal.SIGTERM)
    return original(self, batch, epoch)


Trainer.forward_step = forward_step
sys.argv = [sys.argv[1], *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@needs_gloo
def test_sigterm_on_one_rank_stops_every_rank_at_the_same_step_and_resume_is_bitwise_exact(ddp_run, tmp_path,
                                                                                           cifar100_tiny_root):
    """The ranks agree on the stop flag after each step (every step on the CPU), so all stop after epoch 2's second
    step; `latest` holds that step, the epoch's sums over both ranks and both ranks' RNG states, and --resume under
    torchrun replays the sampler and ends with the uninterrupted run's weights, to the bit."""
    script = tmp_path / "sigterm_rank1.py"
    script.write_text(SIGTERM_ON_RANK_1)
    args = _train_args(tmp_path, cifar100_tiny_root)
    stopped = _torchrun(str(script), str(REPO / "tools" / "train.py"), *args)
    assert stopped.returncode != 0
    assert stopped.stderr.count("interrupted by SIGTERM at epoch 2, step 2/4") == 1, stopped.stderr[-3000:]
    assert "continue with: torchrun --nproc_per_node 2 " in stopped.stderr
    run_dir = _run_dir(tmp_path)
    partial = torch.load(run_dir / "latest", weights_only=False)["partial"]
    assert (partial["epoch"], partial["step"], partial["stats"]["seen"]) == (2, 2, 32)  # 2 steps x 16, both ranks

    resumed = _torchrun(str(REPO / "tools" / "train.py"), "--resume", *args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    reference = torch.load(_run_dir(ddp_run[0]) / "student_latest", weights_only=False)["model"]
    final = torch.load(run_dir / "student_latest", weights_only=False)["model"]
    for key in reference:
        assert torch.equal(final[key], reference[key]), key
    assert re.findall(r"^epoch: (\d+)$", (run_dir / "worklog.txt").read_text(), re.M) == ["1", "2"]
    # the epoch's train loss and accuracy, summed over the ranks before and after the stop, are the uninterrupted ones
    assert _worklog_without_times(run_dir) == _worklog_without_times(_run_dir(ddp_run[0]))


def _worklog_without_times(run_dir: Path) -> list[str]:
    lines = (run_dir / "worklog.txt").read_text().splitlines()
    return [line for line in lines if not line.startswith("epoch_seconds")]


@needs_gloo
def test_torchrun_trains_kd_on_an_imagenet_folder(tmp_path, tmp_path_factory):
    """`torchrun ... tools/train.py` with an ImageNet config on a tiny ImageFolder of real JPEGs: 2 processes, global
    batch 8 (4 a rank), a torchvision-format teacher; the 24 training images make 3 global steps and rank 0 logs
    the whole test set once."""
    import torchvision
    from test_imagenet_cli import KD, _overrides
    from test_imagenet_data import write_imagenet

    root = write_imagenet(str(tmp_path_factory.mktemp("tiny_imagenet")))
    teacher = tmp_path / "resnet18-f37072fd.pth"
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(num_classes=3).state_dict(), teacher)
    result = _torchrun(str(REPO / "tools" / "train.py"), "--cfg", KD, *_overrides(tmp_path, root),
                       "DISTILLER.TEACHER_CKPT", str(teacher))
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "24 training images, 3 classes" in output and "x 2 processes (global batch 8)" in output
    (run_dir,) = [p for p in (tmp_path / "output").glob("*/*") if p.is_dir()]
    worklog = (run_dir / "worklog.txt").read_text()
    assert re.findall(r"^epoch: (\d+)$", worklog, re.M) == ["1"] and re.search(r"^loss_kd: [\d.]+$", worklog, re.M)
    assert torch.load(run_dir / "student_best", weights_only=False)["arch"] == "ResNet18"


SIGKILL_ON_RANK_1 = """
import os, runpy, signal, sys, time
from mdistiller.engine.trainer import Trainer

calls = 0
original = Trainer.forward_step


def forward_step(self, batch, epoch):
    global calls
    calls += 1
    if calls == 6 and int(os.environ["RANK"]) == 1:  # epoch 2, step 2: rank 1 dies without a word
        with open(os.environ["KILLED_AT"], "w") as f:
            f.write(repr(time.time()))
        os.kill(os.getpid(), signal.SIGKILL)
    return original(self, batch, epoch)


Trainer.forward_step = forward_step
sys.argv = [sys.argv[1], *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@needs_gloo
def test_sigkill_of_one_rank_ends_the_job_in_seconds_with_one_line_and_resume_is_bitwise_exact(
        ddp_run, tmp_path, cifar100_tiny_root, monkeypatch):
    """No hang until a collective's timeout: the surviving rank's collective fails at once (the peer's socket is
    closed), and it stops with one line naming the last good checkpoint; `latest` (the end of epoch 1) loads, and
    --resume under torchrun ends with the uninterrupted run's weights, to the bit."""
    import time

    script = tmp_path / "sigkill_rank1.py"
    script.write_text(SIGKILL_ON_RANK_1)
    killed_at = tmp_path / "killed_at"
    monkeypatch.setenv("KILLED_AT", str(killed_at))
    args = _train_args(tmp_path, cifar100_tiny_root)
    stopped = _torchrun(str(script), str(REPO / "tools" / "train.py"), *args)
    ended = time.time()
    assert stopped.returncode != 0 and ended - float(killed_at.read_text()) < 20
    mine = [line for line in stopped.stderr.splitlines() if line.startswith("error: ")]
    assert len(mine) == 1 and "another process of this 2-process job stopped" in mine[0], stopped.stderr[-3000:]
    assert "(saved at the end of epoch 1) is the last good checkpoint: continue with --resume" in mine[0]
    assert "[rank0]: Traceback" not in stopped.stderr
    run_dir = _run_dir(tmp_path)
    assert torch.load(run_dir / "latest", weights_only=False)["epoch"] == 1
    resumed = _torchrun(str(REPO / "tools" / "train.py"), "--resume", *args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    reference = torch.load(_run_dir(ddp_run[0]) / "student_latest", weights_only=False)["model"]
    final = torch.load(run_dir / "student_latest", weights_only=False)["model"]
    for key in reference:
        assert torch.equal(final[key], reference[key]), key
