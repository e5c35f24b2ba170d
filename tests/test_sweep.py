"""tools/sweep.py: sweep files -> runs (built as tools/train.py builds them), dry-run counts of the shipped sweeps,
skipping finished runs, resuming interrupted ones, the local GPU queue, submitit (local executor, requeue), Ctrl-C,
the report of exactly a sweep's runs, and teacher-first runs."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from mdistiller.analysis.published import CIFAR100
from mdistiller.cli import launchers, slurm, sweep_file, sweep_plan, sweep_state
from mdistiller.cli import sweep as sweep_cli
from mdistiller.cli.launchers import Job, LocalQueue, gpu_slots
from mdistiller.engine.run import append_result
from mdistiller.errors import MdistillerError

from conftest import REPO

VANILLA = "configs/cifar100/vanilla/resnet8.yaml"
KD = "configs/cifar100/kd/resnet56_resnet20.yaml"
METHODS = ("kd", "ctkd", "dkd", "mlkd")
LS_PAIRS = {(teacher, student) for _, teacher, student in CIFAR100}  # the LS paper's 14 pairs


def _where(tmp: Path) -> list[str]:
    """Overrides that keep a sweep's folders inside tmp."""
    return ["LOG.PREFIX", str(tmp / "output"), "LOG.RESULTS_DIR", str(tmp / "logs")]


def _tiny(tmp: Path, data_root: str, epochs: int = 1) -> list[str]:
    return [*_where(tmp), "DATASET.ROOT", data_root, "DATASET.NUM_WORKERS", "0", "SOLVER.EPOCHS", str(epochs),
            "SOLVER.BATCH_SIZE", "16"]


def _write_sweep(tmp: Path, text: str, name: str = "tiny.yaml") -> str:
    path = tmp / name
    path.write_text(text)
    return str(path)


def _finish(run: sweep_plan.Run, best: float = 50.0) -> None:
    """A result line for run, as train.py appends it when the run finishes."""
    os.makedirs(run.run_dir, exist_ok=True)
    append_result(run.cfg, run.run_dir, {"best_acc": best, "last_acc": best - 1})


# ---- the shipped sweeps, dry-run ----

