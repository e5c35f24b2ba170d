"""tools/bench.py on the CPU: the tiny table, its JSON, the ImageNet-shaped mode and one-line errors."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mdistiller.dataset.cifar import read_cifar_split
from mdistiller.dataset.cifar_files import write_cifar
from mdistiller.errors import MdistillerError

REPO = Path(__file__).resolve().parents[1]
TINY_ROWS = ("reference", "ours", "amp", "channels_last")
IMAGENET_ROWS = ("reference", "ours", "amp", "amp_channels_last")
# row, batch, images/s, s/epoch, peak memory, ratio
TABLE_LINE = re.compile(r"^(\w+)\s+(\d+)\s+([\d,.]+)\s+([\d.]+)\s+(-|[\d.]+ GiB)\s+([\d.]+)$")


@pytest.fixture(scope="module")
def bench():
    """tools/bench.py imported as a module (tools/ is not a package)."""
    module = importlib.import_module("mdistiller.cli.bench")
    return module


def run_bench(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    """`python tools/bench.py args...` on the CPU, one thread (a second one only waits on a busy 2-core machine)."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    return subprocess.run([sys.executable, str(REPO / "tools" / "bench.py"), *args], cwd=str(REPO), env=env,
                          capture_output=True, text=True, timeout=timeout)


def table_rows(stdout: str) -> dict[str, tuple]:
    """{row: (batch, images/s, s/epoch, peak, ratio)} parsed from the printed plain-text table."""
    rows = {}
    for line in stdout.splitlines():
        match = TABLE_LINE.match(line.strip())
        if match:
            name, batch, rate, epoch, peak, ratio = match.groups()
            rows[name] = (int(batch), float(rate.replace(",", "")), float(epoch), peak, ratio)
    return rows


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    """One tiny CPU bench (resnet20 -> resnet8, 64 synthetic images, batch 16, 2 timed steps per row)."""
    json_path = tmp_path_factory.mktemp("bench") / "bench.json"
    result = run_bench("--device", "cpu", "--tiny", "--data", "synthetic", "--synthetic-size", "64", "--steps", "2",
                       "--warmup", "1", "--rows", ",".join(TINY_ROWS), "--json", str(json_path), "--markdown",
                       "--opts", "SOLVER.BATCH_SIZE", "16")
    return result, json_path


@pytest.mark.slow
def test_tiny_cpu_table_has_every_row_with_positive_throughput(tiny_run):
    result, _ = tiny_run
    assert result.returncode == 0, result.stderr
    rows = table_rows(result.stdout)
    assert list(rows) == list(TINY_ROWS), result.stdout
    for name, (batch, rate, epoch, peak, _) in rows.items():
        assert batch == 16 and rate > 0 and epoch > 0 and peak == "-", name
    assert rows["reference"][4] == "1.00"
    assert "random-initialised" in result.stdout
    assert "'ours' reads the same DataLoader as 'reference'" in result.stdout
    assert "| reference | 16 |" in result.stdout  # the Markdown table


def test_json_holds_device_version_date_and_rows(tiny_run):
    result, json_path = tiny_run
    assert result.returncode == 0, result.stderr
    payload = json.loads(json_path.read_text())
    assert payload["device"].startswith("CPU") and payload["torch"] and payload["date"].startswith("20")
    assert payload["teacher_weights"] == "random" and payload["ratio_to"] == "reference"
    assert [r["name"] for r in payload["rows"]] == list(TINY_ROWS)
    for row in payload["rows"]:
        assert row["images_per_s"] > 0 and row["peak_memory_mib"] is None and row["steps"] == 2
        assert row["seconds_per_epoch"] == pytest.approx(50_000 / row["images_per_s"])  # the full CIFAR epoch
        assert row["data"].startswith("DataLoader")  # on the CPU every row reads the DataLoader
    by_name = {r["name"]: r for r in payload["rows"]}
    assert by_name["reference"]["ratio"] == 1.0 and by_name["reference"]["host_sync_every_step"]
    assert by_name["amp"]["switches"] == "bf16 autocast" and by_name["channels_last"]["switches"] == "channels_last"


