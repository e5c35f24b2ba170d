"""Downloads without the network: CIFAR's first-use download and tools/download_ckpts.py, served from 127.0.0.1.

CIFAR: torchvision's CIFAR100 class names the archive's URL and MD5; the tests point `CIFAR100.url` at the local
server and set `CIFAR100.tgz_md5` to the MD5 of the small archive they serve (computed here with hashlib), so the
checksum check runs for real on the bytes that came over the socket. The teachers: a cifar_teachers.tar in the
published layout (`cifar_teachers/<model>_vanilla/ckpt_epoch_240.pth`, random zoo models saved as
`{"model": state_dict}`), served, read from a path or from a file:// URL.
"""

from __future__ import annotations

import hashlib
import io
import multiprocessing
import os
import socket
import tarfile
import time
import warnings
from pathlib import Path

import pytest
import torch
import torchvision

from mdistiller import download
from mdistiller.cli import download_ckpts
from mdistiller.dataset import get_dataset
from mdistiller.dataset.cifar import ensure_cifar
from mdistiller.engine.build import build_teacher, teacher_checkpoint_path
from mdistiller.engine.cfg import default_cfg
from mdistiller.errors import MdistillerError

from cifar_files import write_cifar100
from conftest import REPO, run_tool, save_teacher

MEMBER = "cifar_teachers/{}_vanilla/ckpt_epoch_240.pth"


# ---- helpers ----

def tar_bytes(files: dict[str, bytes], mode: str = "w") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@pytest.fixture(scope="session")
def cifar_archive(tmp_path_factory) -> bytes:
    """A cifar-100-python.tar.gz in the official format (the folder and its train/test/meta pickles), 40 images."""
    root = tmp_path_factory.mktemp("cifar_src")
    write_cifar100(str(root), n_train=24, n_test=16, classes_used=10, learnable=False)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(root / "cifar-100-python", arcname="cifar-100-python")
    return buffer.getvalue()


@pytest.fixture
def serve_cifar(http_files, cifar_archive, monkeypatch):
    """Serve the small archive as torchvision's CIFAR-100 URL, with its real MD5 as the expected one."""
    http_files.files["cifar-100-python.tar.gz"] = cifar_archive
    monkeypatch.setattr(torchvision.datasets.CIFAR100, "url", http_files.url("cifar-100-python.tar.gz"))
    monkeypatch.setattr(torchvision.datasets.CIFAR100, "tgz_md5", hashlib.md5(cifar_archive).hexdigest())
    return http_files


@pytest.fixture(scope="session")
def teacher_files(tmp_path_factory) -> dict[str, bytes]:
    """Published-format checkpoints of random resnet56 and wrn_40_2 (the two smallest published teachers) and of a
    resnet20 (an architecture that is not theirs)."""
    folder = tmp_path_factory.mktemp("teacher_src")
    return {arch: Path(save_teacher(str(folder / f"{arch}.pth"), arch, seed=1)).read_bytes()
            for arch in ("resnet56", "wrn_40_2", "resnet20")}


@pytest.fixture(scope="session")
def teachers_tar(teacher_files) -> bytes:
    return tar_bytes({MEMBER.format(m): teacher_files[m] for m in ("resnet56", "wrn_40_2")})


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def leftovers(folder: Path) -> list[str]:
    """Temporary extraction folders and part files left behind."""
    return [p.name for p in folder.iterdir() if p.name.endswith((".extracting", ".part"))] if folder.exists() else []


def cifar_cfg(root: Path):
    cfg = default_cfg()
    cfg.DATASET.ROOT = str(root)
    cfg.DATASET.NUM_WORKERS = 0
    cfg.SOLVER.BATCH_SIZE = 8
    return cfg


# ---- CIFAR on first use ----

def test_missing_cifar_is_downloaded_checked_and_extracted(serve_cifar, tmp_path, capfd):
    root = tmp_path / "data"
    train_loader, val_loader, num_train, num_classes = get_dataset(cifar_cfg(root))
    assert (num_train, len(val_loader.dataset), num_classes) == (24, 16, 100)
    assert sorted(os.listdir(root / "cifar-100-python")) == ["meta", "test", "train"]
    assert (root / "cifar-100-python.tar.gz").is_file()  # kept, as torchvision does: no second download
    assert leftovers(root) == [] and len(serve_cifar.requests) == 1
    assert "downloading CIFAR-100" in capfd.readouterr().err
    get_dataset(cifar_cfg(root))  # present now: read, not fetched again
    assert len(serve_cifar.requests) == 1


