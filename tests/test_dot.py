"""DOT (SOLVER.TRAINER dot): the optimizer against a hand-derived update, its two-call protocol and state dict, the
trainer's update rule (also under AMP / compile), exact resume, the upstream configs through tools/train.py, and the
result-file and run names."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import pytest
import torch

from mdistiller.cli import train as train_tool
from mdistiller.distillers.registry import get_distiller_class
from mdistiller.engine.cfg import CFG, load_cfg
from mdistiller.engine.dot import DistillationOrientedTrainer, split_losses
from mdistiller.engine.guards import PROGRESS_EVERY
from mdistiller.engine.optim import build_optimizer, update_rule
from mdistiller.engine.run import result_log_name, run_name
from mdistiller.engine.trainer import Trainer
from mdistiller.engine.validate import check_recipe
from mdistiller.errors import MdistillerError
from mdistiller.models import cifar_model_dict

from conftest import REPO, run_overrides
from dot_protocol import upstream_dot_step

CPU = torch.device("cpu")
# small models and batches: a second intra-op thread only waits on a loaded machine
pytestmark = pytest.mark.usefixtures("one_thread")
LR, WD, MU_T, MU_K = 0.1, 0.01, 0.825, 0.975


# ---- the optimizer against a hand computation ----

def toy(dampening: float = 0.0):
    """Three float64 scalars at 1: `a` gets task and KD gradients, `b` task only, `c` KD only, `idle` none; the losses
    are linear, so the gradients are constants: task 2 (a), 3 (b); KD 5 (a), 7 (c)."""
    params = {name: torch.nn.Parameter(torch.ones((), dtype=torch.float64)) for name in "abc"}
    params["idle"] = torch.nn.Parameter(torch.ones((), dtype=torch.float64))
    optimizer = DistillationOrientedTrainer(list(params.values()), lr=LR, momentum=MU_T, momentum_kd=MU_K,
                                            dampening=dampening, weight_decay=WD)

    def step() -> None:
        p = params
        upstream_dot_step(optimizer, 5 * p["a"] + 7 * p["c"], 2 * p["a"] + 3 * p["b"])

    return params, optimizer, step


# Worked by hand with lr 0.1, wd 0.01, mu_t 0.825, mu_k 0.975, mean momentum 0.9:
# step 1  a: d = 2 + .01*1 = 2.01, b = 2.01, a = 1 - .201 = .799; KD c = 5 (no wd), a = .799 - .5 = .299
#         b: d = 3.01, b = 3.01, p = .699;   c (KD only): buffer = 7 (no wd on the first KD buffer), p = .3
# step 2  a: d = 2 + .00299 = 2.00299, b = .825*2.01 + 2.00299 = 3.66124, a = .299 - .366124 = -.067124;
#            KD c = .975*5 + 5 = 9.875, a = -.067124 - .9875 = -1.054624
#         b (task only, mean momentum): d = 3.00699, b = .9*3.01 + 3.00699 = 5.71599, p = .699 - .571599 = .127401
#         c (KD only, mean momentum, wd now): 7 + .01*.3 = 7.003, buffer = .9*7 + 7.003 = 13.303, p = .3 - 1.3303
# step 3  a: d = 2 - .01054624 = 1.98945376, b = .825*3.66124 + d = 5.00997676, a = -1.555621676;
#            KD c = .975*9.875 + 5 = 14.628125, a = -1.555621676 - 1.4628125 = -3.018434176
#         b: d = 3.00127401, b = .9*5.71599 + d = 8.14566501, p = .127401 - .814566501 = -.687165501
#         c: 7 - .010303 = 6.989697, buffer = .9*13.303 + 6.989697 = 18.962397, p = -1.0303 - 1.8962397 = -2.9265397
EXPECTED = [
    {"a": 0.299, "b": 0.699, "c": 0.3},
    {"a": -1.054624, "b": 0.127401, "c": -1.0303},
    {"a": -3.018434176, "b": -0.687165501, "c": -2.9265397},
]
BUFFERS_AFTER_3 = {"a": (5.00997676, 14.628125), "b": (8.14566501, None), "c": (None, 18.962397)}


def test_three_steps_match_the_hand_computed_update_for_shared_task_only_and_kd_only_params():
    params, optimizer, step = toy()
    for expected in EXPECTED:
        step()
        for name, value in expected.items():
            assert params[name].item() == pytest.approx(value, abs=1e-12), name
        assert params["idle"].item() == 1.0  # no gradient: no weight decay either
    for name, (task, kd) in BUFFERS_AFTER_3.items():
        state = optimizer.state[params[name]]
        assert ("momentum_buffer" in state) == (task is not None)
        assert ("momentum_kd_buffer" in state) == (kd is not None)
        if task is not None:
            assert state["momentum_buffer"].item() == pytest.approx(task, abs=1e-12)
        if kd is not None:
            assert state["momentum_kd_buffer"].item() == pytest.approx(kd, abs=1e-12)
    assert params["idle"] not in optimizer.state


def test_dampening_scales_the_new_gradient_after_the_first_step():
    params, optimizer, step = toy(dampening=0.5)
    step()
    step()
    # b (task only): buffer = .9*3.01 + .5*3.00699 = 4.212495; c (KD only): .9*7 + .5*7.003 = 9.8015
    assert optimizer.state[params["b"]]["momentum_buffer"].item() == pytest.approx(4.212495, abs=1e-12)
    assert optimizer.state[params["c"]]["momentum_kd_buffer"].item() == pytest.approx(9.8015, abs=1e-12)


def test_zero_task_momentum_keeps_no_task_buffer_as_upstream():
    p = torch.nn.Parameter(torch.ones((), dtype=torch.float64))
    optimizer = DistillationOrientedTrainer([p], lr=0.1, momentum=0.0, momentum_kd=0.5)
    for _ in range(2):
        optimizer.zero_grad(set_to_none=True)
        (2 * p).backward()
        optimizer.step()
    assert optimizer.state[p]["momentum_buffer"] is None and p.item() == pytest.approx(1 - 0.2 - 0.2)


def test_constructor_keeps_upstreams_signature_and_refuses_two_param_groups():
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    optimizer = DistillationOrientedTrainer([a, b], 0.1, 0.8, 0.95, 0, weight_decay=1e-4)
    assert {k: optimizer.defaults[k] for k in ("lr", "momentum", "momentum_kd", "dampening", "weight_decay")} == \
        {"lr": 0.1, "momentum": 0.8, "momentum_kd": 0.95, "dampening": 0, "weight_decay": 1e-4}
    with pytest.raises(AssertionError, match="one param group"):
        DistillationOrientedTrainer([{"params": [a]}, {"params": [b]}], lr=0.1)
    with pytest.raises(ValueError, match="momentum kd"):
        DistillationOrientedTrainer([a], lr=0.1, momentum_kd=-0.1)


def test_state_dict_round_trip_continues_bitwise_like_the_original():
    params, optimizer, step = toy()
    step()
    step()
    saved = copy.deepcopy(optimizer.state_dict())  # state_dict() holds references to the live buffers
    assert set(saved["state"][0]) == {"momentum_buffer", "momentum_kd_buffer"}
    values = {k: v.detach().clone() for k, v in params.items()}
    step()
    continued = {k: v.detach().clone() for k, v in params.items()}

    params2, optimizer2, step2 = toy()
    with torch.no_grad():
        for name, value in values.items():
            params2[name].copy_(value)
    optimizer2.load_state_dict(saved)
    step2()
    for name in continued:
        assert torch.equal(params2[name].detach(), continued[name]), name


def test_split_losses_task_is_loss_ce_and_every_other_term_distils():
    terms = {"loss_ce": torch.tensor([1.0, 3.0]), "loss_kd": torch.tensor(4.0), "loss_cc": torch.tensor([0.5])}
    task, distill = split_losses(terms)
    assert task.item() == 2.0 and distill.item() == 4.5
    with pytest.raises(MdistillerError, match="returned loss_ce: use SOLVER.TRAINER base"):
        split_losses({"loss_ce": torch.tensor(1.0)})
    with pytest.raises(MdistillerError, match="task term loss_ce .* returned loss_kd"):
        split_losses({"loss_kd": torch.tensor(1.0)})


def test_split_losses_follows_the_declared_distillation_terms():
    terms = {"loss_CE": torch.tensor(1.0), "loss_wkd_target": torch.tensor(2.0), "loss_CAT": torch.tensor([3.0, 5.0])}
    task, distill = split_losses(terms, ("loss_CAT", "loss_wkd_target"))
    assert task.item() == 1.0 and distill.item() == 6.0
    task, distill = split_losses(terms, ("loss_CAT",))  # an undeclared term is a task term
    assert task.item() == 3.0 and distill.item() == 4.0
    with pytest.raises(MdistillerError, match="returned loss_CE: use SOLVER.TRAINER base"):
        split_losses({"loss_CE": torch.tensor(1.0)}, ("loss_CAT",))


def test_dot_built_for_a_distiller_takes_its_declared_terms():
    from mdistiller.engine.cfg import default_cfg
    from mdistiller.engine.dot import build_dot

    optimizer = build_dot(default_cfg(), [torch.nn.Parameter(torch.zeros(2))], ("loss_kd", "loss_cc"))
    assert optimizer.distillation_terms == ("loss_kd", "loss_cc")


# ---- the trainer's update rule ----

def make_cfg(trainer: str = "dot", **solver):
    cfg = CFG.clone()
    cfg.defrost()
    cfg.DISTILLER.TYPE = "KD"
    cfg.SOLVER.TRAINER = trainer
    cfg.SOLVER.LR = 0.05
    cfg.SOLVER.WEIGHT_DECAY = 5e-4
    for key, value in solver.items():
        setattr(cfg.SOLVER, key, value)
    return cfg


def make_trainer(tmp_path, cfg, seed: int = 0) -> Trainer:
    torch.manual_seed(seed)
    distiller = get_distiller_class(cfg.DISTILLER.TYPE)(cifar_model_dict["resnet8"][0](num_classes=10),
                                                         cifar_model_dict["resnet8"][0](num_classes=10), cfg)
    trainer = Trainer(str(tmp_path), distiller, [], [], cfg, CPU)
    trainer.distiller.train()
    return trainer


def batch_of(n: int = 8, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {"image": torch.randn(n, 3, 32, 32, generator=generator),
            "target": torch.randint(0, 10, (n,), generator=generator), "index": torch.arange(n)}


def _weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.distiller.student.state_dict().items()}


def test_trainer_dot_builds_dot_with_the_delta_momenta_and_uses_its_update():
    cfg = make_cfg(MOMENTUM=0.9)
    cfg.SOLVER.DOT.DELTA = 0.09
    distiller = get_distiller_class("KD")(cifar_model_dict["resnet8"][0](num_classes=10),
                                          cifar_model_dict["resnet8"][0](num_classes=10), cfg)
    optimizer = build_optimizer(cfg, distiller)
    assert isinstance(optimizer, DistillationOrientedTrainer) and len(optimizer.param_groups) == 1
    group = optimizer.param_groups[0]
    assert group["momentum"] == pytest.approx(0.81) and group["momentum_kd"] == pytest.approx(0.99)
    assert group["weight_decay"] == 5e-4 and group["lr"] == 0.05
    assert update_rule(optimizer) == optimizer.update
    assert {id(p) for p in group["params"]} == {id(p) for p in distiller.get_learnable_parameters()}


def test_train_step_equals_upstreams_two_call_protocol_bitwise(tmp_path):
    """Trainer.train_step with SOLVER.TRAINER dot against the same forward followed by upstream's trainer lines."""
    batch = batch_of()
    ours = make_trainer(tmp_path / "a", make_cfg())
    theirs = make_trainer(tmp_path / "b", make_cfg())
    for _ in range(3):
        ours.train_step(batch, 1)
        _, losses = theirs.distiller(**batch, epoch=1)
        upstream_dot_step(theirs.optimizer, losses["loss_kd"].mean(), losses["loss_ce"].mean())
    a, b = _weights(ours), _weights(theirs)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_dot_trains_other_weights_than_the_plain_trainer_from_the_same_seed(tmp_path):
    batch = batch_of()
    dot, base = make_trainer(tmp_path / "a", make_cfg()), make_trainer(tmp_path / "b", make_cfg("base"))
    start = _weights(dot)
    assert all(torch.equal(start[k], v) for k, v in _weights(base).items())
    for _ in range(3):
        dot.train_step(batch, 1)
        base.train_step(batch, 1)
    dot_w, base_w = _weights(dot), _weights(base)
    moved = [k for k in start if start[k].is_floating_point() and not torch.equal(dot_w[k], start[k])]
    assert moved and all(not torch.allclose(dot_w[k], base_w[k]) for k in moved if k.endswith("weight"))
    state = dot.optimizer.state_dict()["state"]
    assert all({"momentum_buffer", "momentum_kd_buffer"} <= set(s) for s in state.values())