@pytest.mark.slow
def test_imagenet_shaped_mode_times_synthetic_device_tensors():
    result = run_bench("--device", "cpu", "--cfg", "configs/imagenet/r34_r18/kd.yaml", "--steps", "1", "--warmup",
                       "1", "--opts", "DATASET.IMAGE_SIZE", "32", "SOLVER.BATCH_SIZE", "4")
    assert result.returncode == 0, result.stderr
    rows = table_rows(result.stdout)
    assert list(rows) == list(IMAGENET_ROWS), result.stdout
    assert all(r[0] == 4 and r[1] > 0 for r in rows.values()) and rows["reference"][4] == "1.00"
    assert "KD ResNet34 -> ResNet18" in result.stdout and "synthetic ImageNet-shaped" in result.stdout
    assert "1,281,167 training images" in result.stdout


@pytest.mark.slow
def test_imagenet_loader_rows_time_pil_and_decode_paths_over_written_jpegs(tmp_path):
    json_path = tmp_path / "loader.json"
    result = run_bench("--device", "cpu", "--cfg", "configs/imagenet/r34_r18/kd.yaml", "--tiny", "--rows",
                       "loader_pil,loader_gpu_decode", "--steps", "2", "--warmup", "1", "--json", str(json_path),
                       "--opts", "DATASET.NUM_WORKERS", "1")
    assert result.returncode == 0, result.stderr
    assert re.search(r"^loader_pil +4 +1 +[\d.]+ +[\d,.]+ +1\.00$", result.stdout, re.M), result.stdout
    assert re.search(r"^loader_gpu_decode +4 +1 +[\d.]+ +[\d,.]+ +[\d.]+$", result.stdout, re.M), result.stdout
    assert "[CPU: the same path with device cpu]" in result.stdout and "synthetic 500x375 JPEGs" in result.stdout
    rows = json.loads(json_path.read_text())["loader_rows"]
    assert [r["name"] for r in rows] == ["loader_pil", "loader_gpu_decode"]
    assert all(r["batches_per_s"] > 0 and r["images_per_s"] == pytest.approx(4 * r["batches_per_s"]) for r in rows)
    assert rows[1]["data"].endswith("decode on cpu, 1 workers")


@pytest.mark.slow
def test_bad_row_name_gives_one_line_error_and_exit_code_2():
    result = run_bench("--device", "cpu", "--rows", "reference,nope")
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "unknown row 'nope'; rows: reference, ours" in errors[0], result.stderr


@pytest.mark.parametrize("args, message", [
    (["--cfg", "configs/cifar100/kd/nope.yaml"], "config file not found"),
    (["--cfg", "configs/imagenet/r34_r18/kd.yaml", "--rows", "large_batch"], "row large_batch is the CIFAR"),
    (["--rows", "ours,ours"], "names a row twice"),
    (["--rows", "loader_pil"], "time the ImageNet JPEG pipeline: give an ImageNet --cfg"),
    (["--steps", "0"], "--steps must be positive"),
    (["--data", "real", "--opts", "DATASET.ROOT", "/nonexistent"], "--data real: no cifar-100-python folder"),
    (["--opts", "SOLVER.BATCH_SIZ", "8"], "did you mean SOLVER.BATCH_SIZE?"),
])
def test_bad_input_is_a_user_error_before_any_timing(bench, args, message):
    with pytest.raises(MdistillerError, match=re.escape(message)):
        bench.main(["--device", "cpu", *args])


def test_random_cifar_files_read_back_in_the_real_format(tmp_path):
    write_cifar("cifar100", str(tmp_path), n_train=40, n_test=8, learnable=False)
    images, labels = read_cifar_split("cifar100", str(tmp_path / "cifar-100-python"), train=True)
    assert images.shape == (40, 32, 32, 3) and images.dtype == np.uint8 and labels.max() < 100
    write_cifar("cifar10", str(tmp_path), n_train=40, n_test=8, learnable=False)
    images, _ = read_cifar_split("cifar10", str(tmp_path / "cifar-10-batches-py"), train=True)
    assert images.shape == (40, 32, 32, 3)


# ---- per-method mode ----
# method, batch, images/s, ms/step, step vs KD, paper, s/epoch, peak memory
METHOD_LINE = re.compile(r"^([\w+/.-]+)\s+(\d+)\s+([\d,.]+)\s+([\d.]+)\s+([\d.]+)\s+(-|[\d.]+)\s+([\d.]+)\s+"
                         r"(-|[\d.]+ GiB)$")