@pytest.fixture(scope="module")
def ls_dry_run(tmp_path_factory):
    """`tools/sweep.py ls_table_cifar100 --dry-run` (planned once for the tests that read it): result, output."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        result = sweep_cli.main(["ls_table_cifar100", "--dry-run", *_where(tmp_path_factory.mktemp("ls"))])
    return result, out.getvalue()


def test_ls_table_dry_run_counts_112_recipes_times_the_seeds(ls_dry_run):
    result, out = ls_dry_run
    plan = result["plan"]
    assert plan.recipes == 14 * 4 * 2 == 112
    assert len(plan.runs) == 112 * 3 and all(s.status == "todo" for s in result["statuses"].values())
    assert "112 recipes x seeds 0,1,2 = 336 runs; 0 finished, 0 to resume, 336 to start; 336 remain" in out
    assert out.count("tools/train.py --cfg") == 336
    # exactly the paper's 14 pairs x 4 methods, each without and with LS
    cells = {(r.cfg.DISTILLER.TYPE, r.cfg.DISTILLER.TEACHER, r.cfg.DISTILLER.STUDENT, r.cfg.EXPERIMENT.LOGIT_STAND)
             for r in plan.runs}
    assert cells == {(m.upper(), t, s, ls) for m in METHODS for t, s in LS_PAIRS for ls in (False, True)}
    assert [r.seed for r in plan.runs[:112]] == [0] * 112, "seed-major: a first full table before any second seed"


def test_ls_runs_take_the_authors_setting_from_the_ls_settings_table(ls_dry_run):
    plan = ls_dry_run[0]["plan"]
    checked = 0
    for run in plan.runs[:112]:
        cfg = run.cfg
        if not cfg.EXPERIMENT.LOGIT_STAND:
            assert run.flags == ()
            continue
        published = CIFAR100[(f"{cfg.DISTILLER.TYPE}+LS", cfg.DISTILLER.TEACHER, cfg.DISTILLER.STUDENT)]
        tau, w = cfg.EXPERIMENT.BASE_TEMP, cfg.EXPERIMENT.KD_WEIGHT
        assert run.flags == ("--logit-stand", "--base-temp", f"{tau:g}", "--kd-weight", f"{w:g}")
        if published.setting is None:  # not logged: the flags' defaults
            assert (tau, w) == (2.0, 9.0), run.config
            continue
        assert (tau, w) == tuple(float(v) for v in published.setting[:2]), run.config
        if cfg.DISTILLER.TYPE == "DKD":  # LS multiplies alpha 1 and the authors' beta by w
            assert (cfg.DKD.ALPHA, cfg.DKD.BETA) == (w, published.setting[2] * w), run.config
        checked += 1
    assert checked >= 20
    dkd = next(r for r in plan.runs if r.config.endswith("dkd/vgg13_vgg8.yaml") and r.cfg.EXPERIMENT.LOGIT_STAND)
    assert dkd.opts[:2] == ("DKD.BETA", "2.0") and dkd.name.startswith("dkd,vgg13,vgg8,DKD.BETA:2.0,LS:T2,w15")


@pytest.mark.slow
def test_classic_sweep_warns_for_configs_not_written_yet_and_runs_the_rest(tmp_path, capsys):
    sweep = sweep_file.load_sweep("classic_cifar100")
    expected = [REPO / f"configs/cifar100/{m}/{p}.yaml" for m in sweep.matrix["method"] for p in sweep.matrix["pair"]]
    present = [p for p in expected if p.is_file()]
    assert len(expected) == 11 * 13
    result = sweep_cli.main(["classic_cifar100", "--dry-run", "--seeds", "0", *_where(tmp_path)])
    assert len(result["plan"].runs) == len(present) > 0
    err = capsys.readouterr().err
    if len(present) < len(expected):
        assert f"warning: {sweep.path} entry 1: {len(expected) - len(present)} of 143 config patterns match no " \
               "file" in err


def test_teachers_sweep_is_every_vanilla_config(tmp_path):
    plan = sweep_cli.main(["teachers_cifar100", "--dry-run", *_where(tmp_path)])["plan"]
    vanilla = sorted((REPO / "configs/cifar100/vanilla").glob("*.yaml"))
    assert len(plan.runs) == len(vanilla) == plan.recipes
    assert {r.cfg.DISTILLER.TYPE for r in plan.runs} == {"NONE"} and {r.seed for r in plan.runs} == {0}


# ---- sweep files: what is accepted and what is refused ----

def test_a_sweep_file_entry_gives_flags_opts_seeds_and_placeholders(tmp_path):
    path = _write_sweep(tmp_path, f"""
name: mine
seeds: [3]
opts: {{SOLVER.EPOCHS: 2}}
matrix: {{model: [resnet8, resnet14]}}
runs:
  - configs/cifar100/vanilla/{{model}}.yaml
  - configs: {KD}
    flags: [--logit-stand, --base-temp, "3", --kd-weight, "6"]
    opts: [SOLVER.LR, "0.01"]
    seeds: [0, 1]