def test_refused_connection_is_one_fast_line_saying_where_to_put_the_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("MDISTILLER_OFFLINE")
    monkeypatch.setattr(torchvision.datasets.CIFAR100, "url", f"http://127.0.0.1:{closed_port()}/c.tar.gz")
    start = time.monotonic()
    with pytest.raises(MdistillerError) as info:
        ensure_cifar("cifar100", str(tmp_path / "data"), True)
    assert time.monotonic() - start < 5
    message = str(info.value)
    assert "\n" not in message and message.startswith("CIFAR-100 not found: no folder ")
    assert "failed (Connection refused)" in message and "Put torchvision's cifar-100-python folder under" in message
    assert not (tmp_path / "data" / "cifar-100-python").exists()


def test_a_damaged_archive_already_present_is_named_not_downloaded_over(serve_cifar, tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    (root / "cifar-100-python.tar.gz").write_bytes(b"half an archive")
    with pytest.raises(MdistillerError, match=r"CIFAR-100 archive .*cifar-100-python.tar.gz is damaged \(MD5 \w+, "
                                              r"expected \w+\): delete it to download it again"):
        ensure_cifar("cifar100", str(root), True)
    assert serve_cifar.requests == [] and (root / "cifar-100-python.tar.gz").read_bytes() == b"half an archive"


def test_a_download_failing_the_md5_check_is_deleted(serve_cifar, tmp_path, monkeypatch):
    monkeypatch.setattr(torchvision.datasets.CIFAR100, "tgz_md5", "0" * 32)
    root = tmp_path / "data"
    with pytest.raises(MdistillerError, match=r"downloaded from http://127.0.0.1:\d+/cifar-100-python.tar.gz has "
                                              r"MD5 \w+, not 0{32}: deleted it; run again"):
        ensure_cifar("cifar100", str(root), True)
    assert not root.exists()  # created for the download alone: removed with its lock


def test_a_present_folder_is_never_downloaded_over(serve_cifar, tmp_path):
    root = tmp_path / "data"
    folder = write_cifar100(str(root), n_train=8, n_test=4)
    Path(folder, "test").write_bytes(b"\x80\x04garbage")
    with pytest.raises(MdistillerError, match="test is truncated or corrupt"):
        get_dataset(cifar_cfg(root))
    assert serve_cifar.requests == []


def _ensure_in_child(root: str) -> None:
    ensure_cifar("cifar100", root, True)


def test_two_processes_starting_together_download_once(serve_cifar, tmp_path, capfd):
    """The test holds the lock until both processes wait on it, then lets them race: one downloads, one reads."""
    root = str(tmp_path / "data")
    context = multiprocessing.get_context("fork")  # the children inherit the patched URL and MD5
    err = ""
    with download.file_lock(os.path.join(root, ".cifar-100-python.lock")):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # Python >= 3.12 warns about forking with threads
            children = [context.Process(target=_ensure_in_child, args=(root,)) for _ in range(2)]
            for child in children:
                child.start()
        deadline = time.monotonic() + 30
        while err.count("waiting for another process to download CIFAR-100") < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
            err += capfd.readouterr().err
    for child in children:
        child.join(30)
    err += capfd.readouterr().err
    assert [child.exitcode for child in children] == [0, 0], err
    assert len(serve_cifar.requests) == 1 and err.count("downloading CIFAR-100") == 1
    assert sorted(os.listdir(Path(root) / "cifar-100-python")) == ["meta", "test", "train"]


def test_imagenet_is_never_downloaded(tmp_path, monkeypatch):
    monkeypatch.delenv("MDISTILLER_OFFLINE")
    monkeypatch.setattr(download, "fetch", lambda *a, **k: pytest.fail("ImageNet must not be downloaded"))
    cfg = cifar_cfg(tmp_path)
    cfg.DATASET.TYPE = "imagenet"
    with pytest.raises(MdistillerError, match="ImageNet not found"):
        get_dataset(cfg)


# ---- mdistiller.download.fetch ----

def test_an_interrupted_download_resumes_with_a_range_request(http_files, tmp_path):
    data = os.urandom(300_000)
    http_files.files["blob"] = data
    http_files.cut_after = 100_000
    dest = tmp_path / "blob"
    with pytest.raises(MdistillerError, match=r"interrupted at 0.1 MB of 0.3 MB\); the part is kept in .*blob.part, "
                                              r"run again to resume"):
        download.fetch(http_files.url("blob"), str(dest), "blob")
    assert (tmp_path / "blob.part").stat().st_size == 100_000 and not dest.exists()
    download.fetch(http_files.url("blob"), str(dest), "blob")
    assert dest.read_bytes() == data and not (tmp_path / "blob.part").exists()
    assert [r[1] for r in http_files.requests] == [None, "bytes=100000-"]


def test_a_server_ignoring_range_restarts_the_file(http_files, tmp_path):
    data = os.urandom(50_000)
    http_files.files["blob"], http_files.ignore_range = data, True
    (tmp_path / "blob.part").write_bytes(b"stale bytes")
    download.fetch(http_files.url("blob"), str(tmp_path / "blob"), "blob")
    assert (tmp_path / "blob").read_bytes() == data


def test_a_part_file_already_whole_is_completed_without_a_body(http_files, tmp_path):
    data = os.urandom(10_000)
    http_files.files["blob"] = data
    (tmp_path / "blob.part").write_bytes(data)
    download.fetch(http_files.url("blob"), str(tmp_path / "blob"), "blob")
    assert (tmp_path / "blob").read_bytes() == data and http_files.requests[0][1] == "bytes=10000-"


def test_http_errors_are_one_line(http_files, tmp_path):
    with pytest.raises(MdistillerError, match=r"^downloading x from http://127.0.0.1:\d+/missing failed \(HTTP 404 "):
        download.fetch(http_files.url("missing"), str(tmp_path / "x"), "x")


def test_a_silent_server_or_name_lookup_times_out_in_one_line(http_files, tmp_path, monkeypatch):
    http_files.files["blob"], http_files.delay = b"x", 1.0
    with pytest.raises(MdistillerError, match=r"^downloading blob from \S+ failed \(timed out\)$"):
        download.fetch(http_files.url("blob"), str(tmp_path / "blob"), "blob", timeout=0.2)
    monkeypatch.setattr(socket, "getaddrinfo", lambda *args: time.sleep(2))
    start = time.monotonic()
    with pytest.raises(MdistillerError, match=r"failed \(no answer for example.org within 0.2 s\)$"):
        download.fetch("https://example.org/x", str(tmp_path / "x"), "x", timeout=0.2)
    assert time.monotonic() - start < 1.5


# ---- tools/download_ckpts.py ----

def test_teachers_from_a_local_path_and_a_file_url(teachers_tar, teacher_files, tmp_path, capsys):
    archive = tmp_path / "cifar_teachers.tar"
    archive.write_bytes(teachers_tar)
    dest = tmp_path / "download_ckpts"
    targets = download_ckpts.main(["--url", str(archive), "--dest", str(dest), "--models", "resnet56,wrn_40_2"])
    for model in ("resnet56", "wrn_40_2"):
        assert targets[model] == str(dest / MEMBER.format(model))
        assert Path(targets[model]).read_bytes() == teacher_files[model]
    out = capsys.readouterr().out
    assert "resnet56  cifar_teachers/resnet56_vanilla/ckpt_epoch_240.pth" in out and " MB  installed" in out
    assert archive.read_bytes() == teachers_tar and leftovers(dest) == []  # the user's file stays
    only = tmp_path / "only"
    download_ckpts.main(["--url", archive.as_uri(), "--dest", str(only), "--models", "wrn_40_2"])
    assert [p.name for p in (only / "cifar_teachers").iterdir()] == ["wrn_40_2_vanilla"]


def test_an_interrupted_teacher_download_resumes(http_files, teachers_tar, tmp_path):
    http_files.files["cifar_teachers.tar"] = teachers_tar
    http_files.cut_after = len(teachers_tar) // 3
    args = ["--url", http_files.url("cifar_teachers.tar"), "--dest", str(tmp_path), "--models", "resnet56,wrn_40_2"]
    with pytest.raises(MdistillerError, match="run again to resume"):
        download_ckpts.main(args)
    assert not (tmp_path / "cifar_teachers").exists()
    download_ckpts.main(args)
    assert http_files.requests[1][1] == f"bytes={len(teachers_tar) // 3}-"
    assert (tmp_path / MEMBER.format("wrn_40_2")).is_file()
    assert not (tmp_path / "cifar_teachers.tar").exists() and leftovers(tmp_path) == []
    download_ckpts.main(args)  # everything in place: checked, nothing fetched
    assert len(http_files.requests) == 2


@pytest.mark.parametrize("cut", ["inside a checkpoint", "between two members"])
def test_a_truncated_archive_is_one_line_and_leaves_nothing_half_extracted(teachers_tar, tmp_path, cut):
    with tarfile.open(fileobj=io.BytesIO(teachers_tar)) as tar:
        second = tar.getmembers()[1]
    end = second.offset if cut == "between two members" else second.offset_data + second.size // 2
    archive = tmp_path / "cifar_teachers.tar"
    archive.write_bytes(teachers_tar[:end])
    dest = tmp_path / "ckpts"
    with pytest.raises(MdistillerError) as info:
        download_ckpts.main(["--url", str(archive), "--dest", str(dest), "--models", "resnet56,wrn_40_2"])
    assert "\n" not in str(info.value)
    assert f"teacher archive {archive} is truncated" in str(info.value)
    assert not (dest / "cifar_teachers").exists() and leftovers(dest) == []


def test_a_damaged_download_is_deleted_not_resumed(http_files, teachers_tar, tmp_path):
    http_files.files["cifar_teachers.tar"] = teachers_tar[: len(teachers_tar) // 2]  # whole as far as HTTP knows
    with pytest.raises(MdistillerError, match=r"is truncated .*; deleted the downloaded cifar_teachers.tar, run again"):
        download_ckpts.main(["--url", http_files.url("cifar_teachers.tar"), "--dest", str(tmp_path)])
    assert list(tmp_path.iterdir()) == []


def test_a_checkpoint_of_another_architecture_is_named(teacher_files, tmp_path):
    archive = tmp_path / "cifar_teachers.tar"
    archive.write_bytes(tar_bytes({MEMBER.format("resnet56"): teacher_files["resnet20"],
                                   MEMBER.format("wrn_40_2"): teacher_files["wrn_40_2"]}))
    with pytest.raises(MdistillerError, match=r"teacher checkpoint .*cifar_teachers.tar:cifar_teachers/resnet56_"
                                              r"vanilla/ckpt_epoch_240.pth holds weights of resnet20, not resnet56 .*; "
                                              r"nothing was installed$"):
        download_ckpts.main(["--url", str(archive), "--dest", str(tmp_path / "d"), "--models", "wrn_40_2,resnet56"])
    assert not (tmp_path / "d" / "cifar_teachers").exists() and leftovers(tmp_path / "d") == []


def test_archive_without_a_requested_teacher(teachers_tar, tmp_path):
    archive = tmp_path / "cifar_teachers.tar"
    archive.write_bytes(teachers_tar)
    with pytest.raises(MdistillerError, match=r"has no checkpoint for resnet110, resnet32x4, ResNet50, vgg13 \(e.g. "
                                              r"no cifar_teachers/resnet110_vanilla/ckpt_epoch_240.pth\)"):
        download_ckpts.main(["--url", str(archive), "--dest", str(tmp_path / "d")])  # default: all six


def test_bad_model_names_and_a_missing_local_archive(tmp_path):
    with pytest.raises(MdistillerError, match="unknown model 'resnet9'"):
        download_ckpts.main(["--models", "resnet9", "--dest", str(tmp_path)])
    with pytest.raises(MdistillerError, match="no published CIFAR-100 teacher for resnet8; published: resnet56"):
        download_ckpts.main(["--models", "resnet8", "--dest", str(tmp_path)])
    with pytest.raises(MdistillerError, match="no teacher archive at .*nope.tar"):
        download_ckpts.main(["--url", str(tmp_path / "nope.tar"), "--dest", str(tmp_path)])
    with pytest.raises(MdistillerError, match=r"^downloading cifar_teachers.tar from https://github.com/megvii-research/"
                                              r"mdistiller/releases/download/checkpoints/cifar_teachers.tar failed "
                                              r"\(MDISTILLER_OFFLINE is set"):
        download_ckpts.main(["--dest", str(tmp_path)])


def test_a_wrong_teacher_already_in_place_is_reported(teacher_files, tmp_path):
    target = tmp_path / MEMBER.format("resnet56")
    target.parent.mkdir(parents=True)
    target.write_bytes(teacher_files["resnet20"])
    with pytest.raises(MdistillerError, match="holds weights of resnet20, not resnet56.*; --force replaces it"):
        download_ckpts.main(["--dest", str(tmp_path), "--models", "resnet56"])


def test_training_finds_the_downloaded_teacher_and_names_the_command_when_missing(teachers_tar, teacher_files,
                                                                                   tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = default_cfg()
    cfg.DISTILLER.TEACHER = "resnet56"
    with pytest.raises(MdistillerError, match=r"teacher checkpoint not found: download_ckpts/cifar_teachers/resnet56_"
                                              r"vanilla/ckpt_epoch_240.pth. Fetch the published CIFAR-100 teachers "
                                              r"with: python tools/download_ckpts.py"):
        teacher_checkpoint_path(cfg)
    Path("cifar_teachers.tar").write_bytes(teachers_tar)
    download_ckpts.main(["--url", "cifar_teachers.tar", "--dest", "download_ckpts", "--models", "resnet56"])
    assert os.path.samefile(teacher_checkpoint_path(cfg), tmp_path / "download_ckpts" / MEMBER.format("resnet56"))
    teacher = build_teacher(cfg, 100)
    saved = torch.load(io.BytesIO(teacher_files["resnet56"]), weights_only=False)["model"]
    assert all(torch.equal(v, saved[k]) for k, v in teacher.state_dict().items())


@pytest.mark.slow  # a subprocess: python starts and imports torch
def test_the_tool_and_its_console_script(teachers_tar, tmp_path, monkeypatch, capsys):
    pyproject = (REPO / "pyproject.toml").read_text()
    assert '\nmdistiller-download-ckpts = "mdistiller.cli.download_ckpts:entry_point"\n' in pyproject
    archive = tmp_path / "cifar_teachers.tar"
    archive.write_bytes(teachers_tar)
    result = run_tool("download_ckpts.py", "--url", str(archive), "--dest", str(tmp_path / "d"), "--models",
                      "resnet56", "--keep-archive", cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "resnet56  cifar_teachers/resnet56_vanilla/ckpt_epoch_240.pth" in result.stdout
    assert (tmp_path / "cifar_teachers.tar").is_file()
    monkeypatch.setattr("sys.argv", ["download_ckpts.py", "--url", str(tmp_path / "nope.tar"), "--dest", str(tmp_path)])
    with pytest.raises(SystemExit) as exit_info:
        download_ckpts.entry_point()
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: no teacher archive at ") and err.count("\n") == 1


@pytest.mark.slow  # a (tiny) KD training run
def test_first_run_needs_nothing_prepared(serve_cifar, teachers_tar, tmp_path, monkeypatch):
    """The README's first screen on an empty folder: fetch the teachers, then distil; CIFAR-100 comes on first use.
    (resnet56 -> resnet20 rather than the README's resnet32x4 -> resnet8x4: the same path, 8x less CPU time.)"""
    from mdistiller.cli import train as train_tool

    serve_cifar.files["cifar_teachers.tar"] = teachers_tar
    monkeypatch.chdir(tmp_path)
    (tmp_path / "download_ckpts").mkdir()  # else the default --dest is the checkout's download_ckpts/
    assert os.path.samefile(download_ckpts.default_dest(), tmp_path / "download_ckpts")
    download_ckpts.main(["--url", serve_cifar.url("cifar_teachers.tar"), "--models", "resnet56,wrn_40_2"])
    train_tool.main(["--cfg", str(REPO / "configs/cifar100/kd/resnet56_resnet20.yaml"), "DATASET.ROOT", "data",
                     "DATASET.NUM_WORKERS", "0", "SOLVER.EPOCHS", "1", "SOLVER.BATCH_SIZE", "8"])
    assert [r[0] for r in serve_cifar.requests] == ["/cifar_teachers.tar", "/cifar-100-python.tar.gz"]
    runs = list((tmp_path / "output").glob("*/*/student_latest"))
    assert len(runs) == 1 and (tmp_path / "data" / "cifar-100-python" / "train").is_file()


# ---- no debris from a failed download; the lock file ----

def test_an_offline_run_leaves_no_data_root_and_no_lock(tmp_path, monkeypatch, capsys):
    """The issue's command: tools/train.py offline from an empty folder (DATASET.ROOT ./data)."""
    from mdistiller.cli import run_cli
    from mdistiller.cli import train as train_tool

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: train_tool.main(["--cfg", str(REPO / "configs/cifar100/vanilla/resnet8.yaml"),
                                         "DATASET.NUM_WORKERS", "0"]))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "MDISTILLER_OFFLINE is set" in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_a_failed_teacher_download_leaves_no_lock_and_no_folder(tmp_path):
    dest = tmp_path / "a" / "download_ckpts"
    with pytest.raises(MdistillerError, match="MDISTILLER_OFFLINE is set"):
        download_ckpts.main(["--dest", str(dest)])
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "kept").mkdir()
    with pytest.raises(MdistillerError, match="MDISTILLER_OFFLINE is set"):
        download_ckpts.main(["--dest", str(tmp_path / "kept")])
    assert (tmp_path / "kept").is_dir() and list((tmp_path / "kept").iterdir()) == []  # it was there: kept


def test_the_lock_file_names_its_holder_and_goes_on_error_and_ctrl_c(tmp_path):
    lock = tmp_path / "d" / ".x.lock"
    with download.file_lock(str(lock)):
        assert lock.read_text() == f"{os.getpid()}@{socket.gethostname()}"
    assert not (tmp_path / "d").exists()
    for exc in (MdistillerError("boom"), KeyboardInterrupt()):
        with pytest.raises(type(exc)):
            with download.file_lock(str(lock)):
                raise exc
        assert not lock.exists() and not (tmp_path / "d").exists()


def _hold_lock(path: str) -> None:
    with download.file_lock(path):
        Path(path + ".held").write_text("")
        time.sleep(60)


@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT"])
def test_a_signal_to_the_holder_removes_the_lock(tmp_path, how):
    import signal

    lock = str(tmp_path / "d" / ".x.lock")
    os.makedirs(tmp_path / "d")
    child = multiprocessing.get_context("spawn").Process(target=_hold_lock, args=(lock,))
    child.start()
    deadline = time.monotonic() + 60
    while not os.path.exists(lock + ".held") and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(child.pid, getattr(signal, how))
    child.join(30)
    assert child.exitcode in ((143,) if how == "SIGTERM" else (1, 130, -signal.SIGINT))
    assert not os.path.exists(lock)


def test_a_stale_lock_of_a_killed_process_is_taken_over_with_a_note(tmp_path, capsys):
    lock = tmp_path / ".x.lock"
    child = multiprocessing.get_context("spawn").Process(target=time.sleep, args=(0,))
    child.start()
    child.join()
    lock.write_text(f"{child.pid}@{socket.gethostname()}")  # what a SIGKILLed holder leaves
    start = time.monotonic()
    with download.file_lock(str(lock), waiting="waiting"):
        pass
    assert time.monotonic() - start < 5 and not lock.exists()
    err = capsys.readouterr().err
    assert f"taking over the lock {lock} left by process {child.pid}" in err and "no longer running" in err
    assert "waiting" not in err


def test_a_live_holder_is_waited_for_a_bounded_time(tmp_path):
    lock = str(tmp_path / ".x.lock")
    with download.file_lock(lock):
        with pytest.raises(MdistillerError, match=rf"gave up waiting for the lock .*x.lock after 0.3 s: process "
                                                  rf"{os.getpid()} on .* holds it; if nothing is running"):
            with download.file_lock(lock, timeout=0.3):
                pass
