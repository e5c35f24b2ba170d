"""The sweep planner as a pure function (sweep_plan.plan_runs): runs built in memory from the default config, their
state given as a table (no disk), and what the plan makes of them: teacher runs first and once per teacher, runs that
wait for them, missing teachers recorded, finished runs left alone, repeats dropped. Also the sweep file's declared
schema (sweep_file.validate_sweep) and the immutable Run."""

from __future__ import annotations

import dataclasses
import os

import pytest

from mdistiller.cli.sweep_file import Entry, Sweep, validate_sweep
from mdistiller.cli.sweep_plan import Run, make_run, plan_runs, with_teacher
from mdistiller.cli.sweep_state import RunStatus, SweepState
from mdistiller.engine.cfg import default_cfg
from mdistiller.errors import MdistillerError

SWEEP = Sweep(runs=(Entry(configs=("x.yaml",)),), name="t", path="t.yaml")
WHY = "the zoo has no resnet32x4 weights"


def _recipe(method: str = "KD", teacher: str = "resnet32x4", student: str = "resnet8x4", tag: str = "kd",
            ckpt: str = ""):
    cfg = default_cfg()
    cfg.DISTILLER.TYPE, cfg.DISTILLER.TEACHER, cfg.DISTILLER.STUDENT = method, teacher, student
    cfg.DISTILLER.TEACHER_CKPT = ckpt
    cfg.EXPERIMENT.TAG, cfg.LOG.PREFIX, cfg.LOG.RESULTS_DIR = tag, "/nowhere/output", "/nowhere/logs"
    cfg.freeze()
    return cfg


def _run(seed: int = 0, **recipe) -> Run:
    return make_run(f"{recipe.get('tag', 'kd')}.yaml", seed, [], [], _recipe(**recipe))


class Teachers:
    """make_teacher: a vanilla run of the teacher, counting the calls."""

    def __init__(self):
        self.calls: list[tuple[str, str]] = []

    def __call__(self, teacher: str, dataset_type: str) -> Run:
        self.calls.append((teacher, dataset_type))
        return make_run("vanilla.yaml", 0, [], [], _recipe("NONE", "", teacher, f"vanilla,{teacher}"),
                        is_teacher=True)


KD0, KD1 = _run(0), _run(1)
GIVEN = _run(0, tag="kd_given", ckpt="/weights/mine.pth")  # DISTILLER.TEACHER_CKPT given, not found
DKD = _run(0, method="DKD", teacher="wrn_40_2", tag="dkd")
DONE = RunStatus("done")

# (case, runs, state (statuses, teacher_missing by index), train teachers,
#  expected: names in plan order ("T:<teacher>" for a teacher run), teacher of each student (index) or "", missing)
CASES = [
    ("nothing missing", [KD0, KD1], {}, {}, True, ["KD0", "KD1"], ["", ""], {}),
    ("missing, not trained: recorded", [KD0, KD1], {}, {0: WHY, 1: WHY}, False, ["KD0", "KD1"], ["", ""],
     {"resnet32x4": WHY}),
    ("missing, trained: one teacher run first", [KD0, KD1], {}, {0: WHY, 1: WHY}, True,
     ["T:resnet32x4", "KD0", "KD1"], ["resnet32x4", "resnet32x4"], {}),
    ("a finished run needs no teacher", [KD0, KD1], {0: DONE}, {0: WHY, 1: WHY}, True,
     ["T:resnet32x4", "KD0", "KD1"], ["", "resnet32x4"], {}),
    ("all finished: no teacher run", [KD0, KD1], {0: DONE, 1: DONE}, {0: WHY, 1: WHY}, True, ["KD0", "KD1"],
     ["", ""], {}),
    ("a given TEACHER_CKPT is not replaced", [GIVEN], {}, {0: "not found"}, True, ["GIVEN"], [""],
     {"resnet32x4": "not found"}),
    ("one teacher run per teacher", [KD0, DKD, KD1], {}, {0: WHY, 1: "no wrn", 2: WHY}, True,
     ["T:resnet32x4", "T:wrn_40_2", "KD0", "DKD", "KD1"], ["resnet32x4", "wrn_40_2", "resnet32x4"], {}),
    ("repeats dropped", [KD0, KD0, KD1], {}, {}, False, ["KD0", "KD1"], ["", ""], {}),
]
NAMES = {KD0.run_dir: "KD0", KD1.run_dir: "KD1", GIVEN.run_dir: "GIVEN", DKD.run_dir: "DKD"}


@pytest.mark.parametrize("case, runs, statuses, missing, train, names, teachers, expected_missing", CASES,
                         ids=[c[0] for c in CASES])