""")
    plan = sweep_plan.plan_sweep(sweep_file.load_sweep(path), [*_where(tmp_path), "SOLVER.EPOCHS", "5"])
    names = [r.name for r in plan.runs]
    assert names == ["vanilla,resnet8,SOLVER.EPOCHS:5,seed:3", "vanilla,resnet14,SOLVER.EPOCHS:5,seed:3",
                     "kd,res56,res20,SOLVER.LR:0.01,SOLVER.EPOCHS:5,LS:T3,w6,seed:0",
                     "kd,res56,res20,SOLVER.LR:0.01,SOLVER.EPOCHS:5,LS:T3,w6,seed:1"]
    kd = plan.runs[2]
    assert kd.cfg.SOLVER.EPOCHS == 5 and kd.cfg.SOLVER.LR == 0.01 and kd.cfg.KD.TEMPERATURE == 3.0
    assert kd.result_file == str(tmp_path / "logs" / "KD,resnet56,resnet20,3,6.txt")
    # the run is exactly what tools/train.py makes of the same arguments
    from mdistiller.cli.train import build_cfg, parse_args
    from mdistiller.engine.run import config_hash, run_dir_of

    args = parse_args(kd.train_args())
    cfg = build_cfg(args)
    assert config_hash(cfg) == kd.config_hash and kd.run_dir == run_dir_of(kd.cfg, args.opts, True)
    assert kd.train_args(resume=True)[:9] == ["--cfg", KD, "--seeds", "0", "--logit-stand", "--base-temp", "3",
                                               "--kd-weight", "6"] and "--resume" in kd.train_args(resume=True)


@pytest.mark.parametrize("text, message", [
    ("runs: [a.yaml]\nseed: [0]\n", "unknown key 'seed' in the sweep"),
    ("runs:\n  - configs: a.yaml\n    flag: [--logit-stand]\n", "unknown key 'flag' in an entry of runs"),
    ("runs:\n  - configs: a.yaml\n    flags: [--resume]\n", "flag --resume is not one an entry may give"),
    ("runs:\n  - configs: a.yaml\n    flags: [--base-temp, x]\n", "invalid float value: 'x'"),
    ("runs:\n  - configs: a.yaml\n    opts: [SOLVER.LR]\n", "KEY VALUE pairs"),
    ("runs:\n  - configs: a.yaml\n    ls: yes\n", "ls takes `authors`"),
    ("seeds: [0, 0]\nruns: [a.yaml]\n", "lists a seed twice"),
    ("name: x\n", "needs `runs:`"),
])
def test_bad_sweep_files_are_one_line_errors(tmp_path, text, message):
    with pytest.raises(MdistillerError, match=message) as info:
        sweep_file.load_sweep(_write_sweep(tmp_path, text))
    assert "\n" not in str(info.value)


def test_bad_plans_are_one_line_errors(tmp_path):
    with pytest.raises(MdistillerError, match="ls_table_cifar100"):  # the error lists the shipped sweeps
        sweep_file.load_sweep("no_such_sweep")
    path = _write_sweep(tmp_path, "runs: ['configs/{what}.yaml']\n")
    with pytest.raises(MdistillerError, match=r"uses \{what\}, which matrix does not define"):
        sweep_plan.plan_sweep(sweep_file.load_sweep(path))
    path = _write_sweep(tmp_path, f"runs: [{VANILLA}]\nopts: [EXPERIMENT.SEED, '1']\n")
    with pytest.raises(MdistillerError, match="EXPERIMENT.SEED in the overrides"):
        sweep_plan.plan_sweep(sweep_file.load_sweep(path))
    path = _write_sweep(tmp_path, "runs: [configs/cifar100/nothing_here/*.yaml]\n")
    with pytest.raises(MdistillerError, match="matches no config file"):
        sweep_cli.main([path, "--dry-run"])
    path = _write_sweep(tmp_path, f"runs:\n  - configs: {VANILLA}\n    ls: authors\n")
    with pytest.raises(MdistillerError, match="no published LS setting for NONE"):
        sweep_plan.plan_sweep(sweep_file.load_sweep(path))
    no_header = tmp_path / "kd_no_header.yaml"  # the setting is data: a config without its header note still has it
    no_header.write_text((REPO / KD).read_text().split("EXPERIMENT:", 1)[1].join(["EXPERIMENT:", ""]))
    path = _write_sweep(tmp_path, f"runs:\n  - configs: {no_header}\n    ls: authors\n    seeds: [0]\n")
    (run,) = sweep_plan.plan_sweep(sweep_file.load_sweep(path)).runs
    assert run.flags == ("--logit-stand", "--base-temp", "2", "--kd-weight", "9")
    with pytest.raises(MdistillerError, match="unknown option --gpu "):
        sweep_cli.main(["teachers_cifar100", "--dry-run", "--gpu", "0"])


# ---- state: finished runs are skipped, interrupted ones resume ----

class RecordingQueue:
    """Stands in for the local queue: records the jobs and 'runs' them by writing their result lines."""

    def __init__(self, plan_runs, finish: bool = True):
        self.by_dir = {r.run_dir: r for r in plan_runs}
        self.finish = finish
        self.jobs: list[Job] = []

    def __call__(self, slots, per_slot=1, say=print):
        outer = self

        class Queue:
            interrupted = False
            per_slot = 1

            def run(self, jobs):
                outer.jobs += jobs
                if outer.finish:
                    for job in jobs:
                        _finish(outer.by_dir[job.key])
                return {job.key: launchers.Outcome("done", 0) for job in jobs}

        return Queue()


@pytest.fixture
def two_by_two(tmp_path):
    """A sweep of 2 recipes x 2 seeds, its path and its plan."""
    path = _write_sweep(tmp_path, f"runs: [{VANILLA}, configs/cifar100/vanilla/resnet14.yaml]\nseeds: [0, 1]\n")
    plan = sweep_plan.plan_sweep(sweep_file.load_sweep(path), _where(tmp_path))
    return path, plan


def test_finished_runs_are_skipped_and_a_second_sweep_does_nothing(two_by_two, tmp_path, monkeypatch, capsys):
    path, plan = two_by_two
    _finish(plan.runs[1])
    # the same recipe and seed trained by hand in another folder counts as finished too
    append_result(plan.runs[3].cfg, str(tmp_path / "by_hand"), {"best_acc": 1.0, "last_acc": 1.0})
    queue = RecordingQueue(plan.runs)
    monkeypatch.setattr(sweep_cli, "LocalQueue", queue)
    first = sweep_cli.main([path, *_where(tmp_path)])
    assert sorted(j.key for j in queue.jobs) == sorted(r.run_dir for r in (plan.runs[0], plan.runs[2]))
    assert all(s.status == "done" for s in first["statuses"].values())
    queue.jobs.clear()
    second = sweep_cli.main([path, *_where(tmp_path)])
    assert queue.jobs == [] and "nothing to do" in capsys.readouterr().out
    assert "4 of 4 runs finished" in second["report"]


def test_an_interrupted_run_needs_resume_and_continues_from_latest(two_by_two, tmp_path, monkeypatch):
    path, plan = two_by_two
    interrupted = plan.runs[2]
    os.makedirs(interrupted.run_dir)
    Path(interrupted.run_dir, "latest").write_bytes(b"state")
    queue = RecordingQueue(plan.runs)
    monkeypatch.setattr(sweep_cli, "LocalQueue", queue)
    with pytest.raises(MdistillerError, match=r"1 run\(s\) of sweep tiny were interrupted .* pass --resume"):
        sweep_cli.main([path, *_where(tmp_path)])
    assert queue.jobs == [], "nothing starts before the refusal"
    sweep_cli.main([path, "--resume", *_where(tmp_path)])
    resumed = {j.key: "--resume" in j.command for j in queue.jobs}
    assert resumed == {r.run_dir: r is interrupted for r in plan.runs}
    job = next(j for j in queue.jobs if j.key == interrupted.run_dir)
    assert job.command[:3] == [sys.executable, "-m", "mdistiller.cli.train"]
    assert job.log_path == os.path.join(interrupted.run_dir, "sweep.log")


def test_report_covers_exactly_the_sweeps_runs_and_lists_failures(two_by_two, tmp_path, capsys):
    path, plan = two_by_two
    r8_s0, r14_s0, r8_s1, r14_s1 = plan.runs
    assert (r8_s0.seed, r8_s1.seed, r8_s0.cfg.DISTILLER.STUDENT) == (0, 1, "resnet8")
    _finish(r8_s0, 60.0)
    _finish(r8_s1, 62.0)
    _finish(r14_s0, 70.0)
    # the same result file also holds runs that are not the sweep's: another seed, another recipe
    with open(r8_s0.result_file, "a") as f:
        f.write(f"best_top1=10.0\tlast_top1=10.0\tseed=7\tepochs=240\tconfig_hash={r8_s0.config_hash}\trun_dir=/x\n")
        f.write("best_top1=11.0\tlast_top1=11.0\tseed=0\tepochs=240\tconfig_hash=0000000000\trun_dir=/y\n")
    (tmp_path / "logs" / "KD,resnet56,resnet20.txt").write_text(
        "best_top1=12.0\tlast_top1=12.0\tseed=0\tepochs=240\tconfig_hash=1111111111\trun_dir=/z\n")
    os.makedirs(r14_s1.run_dir)
    Path(r14_s1.log_path).write_text("[mdistiller-sweep] 2024-01-01 00:00:00 start python -m ...\nepoch 1\n"
                                     "error: DATASET.ROOT not found: /nowhere\n"
                                     "[mdistiller-sweep] 2024-01-01 00:00:05 exit 2\n")
    report = sweep_cli.main(["--report", path, *_where(tmp_path)])["report"]
    assert "3 of 4 runs finished (2 recipes" in report
    assert "| vanilla | 70.00 (n=1) | 61.00 ± 1.41 (n=2) |" in report
    assert "10.00" not in report and "11.00" not in report and "12.00" not in report
    assert f"- {r14_s1.name} — failed (exit 2): error: DATASET.ROOT not found: /nowhere" in report
    out_dir = tmp_path / "output" / "sweeps" / "tiny"
    assert (out_dir / "report.md").read_text() == report
    csv_rows = (out_dir / "report.csv").read_text().splitlines()
    assert len(csv_rows) == 3 and sorted(row.split(",")[8] for row in csv_rows[1:]) == ["1", "2"]


# ---- the local queue (fake commands: no training) ----

RECORDER = """
import json, os, sys, time
start = time.time()
time.sleep(float(sys.argv[2]))
with open(sys.argv[1], "w") as f:
    json.dump({"gpus": os.environ.get("CUDA_VISIBLE_DEVICES"), "start": start, "end": time.time()}, f)
