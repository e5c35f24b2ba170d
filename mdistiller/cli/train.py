"""Train a teacher (DISTILLER.TYPE NONE) or distil a student, as a config describes.

    python tools/train.py --cfg configs/cifar100/kd/resnet32x4_resnet8x4.yaml [--resume] [--seeds 0,1,2]
        [--logit-stand [--base-temp 2] [--kd-weight 9]] [--same-t] [--M "[1,2]"] [--warmup 20] [KEY VALUE ...]

`--same-t` is RLD's flag (RLD.ALPHA_T = RLD.T after the LS flags); `--M` and `--warmup` are SDD's (SDD.M, DKD.WARMUP);
each is refused for other methods and recorded as the overrides it stands for (config.yaml, run name).
A flag changes the config file's values; a flag that would replace a value typed as `KEY VALUE` is refused, naming
both (docs/runs.md "Errors before training"), and `--base-temp` / `--kd-weight` need `--logit-stand`.

`--resume` refuses a recipe other than the one the run started with (engine/run_identity.py); `--resume-changed`
continues it with the new one, recorded in config_history/ and the worklog. A damaged `latest` is refused naming the
newest intact `epoch_<n>`; `--resume-from epoch_<n>` continues from that one.

SIGTERM or Ctrl-C stops after the current step, saves `latest` there, prints the command that continues the run and
exits with 143 (SIGTERM) or 130 (SIGINT).

Multi-GPU: `torchrun --nproc_per_node N tools/train.py --cfg ...` (no extra flag) trains with DistributedDataParallel;
SOLVER.BATCH_SIZE is then the global batch.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from typing import Any, Callable

from .. import distributed
from ..distillers.rld import rld_same_t
from ..distillers.sdd import sdd_flag_overrides
from ..engine.build import apply_logit_stand_flags
from ..engine.cfg import cfg_value, leaf_values, load_cfg, merge_opts
from ..engine.guards import TrainingInterrupted
from ..engine.run import train_run, train_sweep
from ..errors import MdistillerError, did_you_mean
from . import run_cli


def parse_seeds(text: str) -> list[int]:
    """`0,1,2` -> [0, 1, 2]."""
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise MdistillerError(f"--seeds takes comma-separated integers, e.g. 0,1,2; got {text!r}") from None
    if not seeds:
        raise MdistillerError("--seeds needs at least one seed, e.g. 0,1,2")
    return seeds


FLAG_TAKES_VALUE = {"--cfg": True, "--resume": False, "--seeds": True, "--logit-stand": False, "--base-temp": True,
                    "--kd-weight": True, "--same-t": False}
FLAG_TAKES_VALUE.update({"--M": True, "--warmup": True})  # SDD's flags (its authors' train_origin.py)
FLAG_TAKES_VALUE.update({"--resume-changed": False, "--resume-from": True})


DEFAULT_BASE_TEMP, DEFAULT_KD_WEIGHT = 2.0, 9.0  # the logit-standardisation repo's defaults


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        "train.py", description="training for knowledge distillation; flags may come before or after the KEY VALUE "
                                "overrides", allow_abbrev=False)
    parser.add_argument("--cfg", type=str, default="", help="YAML config file")
    parser.add_argument("--resume", action="store_true", help="continue the run from its `latest` checkpoint")
    parser.add_argument("--resume-changed", action="store_true",
                        help="--resume accepting a recipe that differs from the run's start (recorded in "
                             "config_history/ and the worklog)")
    parser.add_argument("--resume-from", default="", metavar="epoch_<n>",
                        help="--resume from another checkpoint of the run folder (when latest is damaged)")
    parser.add_argument("--seeds", type=str, default=None,
                        help="comma-separated seeds: one run per seed, one after the other (`,seed:<n>` in the name)")
    parser.add_argument("--logit-stand", action="store_true", help="logit standardisation (z-score) on the logits")
    parser.add_argument("--base-temp", type=float, default=None,
                        help=f"temperature with --logit-stand (default {DEFAULT_BASE_TEMP:g})")
    parser.add_argument("--kd-weight", type=float, default=None,
                        help=f"distillation weight with --logit-stand (default {DEFAULT_KD_WEIGHT:g})")
    parser.add_argument("--same-t", action="store_true", help="RLD: RLD.ALPHA_T = RLD.T (after --logit-stand)")
    parser.add_argument("--M", type=str, default=None, help='SDD: the scales, as the authors write them: "[1,2,4]"')
    parser.add_argument("--warmup", type=str, default=None, help="SD-DKD / SD-NKD: warm-up epochs (DKD.WARMUP)")
    parser.add_argument("overrides", nargs="*", metavar="KEY VALUE", help="config overrides, e.g. SOLVER.EPOCHS 10")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags, wherever they stand (`--resume` after the overrides is what one types after a stopped run), and
    the KEY VALUE overrides in their order (as `opts`)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    flags: list[str] = []
    opts: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        name = arg.split("=", 1)[0]
        if name in FLAG_TAKES_VALUE or name in ("-h", "--help"):
            takes_value = FLAG_TAKES_VALUE.get(name, False) and "=" not in arg
            flags += argv[i:i + 1 + takes_value]
            i += 1 + takes_value
        elif arg.startswith("--") and len(opts) % 2 == 0:  # a flag where a KEY should stand
            hint = did_you_mean(name, FLAG_TAKES_VALUE, 0.6)
            raise MdistillerError(f"unknown flag {name}{hint}; train.py takes {', '.join(FLAG_TAKES_VALUE)} and "
                                  f"KEY VALUE overrides")
        else:  # KEY or VALUE (a value may look like a flag: "-1", "-1e-3")
            opts.append(arg)
            i += 1
    args = _parser().parse_args(flags)
    args.opts = opts
    if not args.logit_stand:
        values = (("--base-temp", args.base_temp), ("--kd-weight", args.kd_weight))
        given = [f"{flag} {value:g}" for flag, value in values if value is not None]
        if given:
            raise MdistillerError(f"{' '.join(given)} without --logit-stand changes nothing: add --logit-stand or "
                                  f"leave {'them' if len(given) > 1 else 'it'} out")
    args.base_temp = DEFAULT_BASE_TEMP if args.base_temp is None else args.base_temp
    args.kd_weight = DEFAULT_KD_WEIGHT if args.kd_weight is None else args.kd_weight
    return args


def build_cfg(args: argparse.Namespace):
    """Defaults <- --cfg <- KEY VALUE overrides <- SDD's flags <- LS flags <- --same-t; frozen. (The run validates it,
    with everything else, before any side effect: engine/validate.py.)

    The flags stand for overrides of the file's values; a flag that would replace a value the command line typed is
    refused (check_flags_against_keys), so what a run name shows is what trains. --M/--warmup and --same-t are
    recorded as the overrides they stand for (`SDD.M`, `DKD.WARMUP`, `RLD.ALPHA_T`) in `args.opts`, so the run name
    says them as config.yaml does."""
    opts = list(args.opts or [])
    cfg = load_cfg(args.cfg, opts)
    typed = dict(zip(opts[::2], opts[1::2]))  # a key given twice counts once, with its last value
    refuse_ls_records(cfg, typed, args)
    sdd_opts = sdd_flag_overrides(cfg, args.M, args.warmup)  # SDD.M / DKD.WARMUP, recorded as overrides
    typed_cfg = cfg.clone()  # what the file and the overrides say, before the flags
    set_by: dict[str, str] = {}  # key -> the flag words that last changed it
    _apply_flags(cfg, args, sdd_opts, set_by)
    check_flags_against_keys(cfg, typed_cfg, typed, set_by, lambda probe: _apply_flags(probe, args, sdd_opts, {}))
    args.opts = [*opts, *sdd_opts]
    if args.same_t:
        args.opts += ["RLD.ALPHA_T", f"{cfg.RLD.ALPHA_T:g}"]
    cfg.freeze()
    return cfg


def _apply_flags(cfg, args: argparse.Namespace, sdd_opts: list[str], set_by: dict[str, str]) -> None:
    """SDD's flags, then the LS flags, then --same-t, noting in set_by which flag changed which key."""
    for key, value in zip(sdd_opts[::2], sdd_opts[1::2]):
        words = f"--M {args.M}" if key == "SDD.M" else f"--warmup {args.warmup}"
        _tracking(cfg, set_by, lambda k=key, v=value: merge_opts(cfg, [k, v]), lambda _key, w=words: w)
    if args.logit_stand:
        _tracking(cfg, set_by, lambda: apply_logit_stand_flags(cfg, args.base_temp, args.kd_weight),
                  _ls_words(cfg, args.base_temp, args.kd_weight))
    if args.same_t:
        _tracking(cfg, set_by, lambda: rld_same_t(cfg), lambda _key: "--same-t")