def test_the_planner_over_a_table_of_states(case, runs, statuses, missing, train, names, teachers,
                                            expected_missing):
    state = SweepState({runs[i].run_dir: s for i, s in statuses.items()},
                       {runs[i].run_dir: why for i, why in missing.items()})
    make_teacher = Teachers() if train else None
    plan = plan_runs(SWEEP, runs, state, make_teacher)
    got = [f"T:{r.cfg.DISTILLER.STUDENT}" if r.is_teacher else NAMES[r.run_dir] for r in plan.runs]
    assert got == names
    by_dir = {r.run_dir: r for r in plan.runs if r.is_teacher}
    students = [r for r in plan.runs if not r.is_teacher]
    assert [by_dir[r.teacher_run].cfg.DISTILLER.STUDENT if r.teacher_run else "" for r in students] == teachers
    assert plan.missing_teachers() == expected_missing
    if make_teacher is not None:  # once per teacher, with the data set of the run that needs it
        assert sorted(make_teacher.calls) == sorted({(t, "cifar100") for t in teachers if t})


def test_a_student_of_a_teacher_run_distils_from_its_student_best_and_keeps_its_folder_and_hash():
    teacher = Teachers()("resnet32x4", "cifar100")
    student = with_teacher(KD0, teacher)
    ckpt = os.path.abspath(os.path.join(teacher.run_dir, "student_best"))
    assert student.opts[-2:] == ("DISTILLER.TEACHER_CKPT", ckpt) and student.cfg.DISTILLER.TEACHER_CKPT == ckpt
    assert (student.run_dir, student.config_hash, student.teacher_run) == (KD0.run_dir, KD0.config_hash,
                                                                          teacher.run_dir)
    assert KD0.opts == () and KD0.cfg.DISTILLER.TEACHER_CKPT == "" and KD0.teacher_run == ""  # a new value
    with pytest.raises(dataclasses.FrozenInstanceError):
        KD0.seed = 3  # type: ignore[misc]
    assert student.train_args()[-2:] == ["DISTILLER.TEACHER_CKPT", ckpt]


def test_two_recipes_in_one_folder_are_refused():
    other = make_run("kd.yaml", 0, [], [], _recipe(student="resnet14"))
    clash = dataclasses.replace(other, run_dir=KD0.run_dir)
    with pytest.raises(MdistillerError, match="share the folder"):
        plan_runs(SWEEP, [KD0, clash], SweepState())


# ---- the declared schema ----

def test_the_schema_fills_defaults_and_converts_values():
    sweep = validate_sweep({"runs": ["a.yaml", {"configs": ["b.yaml"], "opts": {"SOLVER.LR": 0.1}, "seeds": 3,
                                                "ls": "authors"}], "teacher_opts": ["SOLVER.EPOCHS", 1]},
                           "dir/mine.yaml")
    assert (sweep.name, sweep.path, sweep.seeds, sweep.published, sweep.teacher_seed) == ("mine", "dir/mine.yaml",
                                                                                          (0,), False, 0)
    assert sweep.teacher_opts == ("SOLVER.EPOCHS", "1")
    first, second = sweep.entries
    assert first == Entry(configs=("a.yaml",)) and not first.ls_authors
    assert second.opts == ("SOLVER.LR", "0.1") and second.seeds == (3,) and second.ls_authors
    assert validate_sweep(["a.yaml"], "x.yaml").runs == (Entry(configs=("a.yaml",)),)  # a bare list: the runs


@pytest.mark.parametrize("data, message", [
    ({"runs": ["a"], "seed": [0]}, r"unknown key 'seed' in the sweep \(did you mean seeds\?\)"),
    ({"runs": ["a"], "publish": True}, r"unknown key 'publish' in the sweep \(did you mean published\?\)"),
    ({"runs": [{"configs": "a", "flag": []}]}, r"unknown key 'flag' in an entry of runs \(did you mean flags\?\)"),
    ({"runs": [{"configs": "a", "zzz": 1}]}, r"unknown key 'zzz' in an entry of runs \(keys: configs, flags, "),
    ({"runs": ["a"], "teacher_seed": "0"}, "teacher_seed must be an integer"),
    ({"runs": ["a"], "matrix": [1]}, "matrix must map names to lists"),
    ({"runs": "a"}, "runs must be a list"),
    ({"runs": [{"configs": "a", "ls": "authors", "flags": ["--logit-stand"]}]}, "either ls: authors or"),
    ({"runs": [{"flags": []}]}, "a config pattern or a mapping with configs"),
])
def test_the_schema_refuses_with_one_line(data, message):
    with pytest.raises(MdistillerError, match=message) as info:
        validate_sweep(data, "s.yaml")
    assert str(info.value).startswith("sweep file s.yaml: ") and "\n" not in str(info.value)