sys.exit(int(sys.argv[3]))
"""


def _recorder_jobs(tmp: Path, n: int, sleep: float = 0.4, codes=None) -> list[Job]:
    script = tmp / "record.py"
    script.write_text(RECORDER)
    codes = codes or [0] * n
    return [Job(f"job{i}", f"job{i}", [sys.executable, str(script), str(tmp / f"job{i}.json"), str(sleep),
                                       str(codes[i])], str(tmp / f"job{i}" / "sweep.log")) for i in range(n)]


def _records(tmp: Path, n: int) -> list[dict]:
    return [json.loads((tmp / f"job{i}.json").read_text()) for i in range(n)]


def _max_overlap(records: list[dict]) -> int:
    events = sorted([(r["start"], 1) for r in records] + [(r["end"], -1) for r in records], key=lambda e: (e[0], e[1]))
    now = peak = 0
    for _, step in events:
        now += step
        peak = max(peak, now)
    return peak


def test_the_queue_packs_per_gpu_runs_on_each_fake_gpu_and_never_more(tmp_path, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    jobs = _recorder_jobs(tmp_path, 8)
    outcomes = LocalQueue(gpu_slots(["0", "1"], 1), per_slot=2, say=lambda _: None).run(jobs)
    assert {o.status for o in outcomes.values()} == {"done"}
    records = _records(tmp_path, 8)
    assert {r["gpus"] for r in records} == {"0", "1"}
    for gpu in ("0", "1"):
        assert _max_overlap([r for r in records if r["gpus"] == gpu]) <= 2
    assert 2 < _max_overlap(records) <= 4
    log = Path(jobs[0].log_path).read_text().splitlines()
    assert log[0].startswith("[mdistiller-sweep] ") and " start " in log[0] and "CUDA_VISIBLE_DEVICES=" in log[0]
    assert log[-1].endswith(" exit 0")


def test_without_gpus_the_queue_runs_one_after_another(tmp_path, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    jobs = _recorder_jobs(tmp_path, 3, sleep=0.1)
    LocalQueue([], per_slot=4, say=lambda _: None).run(jobs)
    records = _records(tmp_path, 3)
    assert _max_overlap(records) == 1 and {r["gpus"] for r in records} == {None}


def test_multi_gpu_runs_get_gpu_groups_and_teachers_go_first(tmp_path, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert gpu_slots(["0", "1", "2", "3"], 2) == [("0", "1"), ("2", "3")]
    with pytest.raises(MdistillerError, match="do not split into runs of 2"):
        gpu_slots(["0", "1", "2"], 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6")
    assert gpu_slots(["2", "0"], 1) == [("6",), ("4",)]  # --gpus counts within the visible GPUs
    with pytest.raises(MdistillerError, match="GPU 3 is not among the 3"):
        gpu_slots(["3"], 1)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    jobs = _recorder_jobs(tmp_path, 4, sleep=0.2, codes=[0, 1, 0, 0])
    jobs[2].after, jobs[3].after = "job0", "job1"  # job1 fails: job3 (its student) is skipped
    outcomes = LocalQueue(gpu_slots(["0", "1", "2", "3"], 2), say=lambda _: None).run(jobs)
    assert [outcomes[f"job{i}"].status for i in range(4)] == ["done", "failed", "done", "skipped"]
    records = _records(tmp_path, 3)
    assert records[2]["start"] >= records[0]["end"] and {r["gpus"] for r in records} <= {"0,1", "2,3"}
    assert launchers.python_command("m", ["a"], 2)[1:6] == ["-m", "torch.distributed.run", "--standalone",
                                                            "--nproc_per_node", "2"]


TRAPS_SIGTERM = """
import os, signal, sys, time
def stop(signum, frame):
    open(sys.argv[1] + ".latest", "w").write(str(signum))
    sys.exit(143)
