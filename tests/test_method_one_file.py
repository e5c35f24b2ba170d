"""A method is one file: a module written into a folder on MDISTILLER_METHODS trains through tools/train.py with a
config naming its keys, without any other file of the project edited."""

from __future__ import annotations

import os
import textwrap

import pytest

from conftest import run_overrides, run_tool

TOY_METHOD = textwrap.dedent('''
    """TOYKD: KD whose temperature rises by T_STEP per epoch (a method that exists only in this test)."""

    from mdistiller.distillers import (Declaration, Distiller, Key, config_section, cross_entropy, logits_on,
                                       register_distiller)
    from mdistiller.distillers.kd import kd_loss

    config_section("TOYKD", {
        "CE_WEIGHT": Key(1.0, "weight of the cross-entropy"),
        "KD_WEIGHT": Key(1.0, "weight of the KL term"),
        "T_START": Key(1.0, "temperature at epoch 1"),
        "T_STEP": Key(0.5, "temperature added per epoch"),
        "SCHEDULE": {"KIND": Key("linear", "how the temperature moves", ("linear", "constant"))},
    })


    @register_distiller("TOYKD")
    class ToyKD(Distiller):
        declares = Declaration(loss_terms=("loss_ce", "loss_kd"), distillation_terms=("loss_kd",),
                               config_sections=("TOYKD",), teacher_reads=logits_on("image"))

        @classmethod
        def from_config(cls, cfg):
            toy = cfg.TOYKD
            return {"ce_weight": toy.CE_WEIGHT, "kd_weight": toy.KD_WEIGHT, "t_start": toy.T_START,
                    "t_step": toy.T_STEP if toy.SCHEDULE.KIND == "linear" else 0.0}

        def setup(self, ce_weight, kd_weight, t_start, t_step):
            self.ce_weight, self.kd_weight, self.t_start, self.t_step = ce_weight, kd_weight, t_start, t_step

        def forward_train(self, image, target, epoch=1, **batch):
            logits, _ = self.student(image)
            teacher = self.teacher_logits(image, batch.get("teacher_logits"))
            temperature = self.t_start + self.t_step * (epoch - 1)
            return logits, {"loss_ce": self.ce_weight * cross_entropy(logits, target),
                            "loss_kd": self.kd_weight * kd_loss(logits, teacher, temperature)}
''')


@pytest.fixture
def toy_method_folder(tmp_path, monkeypatch):
    folder = tmp_path / "methods"
    folder.mkdir()
    (folder / "toykd.py").write_text(TOY_METHOD)
    monkeypatch.setenv("MDISTILLER_METHODS", str(folder))
    return folder


def _toy_config(tmp_path, teacher: str, toykd: str = "{T_START: 2.0, T_STEP: 1.0, KD_WEIGHT: 0.5}") -> str:
    path = tmp_path / "toykd.yaml"
    path.write_text(textwrap.dedent(f"""\
        EXPERIMENT: {{NAME: toy}}
        DISTILLER: {{TYPE: TOYKD, TEACHER: resnet8, STUDENT: resnet8, TEACHER_CKPT: {teacher}}}
        SOLVER: {{BATCH_SIZE: 32, EPOCHS: 2, LR: 0.05}}
        TOYKD: {toykd}
        """))
    return str(path)


@pytest.mark.slow
def test_a_method_in_one_new_file_trains_through_tools_train(tmp_path, toy_method_folder, cifar100_tiny_root,
                                                              teacher_ckpt):
    config = _toy_config(tmp_path, teacher_ckpt("resnet8"))
    overrides = run_overrides(tmp_path, cifar100_tiny_root)
    overrides[overrides.index("SOLVER.EPOCHS") + 1] = "2"
    done = run_tool("train.py", "--cfg", config, *overrides)
    assert done.returncode == 0, done.stderr[-3000:]
    (run_dir,) = (tmp_path / "output" / "distill").iterdir()
    worklog = (run_dir / "worklog.txt").read_text()
    assert "loss_kd" in worklog and "epoch: 2" in worklog
    saved = (run_dir / "config.yaml").read_text()
    assert "TOYKD:" in saved and "T_START: 2.0" in saved and "KIND: linear" in saved
    assert os.path.isfile(run_dir / "student_best")


def test_the_new_method_s_keys_are_checked_like_every_other(tmp_path, toy_method_folder, teacher_ckpt):
    bad_key = _toy_config(tmp_path, teacher_ckpt("resnet8"), "{KD_WEIGHTS: 0.5}")
    done = run_tool("train.py", "--cfg", bad_key, "LOG.PREFIX", str(tmp_path / "out"))
    assert done.returncode == 2
    assert "unknown config key TOYKD.KD_WEIGHTS" in done.stderr and "did you mean TOYKD.KD_WEIGHT" in done.stderr
    assert not (tmp_path / "out").exists()
    bad_value = _toy_config(tmp_path, teacher_ckpt("resnet8"))
    done = run_tool("train.py", "--cfg", bad_value, "TOYKD.SCHEDULE.KIND", "cosine", "LOG.PREFIX",
                    str(tmp_path / "out"))
    assert done.returncode == 2
    assert "TOYKD.SCHEDULE.KIND 'cosine' is not one of linear, constant" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