def _tracking(cfg, set_by: dict[str, str], apply: Callable[[], None], words_for: Callable[[str], str]) -> None:
    """Apply one flag to cfg, noting in set_by the keys it changed."""
    before = leaf_values(cfg)
    apply()
    for key, value in leaf_values(cfg).items():
        if value != before[key]:
            set_by[key] = words_for(key)


def _ls_words(cfg, base_temp: float, kd_weight: float) -> Callable[[str], str]:
    """For a key the LS mapping changes: `--logit-stand` and the flag(s) its value follows (found by moving each
    flag's value on a copy)."""
    def mapped(temp: float, weight: float) -> dict[str, Any]:
        probe = cfg.clone()
        apply_logit_stand_flags(probe, temp, weight)
        return leaf_values(probe)

    base, hotter, heavier = mapped(base_temp, kd_weight), mapped(base_temp + 1, kd_weight), mapped(base_temp,
                                                                                                   kd_weight + 1)

    def words(key: str) -> str:
        parts = ["--logit-stand"]
        if hotter[key] != base[key]:
            parts.append(f"--base-temp {base_temp:g}")
        if heavier[key] != base[key]:
            parts.append(f"--kd-weight {kd_weight:g}")
        return " ".join(parts)
    return words


def _shown(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value).replace(" ", "")