signal.signal(signal.SIGTERM, stop)
open(sys.argv[1] + ".started", "w").close()
time.sleep(60)
"""


def test_ctrl_c_sends_sigterm_to_every_run_and_starts_no_more(tmp_path, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    script = tmp_path / "trap.py"
    script.write_text(TRAPS_SIGTERM)
    jobs = [Job(f"j{i}", f"j{i}", [sys.executable, str(script), str(tmp_path / f"j{i}")],
                str(tmp_path / f"j{i}.log")) for i in range(3)]
    queue = LocalQueue(gpu_slots(["0", "1"], 1), say=lambda _: None)

    def press_ctrl_c():
        deadline = time.time() + 60
        while not all((tmp_path / f"j{i}.started").exists() for i in range(2)) and time.time() < deadline:
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGINT)

    handler = signal.getsignal(signal.SIGINT)
    threading.Thread(target=press_ctrl_c, daemon=True).start()
    outcomes = queue.run(jobs)
    assert queue.interrupted and signal.getsignal(signal.SIGINT) is handler
    assert [outcomes[f"j{i}"].status for i in range(3)] == ["interrupted", "interrupted", "not started"]
    assert [(tmp_path / f"j{i}.latest").read_text() for i in range(2)] == [str(int(signal.SIGTERM))] * 2
    assert not (tmp_path / "j2.started").exists()


def test_a_slurm_run_ignores_usr2_which_is_its_jobs_to_handle(tmp_path):
    job = Job("k", "k", [sys.executable, "-c", "import time; time.sleep(30)"], str(tmp_path / "sweep.log"))
    proc = launchers.start_process(job, {}, ignore_usr2=True)
    try:
        time.sleep(0.3)
        os.kill(proc.pid, signal.SIGUSR2)
        time.sleep(0.3)
        assert proc.poll() is None, "USR2's default action would have killed it"
    finally:
        proc.kill()
        proc.wait()


# ---- submitit ----

def test_without_submitit_slurm_is_a_one_line_error_with_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "submitit", None)
    with pytest.raises(MdistillerError, match=r"needs submitit: pip install -e \.\[cluster\]"):
        slurm.require_submitit()


RESUMABLE = """
import os, signal, sys, time
latest = sys.argv[1]
if "--resume" in sys.argv:
    assert open(latest).read() == "saved"
    print("resumed from", latest)
    sys.exit(0)
