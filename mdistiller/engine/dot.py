"""DOT, the distillation-oriented trainer (Zhao et al., ICCV 2023): SGD with one momentum buffer for the task loss and
another for the distillation loss, selected by SOLVER.TRAINER "dot" (or "crd_dot", the same with CRD's batches).

The optimizer keeps upstream's name, module path, constructor and two-call protocol, so scripts written against
mdistiller's `mdistiller.engine.dot.DistillationOrientedTrainer` run unchanged:

    optimizer.zero_grad(set_to_none=True)
    loss_kd.backward(retain_graph=True)
    optimizer.step_kd()          # remembers the KD gradients (references) and the params that have one
    optimizer.zero_grad(set_to_none=True)
    loss_ce.backward()
    optimizer.step()             # both momentum updates, then the parameters

With task momentum mu_t = MOMENTUM - DELTA, KD momentum mu_k = MOMENTUM + DELTA, mu = (mu_t + mu_k) / 2, weight
decay wd, dampening s, a parameter p with task gradient g and/or KD gradient k is updated as upstream does:

- task buffer b (state "momentum_buffer"), d = g + wd p: first step b = d; then b = mu_t b + (1 - s) d when p also
  has a KD gradient, else (task-only) b = mu b + (1 - s) d; p -= lr b. With mu_t = 0 there is no buffer: p -= lr d.
- KD buffer c (state "momentum_kd_buffer"): first step c = k (no weight decay, even for a KD-only parameter); then
  c = mu_k c + (1 - s) k when p also has a task gradient (weight decay was applied once, in d), else (KD-only)
  c = mu c + (1 - s) (k + wd p); p -= lr c.

Both buffers are optimizer state: `state_dict()` / `load_state_dict()` carry them, so resume is exact.

Our trainer calls `update(losses)` instead (engine/optim.update_rule): the task loss is the batch mean of "loss_ce",
the distillation loss the sum of the batch means of every other term (upstream's KD returns exactly loss_ce and
loss_kd; for MLKD, VKD or WKD every non-CE term distils from the teacher, so it gets the KD momentum). Under torchrun
the two gradients are taken with `torch.autograd.grad`, so DDP's reducer (built for one backward per forward) never
fires, and each is averaged over the ranks by one all-reduce per pass: the step is then that of one process on the
mean of the ranks' losses.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim.optimizer import Optimizer, required

from .. import distributed
from ..errors import MdistillerError

# SOLVER.TRAINER values that select DOT -> the name of upstream's trainer whose batches they use
DOT_TRAINERS = {"dot": "base", "crd_dot": "crd"}
TASK_TERM = "loss_ce"


def dot_momenta(momentum: float, delta: float) -> tuple[float, float]:
    """(task momentum, KD momentum) = (MOMENTUM - DELTA, MOMENTUM + DELTA)."""
    return momentum - delta, momentum + delta


def split_losses(losses: dict[str, Tensor], distillation_terms: Iterable[str] | None = None
                 ) -> tuple[Tensor, Tensor]:
    """(task loss, distillation loss): the summed batch means of the task terms and of the distillation terms.
    `distillation_terms`: the names the method declares (Declaration.distillation_terms); None: every term but
    "loss_ce" distils."""
    if distillation_terms is None:
        distilling = [name for name in losses if name != TASK_TERM]
    else:
        distilling = [name for name in losses if name in set(distillation_terms)]
    task = [name for name in losses if name not in distilling]
    if not task or not distilling:
        named = TASK_TERM if distillation_terms is None else f"(a term but {', '.join(distillation_terms)})"
        raise MdistillerError(
            f"SOLVER.TRAINER dot needs the task term {named} and at least one distillation term; the distiller "
            f"returned {', '.join(losses) or 'no terms'}: use SOLVER.TRAINER base"
        )
    return sum(losses[name].mean() for name in task), sum(losses[name].mean() for name in distilling)


def _momentum_update(buffers: list[Tensor], grads: list[Tensor], momentum: float, dampening: float) -> None:
    """buffer = momentum * buffer + (1 - dampening) * grad, in place."""
    if buffers:
        torch._foreach_mul_(buffers, momentum)
        torch._foreach_add_(buffers, grads, alpha=1 - dampening)


class DistillationOrientedTrainer(Optimizer):
    """SGD with separate task and distillation momentum buffers (DOT); one param group only."""

    def __init__(self, params: Iterable, lr: float = required, momentum: float = 0.0, momentum_kd: float = 0.0,
                 dampening: float = 0.0, weight_decay: float = 0.0):
        if lr is not required and lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if momentum < 0.0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if momentum_kd < 0.0:
            raise ValueError(f"Invalid momentum kd value: {momentum_kd}")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        defaults = dict(lr=lr, momentum=momentum, momentum_kd=momentum_kd, dampening=dampening,
                        weight_decay=weight_decay)
        super().__init__(params, defaults)
        assert len(self.param_groups) == 1, "DistillationOrientedTrainer takes one param group only"
        # set by step_kd, consumed by step: the params with a KD gradient and references to those gradients
        self._kd_params: list[Tensor] = []
        self.distillation_terms: tuple[str, ...] | None = None  # None: every term but "loss_ce" (see split_losses)
        self._kd_grads: list[Tensor] = []

    def add_param_group(self, param_group: dict) -> None:
        assert not self.param_groups, "DistillationOrientedTrainer takes one param group only"
        super().add_param_group(param_group)

    @torch.no_grad()
    def step_kd(self, closure=None):
        """Record the parameters that hold a gradient now (the KD loss's) and references to those gradients; nothing
        is updated. `zero_grad(set_to_none=True)` afterwards keeps the recorded tensors intact."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        assert len(self.param_groups) == 1, "DistillationOrientedTrainer takes one param group only"
        with_grad = [p for p in self.param_groups[0]["params"] if p.grad is not None]
        self._kd_params = with_grad
        self._kd_grads = [p.grad for p in with_grad]
        return loss

    @torch.no_grad()
    def step(self, closure=None):
        """Update both momentum buffers and the parameters from the task gradients now in `.grad` and the KD
        gradients recorded by `step_kd` (see the module docstring for the rule)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        assert len(self.param_groups) == 1, "DistillationOrientedTrainer takes one param group only"
        group = self.param_groups[0]
        lr, wd, damp = group["lr"], group["weight_decay"], group["dampening"]
        mu_t, mu_k = group["momentum"], group["momentum_kd"]
        mean = (mu_t + mu_k) / 2.0
        kd_params, kd_grads = self._kd_params, self._kd_grads
        self._kd_params, self._kd_grads = [], []

        task_params = [p for p in group["params"] if p.grad is not None]
        has_kd = {id(p) for p in kd_params}
        has_task = {id(p) for p in task_params}

        # the task pass: d = g + wd p into "momentum_buffer"
        if task_params:
            grads = [p.grad for p in task_params]
            steps = torch._foreach_add(grads, task_params, alpha=wd) if wd != 0 else list(grads)
            if mu_t != 0:
                shared, only, shared_d, only_d = [], [], [], []
                for i, p in enumerate(task_params):
                    state = self.state[p]
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        state["momentum_buffer"] = torch.clone(steps[i]).detach()
                    elif id(p) in has_kd:
                        shared.append(buf)
                        shared_d.append(steps[i])
                    else:
                        only.append(buf)
                        only_d.append(steps[i])
                _momentum_update(shared, shared_d, mu_t, damp)
                _momentum_update(only, only_d, mean, damp)
                steps = [self.state[p]["momentum_buffer"] for p in task_params]
            else:
                for p in task_params:
                    self.state[p]["momentum_buffer"] = None  # as torch's SGD records "no momentum"
            torch._foreach_add_(task_params, steps, alpha=-lr)

        # the KD pass: k into "momentum_kd_buffer" (weight decay only for KD-only params, after the first step)
        if kd_params:
            shared, only, shared_k, only_k, only_p = [], [], [], [], []
            for p, k in zip(kd_params, kd_grads):
                state = self.state[p]
                buf = state.get("momentum_kd_buffer")
                if buf is None:
                    state["momentum_kd_buffer"] = torch.clone(k).detach()
                elif id(p) in has_task:
                    shared.append(buf)
                    shared_k.append(k)
                else:
                    only.append(buf)
                    only_k.append(k)
                    only_p.append(p)
            _momentum_update(shared, shared_k, mu_k, damp)
            if only and wd != 0:
                only_k = torch._foreach_add(only_k, only_p, alpha=wd)
            _momentum_update(only, only_k, mean, damp)
            torch._foreach_add_(kd_params, [self.state[p]["momentum_kd_buffer"] for p in kd_params], alpha=-lr)
        return loss

    def describe(self) -> str:
        """The split and the momenta, for the run's log."""
        group = self.param_groups[0]
        return (f"DOT: {TASK_TERM} with momentum {group['momentum']:g}, the other loss terms with "
                f"{group['momentum_kd']:g}")

    # ---- our trainer's update rule (engine/optim.update_rule) ----
    def update(self, losses: dict[str, Tensor]) -> None:
        """One DOT step from a step's loss terms: backward of the distillation loss, `step_kd()`, backward of the task
        loss ("loss_ce"), `step()`. Under torchrun each gradient is the mean over the ranks."""
        task, distill = split_losses(losses, self.distillation_terms)
        self.zero_grad(set_to_none=True)
        self._backward(distill, retain_graph=True)
        self.step_kd()
        self.zero_grad(set_to_none=True)
        self._backward(task)
        self.step()

    def _backward(self, loss: Tensor, retain_graph: bool = False) -> None:
        """loss.backward() alone; under torchrun the gradients of the ranks' losses, averaged, put in `.grad`."""
        world = distributed.world_size()
        if world == 1:
            loss.backward(retain_graph=retain_graph)
            return
        params = [p for p in self.param_groups[0]["params"] if p.requires_grad]
        grads = torch.autograd.grad(loss, params, retain_graph=retain_graph, allow_unused=True)
        for p, g in zip(params, grads):
            if g is not None:
                p.grad = g
        average_gradients(params, grads, world)


def average_gradients(params: list[Tensor], grads: Iterable[Tensor | None], world: int) -> None:
    """Replace each `p.grad` by its mean over the ranks: one all-reduce per dtype over every parameter (zeros where
    this rank has no gradient, so every rank sends the same sizes whatever its graph held)."""
    by_dtype: dict[torch.dtype, list[tuple[Tensor, Tensor | None]]] = {}
    for p, g in zip(params, grads):
        by_dtype.setdefault(p.dtype, []).append((p, g))
    for pairs in by_dtype.values():
        flat = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for p, g in pairs])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat.div_(world)
        offset = 0
        for p, g in pairs:
            if g is not None:
                g.copy_(flat[offset:offset + p.numel()].view_as(g))
            offset += p.numel()