def test_nan_policy_skip_runs_no_backward_at_all(tmp_path):
    trainer = make_trainer(tmp_path, make_cfg(NAN_POLICY="skip"))
    before = _weights(trainer)
    batch = batch_of()
    batch["image"][0, 0, 0, 0] = float("nan")
    trainer.train_step(batch, 1)
    assert all(p.grad is None for p in trainer.distiller.parameters())
    assert trainer.optimizer.state_dict()["state"] == {}
    after = _weights(trainer)
    assert all(torch.equal(before[k], after[k]) for k in before if k.endswith("weight"))


def test_dot_step_never_reads_a_tensor_on_the_host(tmp_path, monkeypatch):
    """Both backward passes, step_kd and step run without pulling a value to the host (as the plain SGD step)."""
    trainer = make_trainer(tmp_path, make_cfg(AMP=True))
    batch = batch_of()
    trainer.train_step(batch, 1)  # the first step creates the buffers; the second takes the later-step branches

    def host_read(*args, **kwargs):
        raise AssertionError("a host read inside the training step")

    trainer.sync_every = PROGRESS_EVERY
    for name in ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, host_read)
    trainer.train_step(batch, 2, step=1)
    monkeypatch.undo()
    assert all(set(s) == {"momentum_buffer", "momentum_kd_buffer"} for s in trainer.optimizer.state.values())