def stop(signum, frame):
    open(latest, "w").write("saved")
    print("interrupted by SIGTERM; saved", latest, flush=True)
    sys.exit(143)
signal.signal(signal.SIGTERM, stop)
print("training", flush=True)
time.sleep(120)
"""


@pytest.mark.slow
def test_a_slurm_job_near_its_time_limit_saves_its_run_and_the_requeued_job_resumes_it(tmp_path):
    """Through submitit's local executor, with a stand-in for train.py that saves on SIGTERM."""
    submitit = pytest.importorskip("submitit")
    script = tmp_path / "train.py"
    script.write_text(RESUMABLE)
    latest = tmp_path / "run" / "latest"
    latest.parent.mkdir()
    log = tmp_path / "run" / "sweep.log"
    command = [sys.executable, str(script), str(latest)]
    call = slurm.SweepJob(Job("run", "run", command, str(log)), [*command, "--resume"], str(latest))
    executor = submitit.LocalExecutor(folder=str(tmp_path / "submitit"))
    # USR2 5 s into the job, as Slurm signals a job before its time limit (or on preemption)
    executor.update_parameters(timeout_min=0.5, signal_delay_s=25)
    job = executor.submit(call)
    assert job.result() == 0, job.stdout()
    assert "requeued" in job.stdout().lower() or "Requeued" in job.stdout()
    text = log.read_text()
    assert "interrupted by SIGTERM; saved" in text and "resumed from" in text
    assert [line.split()[-1] for line in text.splitlines() if " exit " in line] == ["143", "0"]
    starts = [line for line in text.splitlines() if " start " in line]
    assert len(starts) == 2 and "--resume" not in starts[0] and starts[1].split()[-1] == "--resume"


