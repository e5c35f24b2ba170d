"""--resume checks the recipe (engine/run_identity.py): a run records its identity at start (config, teacher file's
SHA-256, data fingerprint, version); a resume with another recipe is refused in one line listing the differing keys,
unless --resume-changed, which keeps the previous config in config_history/ and notes the change in the worklog. Keys
that cannot change what is computed (LOG.*, DATASET.NUM_WORKERS, a moved teacher file) do not count."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from mdistiller.cli import train as train_tool
from mdistiller.engine import worklog
from mdistiller.engine.cfg import default_cfg
from mdistiller.engine.run_identity import NEUTRAL_KEYS, differences, flat_config
from mdistiller.errors import MdistillerError

from conftest import REPO, run_overrides, save_teacher

VANILLA = REPO / "configs/cifar100/vanilla/resnet8.yaml"
KD = str(REPO / "configs/cifar100/kd/resnet56_resnet20.yaml")


def _files(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def _unfinish(run_dir: Path) -> None:
    """Make the finished 2-epoch run look stopped after epoch 1 (its epoch_1 checkpoint becomes `latest`)."""
    shutil.copyfile(run_dir / "epoch_1", run_dir / "latest")


def _common(tmp: Path, data_root: str) -> list[str]:
    return [*run_overrides(tmp, data_root), "SOLVER.BATCH_SIZE", "32", "LOG.SAVE_CHECKPOINT_FREQ", "1"]


def test_a_changed_teacher_file_is_refused_naming_the_key_a_moved_one_is_not(tmp_path, cifar100_tiny_root):
    teacher = save_teacher(str(tmp_path / "t" / "a.pth"), "resnet8", seed=0)
    other = save_teacher(str(tmp_path / "t" / "b.pth"), "resnet8", seed=1)
    args = ["--cfg", KD, *_common(tmp_path, cifar100_tiny_root), "SOLVER.EPOCHS", "2", "DISTILLER.TEACHER", "resnet8",
            "DISTILLER.STUDENT", "resnet8"]
    run_dir = Path(train_tool.main([*args, "DISTILLER.TEACHER_CKPT", teacher])["run_dir"])
    identity = json.loads((run_dir / "identity.json").read_text())
    assert identity["teacher_sha256"] and identity["data_fingerprint"] and identity["version"]
    _unfinish(run_dir)
    before = _files(run_dir)
    with pytest.raises(MdistillerError) as info:
        train_tool.main([*args, "DISTILLER.TEACHER_CKPT", other, "--resume"])
    message = str(info.value)
    assert "\n" not in message and "DISTILLER.TEACHER_CKPT (another file: sha256" in message
    assert "--resume-changed" in message and _files(run_dir) == before
    moved = tmp_path / "moved.pth"
    shutil.copyfile(teacher, moved)  # the same teacher elsewhere, and another worker count: the same recipe
    result = train_tool.main([*args, "DISTILLER.TEACHER_CKPT", str(moved), "DATASET.NUM_WORKERS", "1", "--resume"])
    assert result["run_dir"] == str(run_dir) and len(worklog.read(run_dir)) == 2
    history = sorted(p.name for p in (run_dir / "config_history").iterdir())
    assert history == ["config.1.yaml", "identity.1.json"]  # the worker count and the path differ: kept, noted
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["DATASET"]["NUM_WORKERS"] == 1


def test_an_edited_yaml_is_refused_then_accepted_with_resume_changed(tmp_path, cifar100_tiny_root):
    config = tmp_path / "recipe.yaml"
    shutil.copyfile(VANILLA, config)
    args = ["--cfg", str(config), *_common(tmp_path, cifar100_tiny_root), "SOLVER.EPOCHS", "2"]
    run_dir = Path(train_tool.main(args)["run_dir"])
    _unfinish(run_dir)
    started = (run_dir / "config.yaml").read_text()
    recipe = yaml.safe_load(config.read_text())
    recipe["SOLVER"]["LR"] = 0.01
    recipe["SOLVER"]["WEIGHT_DECAY"] = 0.001
    config.write_text(yaml.safe_dump(recipe))
    before = _files(run_dir)
    with pytest.raises(MdistillerError, match=r"^--resume with another recipe than .*: SOLVER.LR \(0.05 -> 0.01\); "
                                              r"SOLVER.WEIGHT_DECAY \(0.0005 -> 0.001\)\. .*--resume-changed"):
        train_tool.main([*args, "--resume"])
    assert _files(run_dir) == before
    result = train_tool.main([*args, "--resume-changed"])
    assert result["run_dir"] == str(run_dir)
    assert (run_dir / "config_history" / "config.1.yaml").read_text() == started
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["SOLVER"]["LR"] == 0.01
    notes = [line for line in (run_dir / "worklog.txt").read_text().splitlines() if line.startswith("# ")]
    assert len(notes) == 1 and "SOLVER.LR (0.05 -> 0.01)" in notes[0] and "config_history/config.1.yaml" in notes[0]
    assert [int(e["epoch"]) for e in worklog.read(run_dir)] == [1, 2]
    assert "resumed with a changed recipe" in (run_dir / "log.txt").read_text()
    train_tool.main([*args, "--resume"])  # the accepted recipe is now the run's: a plain resume passes


def test_a_run_from_before_identity_json_is_checked_against_its_config_yaml(tmp_path, cifar100_tiny_root):
    config = tmp_path / "recipe.yaml"
    shutil.copyfile(VANILLA, config)
    args = ["--cfg", str(config), *_common(tmp_path, cifar100_tiny_root)]
    run_dir = Path(train_tool.main(args)["run_dir"])
    (run_dir / "identity.json").unlink()
    config.write_text(config.read_text().replace("LR: 0.05", "LR: 0.02"))
    with pytest.raises(MdistillerError, match=r"SOLVER.LR \(0.05 -> 0.02\)"):
        train_tool.main([*args, "--resume"])


def test_neutral_keys_and_the_differences_line():
    cfg = default_cfg()
    base = {"config": flat_config(cfg), "teacher_sha256": "a" * 64, "data_fingerprint": "d" * 64, "version": "1"}
    changed = json.loads(json.dumps(base))
    for key in ("LOG.PREFIX", "LOG.SAVE_CHECKPOINT_FREQ", "DATASET.NUM_WORKERS", "DISTILLER.TEACHER_CKPT",
                "DATASET.ROOT", "EXPERIMENT.TAG", "DISTRIBUTED.FIND_UNUSED_PARAMETERS", "DATASET.DOWNLOAD"):
        changed["config"][key] = "elsewhere"
    assert differences(base, changed) == []
    assert "LOG." in NEUTRAL_KEYS
    changed["config"]["SOLVER.CHANNELS_LAST"] = True  # changes the kernels, so the bits: compared
    changed["teacher_sha256"] = "b" * 64
    changed["data_fingerprint"] = None  # unknown now: DATASET.ROOT is then compared by its value
    assert [d.split(" ")[0] for d in differences(base, changed)] == ["DATASET.ROOT", "SOLVER.CHANNELS_LAST",
                                                                     "DISTILLER.TEACHER_CKPT"]


def test_a_damaged_latest_names_the_newest_intact_epoch_and_resume_from_continues_exactly(tmp_path,
                                                                                          cifar100_tiny_root):
    args = ["--cfg", str(VANILLA), *_common(tmp_path, cifar100_tiny_root), "SOLVER.EPOCHS", "2"]
    run_dir = Path(train_tool.main(args)["run_dir"])
    finished = torch.load(run_dir / "student_latest", weights_only=False)["model"]
    for name in ("latest", "epoch_2"):
        data = (run_dir / name).read_bytes()
        (run_dir / name).write_bytes(data[: len(data) // 2])
    before = _files(run_dir)
    with pytest.raises(MdistillerError) as info:
        train_tool.main([*args, "--resume"])
    assert str(info.value).startswith(f"{run_dir / 'latest'} is truncated or corrupt (")
    assert str(info.value).endswith(f"the newest intact checkpoint is {run_dir / 'epoch_1'}: continue from it with "
                                    f"--resume-from epoch_1") and "\n" not in str(info.value)
    with pytest.raises(MdistillerError, match=r"^--resume-from epoch_2: .*epoch_2 is truncated or corrupt"):
        train_tool.main([*args, "--resume-from", "epoch_2"])
    with pytest.raises(MdistillerError, match="takes the name of a checkpoint in the run folder"):
        train_tool.main([*args, "--resume-from", "../epoch_1"])
    assert _files(run_dir) == before
    train_tool.main([*args, "--resume-from", "epoch_1"])
    assert (run_dir / "latest.damaged").read_bytes() == before["latest"]
    again = torch.load(run_dir / "student_latest", weights_only=False)["model"]
    assert all(torch.equal(finished[k], again[k]) for k in finished)  # epoch 2 trained again, to the bit
    assert [int(e["epoch"]) for e in worklog.read(run_dir)] == [1, 2]


def test_the_continue_command_drops_the_one_off_resume_flags():
    command = train_tool.resume_command(["--cfg", "a.yaml", "--resume-from", "epoch_3", "--resume-changed", "X.Y", "1"])
    assert command.endswith("--resume --cfg a.yaml X.Y 1")