def build_dot(cfg, params: list[Tensor], distillation_terms: Iterable[str] | None = None
              ) -> DistillationOrientedTrainer:
    """DOT over `params` at SOLVER.LR, momenta MOMENTUM -/+ DOT.DELTA, SOLVER.WEIGHT_DECAY (upstream's DOT trainer);
    `distillation_terms` (the method's declared ones) take the KD momentum."""
    mu_t, mu_k = dot_momenta(cfg.SOLVER.MOMENTUM, cfg.SOLVER.DOT.DELTA)
    optimizer = DistillationOrientedTrainer(params, lr=cfg.SOLVER.LR, momentum=mu_t, momentum_kd=mu_k,
                                            weight_decay=cfg.SOLVER.WEIGHT_DECAY)
    optimizer.distillation_terms = None if distillation_terms is None else tuple(distillation_terms)
    return optimizer


def check_dot(cfg, distiller_class) -> None:
    """What a DOT run needs, before anything is built: SGD, momenta in [0, 1), a distiller with a teacher."""
    name = cfg.SOLVER.TRAINER
    if cfg.SOLVER.TYPE != "SGD":
        raise MdistillerError(f"SOLVER.TRAINER {name} is DOT, a variant of SGD; SOLVER.TYPE is {cfg.SOLVER.TYPE}: set "
                              f"SOLVER.TYPE SGD or SOLVER.TRAINER base")
    mu_t, mu_k = dot_momenta(cfg.SOLVER.MOMENTUM, cfg.SOLVER.DOT.DELTA)
    if not (0.0 <= mu_t < 1.0 and 0.0 <= mu_k < 1.0):
        raise MdistillerError(
            f"SOLVER.TRAINER {name}: SOLVER.MOMENTUM {cfg.SOLVER.MOMENTUM:g} -/+ SOLVER.DOT.DELTA "
            f"{cfg.SOLVER.DOT.DELTA:g} gives momenta {mu_t:g} / {mu_k:g}; both must lie in [0, 1)"
        )
    if not distiller_class.declares.requires_teacher:
        raise MdistillerError(f"SOLVER.TRAINER {name} splits the loss into the task term and the distillation terms; "
                              f"DISTILLER.TYPE {cfg.DISTILLER.TYPE} has no teacher to distil from: use "
                              f"SOLVER.TRAINER base")