# ---- real runs (tiny): the local queue, Ctrl-C and resume, submitit, teacher first ----

@pytest.mark.slow
def test_ctrl_c_of_the_sweep_leaves_a_resumable_run_and_resume_finishes_it(tmp_path, cifar100_tiny_root, capsys,
                                                                          monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    path = _write_sweep(tmp_path, f"runs: [{VANILLA}]\n")
    overrides = _tiny(tmp_path, cifar100_tiny_root, epochs=4)
    (run,) = sweep_plan.plan_sweep(sweep_file.load_sweep(path), overrides).runs

    def press_ctrl_c():  # once the run has saved its first epoch, i.e. while it trains the second
        deadline = time.time() + 180
        while not Path(run.run_dir, "latest").exists() and time.time() < deadline:
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C in the sweep's terminal does

    threading.Thread(target=press_ctrl_c, daemon=True).start()
    with pytest.raises(SystemExit) as info:
        sweep_cli.main([path, *overrides])
    assert info.value.code == 130
    err = capsys.readouterr().err
    assert "continue with: " in err and "--resume" in err
    assert sweep_state.run_status(run).status == "started", "stopped mid-run: `latest`, no result"
    assert "interrupted by SIGTERM" in Path(run.log_path).read_text()
    with pytest.raises(MdistillerError, match="pass --resume"):
        sweep_cli.main([path, *overrides])
    result = sweep_cli.main([path, "--resume", *overrides])
    assert result["statuses"][run.run_dir].status == "done"
    run_log = Path(run.log_path).read_text()
    assert "resumed from" in run_log and run_log.count(" start ") == 2
    worklog = Path(run.run_dir, "worklog.txt").read_text()
    assert [line for line in worklog.splitlines() if line.startswith("epoch: ")] == [f"epoch: {e}" for e in
                                                                                   range(1, 5)]
    assert "1 of 1 runs finished" in result["report"]


@pytest.mark.slow
def test_submitit_local_executor_trains_the_missing_teacher_then_its_student(tmp_path, cifar100_tiny_root, capsys):
    pytest.importorskip("submitit")
    path = _write_sweep(tmp_path, f"""
teacher_opts: [SOLVER.EPOCHS, 1, SOLVER.BATCH_SIZE, 16]
runs:
  - configs: {KD}
    opts: [DISTILLER.TEACHER, resnet8, DISTILLER.STUDENT, resnet8]
""")
    overrides = _tiny(tmp_path, cifar100_tiny_root)
    slurm = ["--launcher", "slurm", "--cluster", "local", "--time", "10"]
    with pytest.raises(MdistillerError, match="teacher weights of resnet8 are not on disk.*--train-missing-teachers"):
        sweep_cli.main([path, *slurm, *overrides])
    result = sweep_cli.main([path, *slurm, "--train-missing-teachers", *overrides])
    teacher, student = result["plan"].runs
    assert teacher.is_teacher and teacher.name == "vanilla,resnet8,SOLVER.EPOCHS:1,SOLVER.BATCH_SIZE:16,seed:0"
    assert student.teacher_run == teacher.run_dir
    assert {d: o.status for d, o in result["outcomes"].items()} == {teacher.run_dir: "done", student.run_dir: "done"}
    assert all(s.status == "done" for s in result["statuses"].values())
    student_log = Path(student.log_path).read_text()
    assert f"DISTILLER.TEACHER_CKPT {os.path.abspath(teacher.run_dir)}/student_best" in student_log
    assert Path(teacher.log_path).stat().st_mtime <= Path(student.run_dir, "config.yaml").stat().st_mtime
    assert "2 of 2 runs finished" in result["report"] and "teacher (vanilla)" in result["report"]
    assert list((tmp_path / "output" / "sweeps" / "tiny" / "submitit").iterdir()), "submitit's job folders"
    capsys.readouterr()
    again = sweep_cli.main([path, *slurm, "--train-missing-teachers", *overrides])
    assert "nothing to do" in capsys.readouterr().out and len(again["plan"].runs) == 1, \
        "a finished student needs no teacher run"


def test_teacher_cache_goes_to_the_logit_runs_it_can_serve_and_keeps_their_recipe(ls_dry_run):
    from mdistiller.engine.run import config_hash

    runs = ls_dry_run[0]["plan"].runs[:112]
    served = {r.cfg.DISTILLER.TYPE for r in runs if sweep_cli.teacher_output_cache_opts(r, True)}
    refused = {r.cfg.DISTILLER.TYPE for r in runs if not sweep_cli.teacher_output_cache_opts(r, True)}
    assert served == {"KD", "DKD", "CTKD", "MLKD"} and not refused  # MLKD: its weak view (the strong one runs live)
    assert not any(sweep_cli.teacher_output_cache_opts(r, False) for r in runs)  # off unless asked
    kd = next(r for r in runs if r.cfg.DISTILLER.TYPE == "KD")
    cached = kd.cfg.clone()
    cached.defrost()
    cached.DISTILLER.TEACHER_CACHE = "auto"
    assert config_hash(cached) == config_hash(kd.cfg)  # an fp32 cache: the same recipe, finished runs still count
    cached.DISTILLER.TEACHER_CACHE_DTYPE = "fp16"
    assert config_hash(cached) != config_hash(kd.cfg)  # fp16 storage rounds the teacher's logits


@pytest.mark.slow
def test_local_queue_trains_the_missing_teacher_then_its_student(tmp_path, cifar100_tiny_root, capsys, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    path = _write_sweep(tmp_path, f"""
teacher_opts: [SOLVER.EPOCHS, 1, SOLVER.BATCH_SIZE, 16]
runs:
  - configs: {KD}
    opts: [DISTILLER.TEACHER, resnet8, DISTILLER.STUDENT, resnet8]
""")
    overrides = _tiny(tmp_path, cifar100_tiny_root)
    result = sweep_cli.main([path, "--train-missing-teachers", *overrides])
    teacher, student = result["plan"].runs
    assert teacher.is_teacher and student.teacher_run == teacher.run_dir
    assert all(s.status == "done" for s in result["statuses"].values())
    student_log = Path(student.log_path).read_text()
    assert f"DISTILLER.TEACHER_CKPT {os.path.abspath(teacher.run_dir)}/student_best" in student_log
    capsys.readouterr()
    again = sweep_cli.main([path, "--train-missing-teachers", *overrides])
    assert "nothing to do" in capsys.readouterr().out and len(again["plan"].runs) == 1
