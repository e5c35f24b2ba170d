"""Shared fixtures: small data in the real CIFAR formats, teacher checkpoints in the published format, CLI runner."""

from __future__ import annotations

import http.server
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from cifar_files import write_cifar100  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# The project workspace keeps real CIFAR-10 photographs beside the checkout; a user's clone has none.
SHARED_DATA = Path(os.environ.get("MDISTILLER_SHARED_DATA", REPO.parent / "shared" / "data"))

# The suite runs on 2 cores in two pytest-xdist workers (pyproject's addopts): one intra-op thread per worker (and per
# subprocess a test starts), or the workers' threads would fight over the cores.
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
THREADS = max(1, 2 // WORKERS)
torch.set_num_threads(THREADS)

# No test may reach the network (CI has none, and a blackholed route would hang): DATASET.DOWNLOAD is on by default,
# so a test pointing DATASET.ROOT at a folder without CIFAR would otherwise try to download it. MDISTILLER_OFFLINE
# makes mdistiller.download refuse at once, in this process and in every tool a test starts (they inherit the
# environment); the download tests remove it and serve their files from 127.0.0.1 (the http_files fixture).
os.environ["MDISTILLER_OFFLINE"] = "1"


@pytest.fixture(scope="session")
def cifar100_root(tmp_path_factory) -> str:
    """A DATASET.ROOT holding `cifar-100-python` with 256 train / 128 test learnable images of 10 classes."""
    root = tmp_path_factory.mktemp("data")
    write_cifar100(str(root), n_train=256, n_test=128, classes_used=10)
    return str(root)


@pytest.fixture(scope="session")
def cifar100_tiny_root(tmp_path_factory) -> str:
    """Like cifar100_root with 64 train / 32 test images: for tests that train several short runs (resume, faults)."""
    root = tmp_path_factory.mktemp("tiny_data")
    write_cifar100(str(root), n_train=64, n_test=32, classes_used=10)
    return str(root)


def save_teacher(path: str, arch: str, num_classes: int = 100, seed: int = 0) -> str:
    """A randomly initialised zoo model saved in the published format `{"model": state_dict}`."""
    from mdistiller.models import cifar_model_dict

    torch.manual_seed(seed)
    model = cifar_model_dict[arch][0](num_classes=num_classes)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    torch.save({"model": model.state_dict()}, path)
    return path


@pytest.fixture(scope="session")
def teacher_ckpt(tmp_path_factory):
    """Factory: `teacher_ckpt(arch)` -> path of a published-format checkpoint of that architecture (cached)."""
    folder = tmp_path_factory.mktemp("teachers")
    cache: dict[str, str] = {}

    def make(arch: str, num_classes: int = 100) -> str:
        key = f"{arch}_{num_classes}"
        if key not in cache:
            cache[key] = save_teacher(str(folder / f"{key}.pth"), arch, num_classes)
        return cache[key]

    return make


def run_tool(script: str, *args: str, cwd: str | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run `python tools/<script> args...` in a subprocess (as a user would) and return the finished process."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=str(THREADS))
    return subprocess.run(
        [sys.executable, str(REPO / "tools" / script), *args],
        cwd=cwd or str(REPO), env=env, capture_output=True, text=True, timeout=timeout,
    )


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (torchrun's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


GLOO_OK = torch.distributed.is_available() and torch.distributed.is_gloo_available()
needs_gloo = pytest.mark.skipif(not GLOO_OK, reason="torch.distributed with the gloo backend is not available")


def run_torchrun(script: str, *args: str, nproc: int = 2, timeout: int = 120) -> subprocess.CompletedProcess:
    """`python -m torch.distributed.run --nproc_per_node nproc script args` on the CPU (gloo), one thread a rank."""
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{REPO / 'tests'}", OMP_NUM_THREADS="1",
               CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()), script, *args]
    return subprocess.run(command, cwd=str(REPO), env=env, capture_output=True, text=True, timeout=timeout)


def run_overrides(tmp: Path, data_root: str) -> list[str]:
    """KEY VALUE overrides that keep a CLI run's files inside tmp and its data small and single-process."""
    return [
        "DATASET.ROOT", data_root, "DATASET.NUM_WORKERS", "0", "LOG.PREFIX", str(tmp / "output"),
        "LOG.RESULTS_DIR", str(tmp / "logs"), "SOLVER.EPOCHS", "1",
    ]


@pytest.fixture
def one_thread():
    """Tiny tensors: a second intra-op thread only adds synchronisation, badly so on a loaded 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class _FileHandler(http.server.BaseHTTPRequestHandler):
    """GET of the server's in-memory files, with `Range: bytes=N-` answered 206 (or ignored, if asked)."""

    def do_GET(self):  # noqa: N802 (http.server's naming)
        server = self.server
        server.requests.append((self.path, self.headers.get("Range")))
        time.sleep(server.delay)
        data = server.files.get(self.path.lstrip("/"))
        if data is None:
            self.send_error(404)
            return
        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if match and not server.ignore_range:
            start = int(match.group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if server.cut_after is not None:  # a dropped connection: part of the body, then close
            body, server.cut_after = body[:server.cut_after], None
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def http_files():
    """A file server on 127.0.0.1 in a thread: set `.files[name] = bytes`, fetch `.url(name)`; `.requests` records
    (path, Range header); `.cut_after = n` drops the next response after n bytes; `.delay` waits before answering;
    `.ignore_range` answers every request with the whole file. MDISTILLER_OFFLINE is lifted for the test."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FileHandler)
    server.daemon_threads = True
    server.files, server.requests = {}, []
    server.cut_after, server.delay, server.ignore_range = None, 0.0, False
    server.url = lambda name: f"http://127.0.0.1:{server.server_address[1]}/{name}"
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    offline = os.environ.pop("MDISTILLER_OFFLINE", None)
    try:
        yield server
    finally:
        if offline is not None:
            os.environ["MDISTILLER_OFFLINE"] = offline
        server.shutdown()
        server.server_close()


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` need a CUDA device: without one they are skipped, saying so."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run `pytest -m cuda` on a GPU machine)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def coco(tmp_path_factory) -> dict[str, str]:
    """A COCO root in detectron2's layout (train: 10 images, 8 trainable; val: 6), model-zoo style R101 / R50
    teacher files and bundled R18 / R50 student backbones (tests/detection_runs.py, the detection run tests)."""
    from coco_files import write_coco_split
    from detectron2_files import write_bundled_student, write_teacher_pkl

    root = tmp_path_factory.mktemp("coco")
    write_coco_split(str(root), "train", n_images=10, seed=0)
    write_coco_split(str(root), "val", n_images=6, seed=1)
    weights = tmp_path_factory.mktemp("weights")
    return {"root": str(root), "R101-FPN": write_teacher_pkl(weights / "r101.pkl", "R101", seed=1),
            "R50-FPN": write_teacher_pkl(weights / "r50.pkl", "R50", seed=2),
            "student R18-FPN": write_bundled_student(weights / "r18-r101.pth", "R18", seed=3),
            "student R50-FPN": write_bundled_student(weights / "r50-r101.pth", "R50", seed=4)}


@pytest.fixture
def drop_run_files(tmp_path):
    """The test's run folders go when it ends (a detector checkpoint is ~230 MB; `coco` stays for the module)."""
    yield
    shutil.rmtree(tmp_path, ignore_errors=True)
