"""Shared fixtures: small data in the real CIFAR formats, teacher checkpoints in the published format, CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from cifar_files import write_cifar100  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# The project workspace keeps real CIFAR-10 photographs beside the checkout; a user's clone has none.
SHARED_DATA = Path(os.environ.get("MDISTILLER_SHARED_DATA", REPO.parent / "shared" / "data"))

torch.set_num_threads(2)


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
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="2")
    return subprocess.run(
        [sys.executable, str(REPO / "tools" / script), *args],
        cwd=cwd or str(REPO), env=env, capture_output=True, text=True, timeout=timeout,
    )


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


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` need a CUDA device: without one they are skipped, saying so."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run `pytest -m cuda` on a GPU machine)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