def test_amp_dot_step_has_fp32_losses_and_gradients_and_lowers_the_loss(tmp_path):
    trainer = make_trainer(tmp_path, make_cfg(AMP=True, LR=0.1))
    batch = batch_of(8)
    _, losses = trainer.train_step(batch, 1)
    assert all(term.dtype == torch.float32 for term in losses.values())
    assert all(s["momentum_kd_buffer"].dtype == torch.float32 for s in trainer.optimizer.state.values())
    first = sum(losses.values()).item()
    for _ in range(8):
        _, losses = trainer.train_step(batch, 1)
    assert sum(losses.values()).item() < 0.8 * first


@pytest.mark.slow  # three compilations of the forward and backward on the CPU: ~1 min
@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                    reason="torch.compile on the CPU needs a C compiler (inductor's C++ backend); none on PATH")
def test_compiled_forward_takes_both_backward_passes_and_matches_eager(tmp_path, monkeypatch):
    """The two backward passes run through one compiled graph and give eager's step, even after a plain (one
    backward) compiled run of the same graph filled the compile caches: loading its backward would make DOT's second
    pass compute wrong gradients (see accel.keep_compile_caches_from_retained_graphs)."""
    import torch._functorch.config
    import torch._inductor.config

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor_cache"))
    for config, key in ((torch._functorch.config, "enable_autograd_cache"), (torch._inductor.config, "fx_graph_cache")):
        monkeypatch.setattr(config, key, True)  # as by default; restored after the test
    batch = batch_of()
    plain = make_trainer(tmp_path / "plain", make_cfg("base", COMPILE="default"))
    plain.train_step(batch, 1)  # fills the caches with the one-backward compilation of this graph
    torch._dynamo.reset()
    eager = make_trainer(tmp_path / "a", make_cfg())
    compiled = make_trainer(tmp_path / "b", make_cfg(COMPILE="default"))
    assert compiled.forward is not compiled.distiller
    for _ in range(2):
        _, losses_eager = eager.train_step(batch, 1)
        _, losses_compiled = compiled.train_step(batch, 1)
    for name in losses_eager:
        torch.testing.assert_close(losses_compiled[name], losses_eager[name], rtol=1e-4, atol=1e-5)
    for (name, p_eager), p_compiled in zip(eager.distiller.student.named_parameters(),
                                           compiled.distiller.student.parameters()):
        torch.testing.assert_close(p_compiled, p_eager, rtol=1e-4, atol=1e-5, msg=name)
    torch._dynamo.reset()