TINY_METHODS = ("--device", "cpu", "--tiny", "--data", "synthetic", "--synthetic-size", "32", "--steps", "1",
                "--warmup", "0")


@pytest.mark.usefixtures("one_thread")
def test_methods_mode_times_kd_first_then_each_methods_config_and_its_step_relative_to_kd(bench, tmp_path, capsys):
    json_path = tmp_path / "methods.json"
    results = bench.main([*TINY_METHODS, "--methods", "kd+dot,configs/cifar100/dkd/resnet32x4_resnet8x4.yaml",
                          "--json", str(json_path), "--opts", "SOLVER.BATCH_SIZE", "16"])
    assert [r["method"] for r in results] == ["kd", "kd+dot", "dkd/resnet32x4_resnet8x4"]
    assert [r["distiller"] for r in results] == ["KD", "KD+DOT", "DKD"]
    assert [r["config"] for r in results][:2] == ["configs/cifar100/kd/resnet32x4_resnet8x4.yaml",
                                                   "configs/cifar100/dot/resnet32x4_resnet8x4.yaml"]
    for r in results:
        assert r["name"] == "ours" and r["batch"] == 16 and r["steps"] == 1 and r["images_per_s"] > 0
        assert r["step_ms"] == pytest.approx(1000 * r["seconds"]) and r["step_vs_kd"] > 0
        assert r["step_vs_kd"] == pytest.approx(r["step_ms"] / results[0]["step_ms"])
    assert results[0]["step_vs_kd"] == 1.0 and results[0]["paper_step_vs_kd"] == 1.0
    assert results[1]["paper_step_vs_kd"] is None  # the DKD paper timed no DOT
    out = capsys.readouterr().out
    rows = {m.group(1): m.groups() for m in map(METHOD_LINE.match, out.splitlines()) if m}
    assert list(rows) == ["kd", "kd+dot", "dkd/resnet32x4_resnet8x4"], out
    assert rows["kd"][4] == "1.00" and rows["kd"][5] == "1.00" and rows["kd+dot"][5] == "-"
    assert "per-method: row ours" in out and "resnet20 -> resnet8" in out
    payload = json.loads(json_path.read_text())
    assert payload["mode"] == "methods" and payload["ratio_to"] == "kd" and len(payload["rows"]) == 3


@pytest.mark.parametrize("args, message", [
    (["--methods", "nosuchmethod"], "no config for method 'nosuchmethod': configs/cifar100/nosuchmethod/"
                                    "resnet32x4_resnet8x4.yaml does not exist"),
    (["--methods", "dkd", "--pair", "resnet8_resnet9"], "configs/cifar100/kd/resnet8_resnet9.yaml does not exist"),
    (["--methods", "configs/cifar100/dkd/nope.yaml"], "config file not found: configs/cifar100/dkd/nope.yaml"),
    (["--methods", "dkd,configs/cifar100/dkd/resnet32x4_resnet8x4.yaml"], "names configs/cifar100/dkd/"),
    (["--methods", "dkd", "--cfg", "configs/cifar100/kd/resnet32x4_resnet8x4.yaml"], "leave out --cfg"),
    (["--methods", "dkd", "--rows", "ours,amp"], "--methods times one row for every method; --rows names 2"),
    (["--methods", "dkd", "--rows", "large_batch"], "row large_batch is the KD large-batch config"),
    (["--methods", "configs/imagenet/r34_r18/kd.yaml"], "trains on imagenet"),
])
def test_methods_mode_bad_input_is_one_line_before_any_timing(bench, args, message):
    with pytest.raises(MdistillerError) as info:
        bench.main(["--device", "cpu", *args])
    assert message in str(info.value) and "\n" not in str(info.value)


def test_a_detection_recipe_is_refused_in_one_line():
    from mdistiller.cli import bench

    with pytest.raises(MdistillerError, match=r"DKD-R18-R101.yaml is a detection recipe: tools/bench.py times "):
        bench.main(["--cfg", str(REPO / "configs/coco/DKD-R18-R101.yaml")])