def check_flags_against_keys(cfg, typed_cfg, typed: dict[str, str], set_by: dict[str, str],
                             apply_flags: Callable[[Any], None]) -> None:
    """One rule for flags against keys: a value the command line typed (`KEY VALUE`) that a flag then replaces is
    refused in one line naming both. A flag that scales the typed value (DKD's and RLD's `--kd-weight` multiply
    ALPHA and BETA, as their authors' code does) composes with it instead: the run name keeps the typed factor beside
    the LS tag's w (engine/run.py). The flags replace the file's values by design: that is what they are for."""
    for key, raw in typed.items():
        before, final = cfg_value(typed_cfg, key), cfg_value(cfg, key)
        if key not in set_by or final == before or _scales(typed_cfg, key, final, apply_flags):
            continue
        raise MdistillerError(f"{key} {raw} and {set_by[key]} both set {key} ({raw} vs {_shown(final)}); keep one")


def _scales(typed_cfg, key: str, final: Any, apply_flags: Callable[[Any], None]) -> bool:
    """Whether the flags' value for key follows the typed one (a multiplier), found by moving it on a copy."""
    value = cfg_value(typed_cfg, key)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    probe = typed_cfg.clone()
    section, _, leaf = key.rpartition(".")
    cfg_value(probe, section)[leaf] = type(value)(value * 2 + 1)
    apply_flags(probe)
    return cfg_value(probe, key) != final


_LS_RECORDS = ("EXPERIMENT.BASE_TEMP", "EXPERIMENT.KD_WEIGHT")  # what --logit-stand records; they set nothing else


def refuse_ls_records(cfg, typed: dict[str, str], args: argparse.Namespace) -> None:
    """EXPERIMENT.BASE_TEMP / KD_WEIGHT only record what --logit-stand did: typed without the flags they would put
    `LS:T<τ>,w<w>` in the run name while nothing trains at τ; and a file that already holds them (a run's
    config.yaml) has had the flags applied, so applying them again (DKD and RLD multiply their weights) is refused."""
    if not args.logit_stand:
        typed_records = [f"{key} {typed[key]}" for key in _LS_RECORDS if key in typed and cfg_value(cfg, key)]
        if typed_records:
            raise MdistillerError(f"{' and '.join(typed_records)}: only a record of what --logit-stand "
                                  f"--base-temp/--kd-weight did, setting nothing that trains: give the flags instead")
        return
    held = {key: cfg_value(cfg, key) for key in _LS_RECORDS if key not in typed and cfg_value(cfg, key)}
    if held:
        values = ", ".join(f"{key} {_shown(value)}" for key, value in held.items())
        raise MdistillerError(f"{args.cfg} already holds a --logit-stand setting ({values}: the flags were applied "
                              f"to it, as in a run's config.yaml); --logit-stand would apply them again: leave the "
                              f"flags out")


def resume_command(argv: list[str]) -> str:
    """The command line that continues this one (a --resume-changed / --resume-from of this one is done by then)."""
    args, skip = [], False
    for a in argv:
        dropped = a in ("--resume", "--resume-changed", "--resume-from") or a.startswith("--resume-from=")
        if not (skip or dropped):
            args.append(a)
        skip = a == "--resume-from"
    script = sys.argv[0] if sys.argv[0].endswith("train.py") else "tools/train.py"
    if distributed.world_size() == 1:
        return shlex.join(["python", script, "--resume", *args])
    local = os.environ.get("LOCAL_WORLD_SIZE", str(distributed.world_size()))
    if int(local) == distributed.world_size():
        return shlex.join(["torchrun", "--nproc_per_node", local, script, "--resume", *args])
    return "torchrun <the same launch flags on every node> " + shlex.join([script, "--resume", *args])


def main(argv: list[str] | None = None) -> dict | list[dict]:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        return _train(argv)
    except MdistillerError as exc:
        if distributed.reported_here(exc):
            raise
        raise SystemExit(2) from None  # under torchrun rank 0 prints what every rank found alike


def _train(argv: list[str]) -> dict | list[dict]:
    with distributed.raised_on_every_rank():
        args = parse_args(argv)
        seeds = parse_seeds(args.seeds) if args.seeds is not None else None
        cfg = build_cfg(args)
    with distributed.process_group():  # a no-op without torchrun's environment
        try:
            resume = args.resume or args.resume_changed
            if seeds is not None:
                if args.resume_from:
                    raise MdistillerError("--resume-from continues one run; resume the seeds one at a time")
                return train_sweep(cfg, args.opts or [], seeds, resume=resume, resume_changed=args.resume_changed)
            return train_run(cfg, args.opts or [], resume=resume, resume_changed=args.resume_changed,
                             resume_from=args.resume_from)
        except TrainingInterrupted as exc:
            if distributed.is_main_process():
                print(f"{exc}; continue with: {resume_command(argv)}", file=sys.stderr, flush=True)
            raise SystemExit(exc.exit_code) from None


def entry_point() -> None:
    """The console script: main() with one-line errors."""
    run_cli(main)


if __name__ == "__main__":
    entry_point()