@pytest.mark.cuda
@pytest.mark.parametrize("switches,tolerance", [
    ({"AMP": True}, 5e-2),
    ({"COMPILE": "default"}, 1e-3),
    ({"COMPILE": "reduce-overhead"}, 1e-3),
    ({"AMP": True, "CHANNELS_LAST": True, "COMPILE": "default"}, 5e-2),
])
def test_cuda_dot_steps_under_each_switch_follow_the_eager_fp32_steps(tmp_path, switches, tolerance):
    """On a GPU: both backward passes through the compiled graph (CUDA graphs included: the KD gradients held by
    step_kd must survive the second pass) and bf16 autocast give the eager fp32 DOT steps."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    cuda = torch.device("cuda")
    trainers = []
    for name, cfg in (("eager", make_cfg()), ("fast", make_cfg(**switches))):
        torch.manual_seed(0)
        distiller = get_distiller_class("KD")(cifar_model_dict["resnet8"][0](num_classes=10),
                                              cifar_model_dict["resnet20"][0](num_classes=10), cfg)
        trainers.append(Trainer(str(tmp_path / name), distiller, [], [], cfg, cuda))
        trainers[-1].distiller.train()
    eager, fast = trainers
    for step in range(1, 5):  # CUDA graphs record on the first calls and replay after
        batch = batch_of(32, seed=step)
        _, reference = eager.train_step(batch, 1, step)
        _, losses = fast.train_step(batch, 1, step)
        for name in reference:
            torch.testing.assert_close(losses[name].float(), reference[name].float(), rtol=tolerance, atol=tolerance)
    for (name, p_eager), p_fast in zip(eager.distiller.student.named_parameters(), fast.distiller.student.parameters()):
        torch.testing.assert_close(p_fast, p_eager, rtol=tolerance, atol=tolerance, msg=name)
    torch._dynamo.reset()


# ---- names ----

def test_result_file_and_run_name_tell_a_dot_run_from_plain_kd():
    cfg = load_cfg(str(REPO / "configs/cifar100/dot/resnet32x4_resnet8x4.yaml"), [])
    assert result_log_name(cfg) == "KD+DOT,resnet32x4,resnet8x4.txt"
    assert run_name(cfg) == "kd,dot,res32x4,res8x4"  # upstream's tag already says dot
    kd = load_cfg(str(REPO / "configs/cifar100/kd/resnet32x4_resnet8x4.yaml"), [])
    assert result_log_name(kd) == "KD,resnet32x4,resnet8x4.txt" and run_name(kd) == "kd,res32x4,res8x4"
    opts = ["SOLVER.TRAINER", "dot"]
    kd_dot = load_cfg(str(REPO / "configs/cifar100/kd/resnet32x4_resnet8x4.yaml"), opts)
    assert run_name(kd_dot, opts) == "kd,res32x4,res8x4,SOLVER.TRAINER:dot"
    assert result_log_name(kd_dot) == "KD+DOT,resnet32x4,resnet8x4.txt"
    kd_dot.defrost()
    kd_dot.EXPERIMENT.TAG = "mine"
    assert run_name(kd_dot) == "mine,dot"
    kd_dot.EXPERIMENT.LOGIT_STAND, kd_dot.EXPERIMENT.BASE_TEMP, kd_dot.EXPERIMENT.KD_WEIGHT = True, 2.0, 9.0
    assert result_log_name(kd_dot) == "KD+DOT,resnet32x4,resnet8x4,2,9.txt"


# ---- through tools/train.py ----

CIFAR_DOT = {"resnet32x4_resnet8x4": ("resnet32x4", "resnet8x4", 0.05),
             "vgg13_vgg8": ("vgg13", "vgg8", 0.05),
             "resnet32x4_ShuffleV2": ("resnet32x4", "ShuffleV2", 0.01)}
UPSTREAM = REPO / "tests/data/reference_configs/mdistiller/configs/cifar100/dot"
UPSTREAM_NAMES = {"resnet32x4_resnet8x4": "res32x4_res8x4", "vgg13_vgg8": "vgg13_vgg8",
                  "resnet32x4_ShuffleV2": "res32x4_shuv2"}


@pytest.mark.parametrize("pair", sorted(CIFAR_DOT))
def test_our_cifar_dot_configs_hold_upstreams_recipe(pair):
    ours = load_cfg(str(REPO / f"configs/cifar100/dot/{pair}.yaml"), [])
    theirs = load_cfg(str(UPSTREAM / f"{UPSTREAM_NAMES[pair]}.yaml"), [])
    assert ours.dump() == theirs.dump()
    teacher, student, lr = CIFAR_DOT[pair]
    assert (ours.DISTILLER.TEACHER, ours.DISTILLER.STUDENT, ours.SOLVER.LR) == (teacher, student, lr)
    assert (ours.SOLVER.TRAINER, ours.SOLVER.DOT.DELTA, ours.KD.LOSS.CE_WEIGHT) == ("dot", 0.075, 0.1)


@pytest.mark.parametrize("pair", ["r34_r18", "r50_mv1"])
def test_our_imagenet_dot_configs_hold_upstreams_recipe(pair):
    ours = load_cfg(str(REPO / f"configs/imagenet/{pair}/dot.yaml"), [])
    theirs = load_cfg(str(REPO / f"tests/data/reference_configs/mdistiller/configs/imagenet/{pair}/dot.yaml"), [])
    for key in ("DISTILLER", "SOLVER", "KD"):
        assert ours[key].dump() == theirs[key].dump(), key
    assert (ours.SOLVER.DOT.DELTA, ours.SOLVER.BATCH_SIZE, ours.SOLVER.LR) == (0.09, 512, 0.2)


def _dot_run(tmp: Path, cfg: str, data_root: str, teacher: str, *extra: str) -> dict:
    return train_tool.main(["--cfg", cfg, *run_overrides(tmp, data_root), "DISTILLER.TEACHER_CKPT", teacher,
                            "SOLVER.BATCH_SIZE", "16", "DATASET.TEST.BATCH_SIZE", "32", *extra])


# one epoch of 4 steps on the 64 images: 2-4 s each on a CPU core
@pytest.mark.parametrize("name", ["res32x4_res8x4", "vgg13_vgg8",
                                  pytest.param("res32x4_shuv2", marks=pytest.mark.slow)])
def test_upstreams_dot_configs_train_an_epoch_unchanged(tmp_path, cifar100_tiny_root, teacher_ckpt, name):
    cfg = load_cfg(str(UPSTREAM / f"{name}.yaml"), [])
    result = _dot_run(tmp_path, str(UPSTREAM / f"{name}.yaml"), cifar100_tiny_root,
                      teacher_ckpt(cfg.DISTILLER.TEACHER))
    run_dir = Path(result["run_dir"])
    assert run_dir.parent.name == "dot_cifar" and run_dir.name.startswith("kd,dot,")
    latest = torch.load(run_dir / "latest", weights_only=False)
    assert all({"momentum_buffer", "momentum_kd_buffer"} <= set(s) for s in latest["optimizer"]["state"].values())
    assert latest["optimizer"]["param_groups"][0]["momentum_kd"] == pytest.approx(0.975)
    (result_file,) = (tmp_path / "logs").iterdir()
    assert result_file.name == f"KD+DOT,{cfg.DISTILLER.TEACHER},{cfg.DISTILLER.STUDENT}.txt"


def test_dot_run_resumed_from_its_epoch_checkpoint_ends_bitwise_equal(tmp_path, cifar100_tiny_root, teacher_ckpt):
    """Two epochs of KD+DOT (resnet8 <- resnet8, 2 steps of 32 each), then `latest` replaced by epoch_1 and --resume:
    the restored optimizer state (both momentum buffers) makes the second epoch the uninterrupted one, to the bit."""
    args = ["--cfg", str(REPO / "configs/cifar100/dot/resnet32x4_resnet8x4.yaml"),
            *run_overrides(tmp_path, cifar100_tiny_root), "DISTILLER.TEACHER", "resnet8",
            "DISTILLER.STUDENT", "resnet8", "DISTILLER.TEACHER_CKPT", teacher_ckpt("resnet8"), "SOLVER.EPOCHS", "2",
            "SOLVER.BATCH_SIZE", "32", "DATASET.TEST.BATCH_SIZE", "32", "LOG.SAVE_CHECKPOINT_FREQ", "1",
            "EXPERIMENT.DETERMINISTIC", "True"]
    run_dir = Path(train_tool.main(args)["run_dir"])
    reference = torch.load(run_dir / "student_latest", weights_only=False)["model"]
    shutil.copy(run_dir / "epoch_1", run_dir / "latest")
    train_tool.main([*args, "--resume"])
    resumed = torch.load(run_dir / "student_latest", weights_only=False)["model"]
    assert resumed.keys() == reference.keys()
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)


# ---- refused ----

# (AdamW, no teacher and a momentum of 1 are among tests/test_validation.py's no-debris cases)
@pytest.mark.parametrize("overrides, message", [
    (["SOLVER.MOMENTUM", "0.05"], "momenta -0.025 / 0.125; both must lie in [0, 1)"),
    (["SOLVER.TRAINER", "crd_dot"], "SOLVER.TRAINER crd_dot is upstream's trainer for another method"),
])
def test_what_dot_cannot_train_is_refused_in_one_line(overrides, message):
    cfg = load_cfg(str(REPO / "configs/cifar100/dot/resnet32x4_resnet8x4.yaml"), overrides)
    with pytest.raises(MdistillerError) as info:
        check_recipe(cfg)
    assert message in str(info.value) and "\n" not in str(info.value)
