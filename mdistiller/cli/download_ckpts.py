"""Fetch the published CIFAR-100 teachers (upstream's cifar_teachers.tar) into download_ckpts/ and verify them.

    python tools/download_ckpts.py                                # all six published teachers
    python tools/download_ckpts.py --models resnet32x4,wrn_40_2   # only these
    python tools/download_ckpts.py --url ~/Downloads/cifar_teachers.tar   # a copy you have (a path or file:// URL)

The archive is downloaded into the destination folder (resumed if a previous run was interrupted), its
`<model>_vanilla/ckpt_epoch_240.pth` files are extracted into a temporary folder there, each is loaded into the zoo
model it is named after, and only then are they moved to `cifar_teachers/<model>_vanilla/ckpt_epoch_240.pth`, the
zoo's layout. Teachers already in place are kept (and checked) unless --force.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile

from .. import download
from ..engine.build import build_model, model_builder, teacher_home
from ..engine.checkpoint import load_model_weights
from ..errors import MdistillerError
from ..files import PROJECT_ROOT, resolve_project_path
from ..models import cifar_model_dict
from . import run_cli

# The release asset upstream's README links (megvii-research/mdistiller, release "checkpoints"): a plain tar of
# cifar_teachers/<model>_vanilla/ckpt_epoch_240.pth for the six teachers, RepDistiller's checkpoints (weights and SGD
# momentum): about 364 MB.
TEACHERS_URL = "https://github.com/megvii-research/mdistiller/releases/download/checkpoints/cifar_teachers.tar"
TEACHERS_ARCHIVE_MB = 364
ARCHIVE_NAME = "cifar_teachers.tar"
CKPT_DIR = "download_ckpts"  # the zoo's paths start with it
NUM_CLASSES = 100  # the published teachers are CIFAR-100 models


def published_teachers() -> dict[str, str]:
    """Zoo name -> its teacher file relative to download_ckpts/, for the CIFAR models with a published checkpoint."""
    return {name: os.path.relpath(teacher_home(name), CKPT_DIR)
            for name, (_, path) in cifar_model_dict.items() if path is not None}


def default_dest() -> str:
    """Where the zoo looks first: ./download_ckpts if there is one, else the checkout's, else ./download_ckpts."""
    return resolve_project_path(CKPT_DIR)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser("download_ckpts.py", description="fetch and verify the published CIFAR-100 "
                                     "teacher checkpoints (cifar_teachers.tar)")
    parser.add_argument("--url", default=TEACHERS_URL,
                        help=f"the archive: a URL, a file:// URL or a local path (default: {TEACHERS_URL}, "
                             f"about {TEACHERS_ARCHIVE_MB} MB)")
    parser.add_argument("--models", default="",
                        help=f"comma-separated zoo names to keep (default: all of {', '.join(published_teachers())})")
    parser.add_argument("--dest", default=None,
                        help="the download_ckpts folder to fill (default: ./download_ckpts if it exists, else the "
                             "checkout's download_ckpts/, else ./download_ckpts: where training looks)")
    parser.add_argument("--force", action="store_true", help="replace teachers already in place")
    parser.add_argument("--keep-archive", action="store_true",
                        help="keep the downloaded archive in the destination (a later run then needs no download)")
    return parser.parse_args(argv)


def requested_models(text: str) -> list[str]:
    """The --models list, checked against the zoo (all published teachers when empty)."""
    published = published_teachers()
    names = list(dict.fromkeys(n.strip() for n in text.split(",") if n.strip())) or list(published)
    for name in names:
        model_builder(name)  # an unknown name: the zoo's error, with a did-you-mean
        if name not in published:
            raise MdistillerError(f"no published CIFAR-100 teacher for {name}; published: {', '.join(published)}")
    return names


def verify(name: str, path: str, shown_as: str | None = None) -> None:
    """Load a teacher file into the zoo model it is named after (the checkpoint-mismatch error otherwise)."""
    try:
        load_model_weights(build_model(name, NUM_CLASSES, "cifar100"), path, name, NUM_CLASSES, "teacher checkpoint")
    except MdistillerError as exc:
        if shown_as is None:
            raise
        raise MdistillerError(f"{str(exc).replace(path, shown_as)}; nothing was installed") from None


def _member_for(names: list[str], relative: str) -> str | None:
    """The archive member holding `relative` (its `<model>_vanilla/ckpt_epoch_240.pth` tail, under any prefix)."""
    tail = "/".join(relative.split(os.sep)[-2:])
    matches = [n for n in names if n == tail or n.endswith("/" + tail)]
    return min(matches, key=len) if matches else None


def obtain_archive(url: str, dest: str) -> tuple[str, bool]:
    """(path of the archive, whether it is ours to delete): a local file as is, else a download into dest."""
    local = download.local_path(url)
    if local is not None:
        local = os.path.expanduser(local)
        if not os.path.isfile(local):
            raise MdistillerError(f"no teacher archive at {local}; give --url a {ARCHIVE_NAME} file or URL")
        return local, False
    archive = os.path.join(dest, ARCHIVE_NAME)
    if not os.path.isfile(archive):  # one kept by --keep-archive (or left by a crash after the download) is reused
        try:
            download.fetch(url, archive, ARCHIVE_NAME)
        except MdistillerError as exc:
            raise MdistillerError(f"{exc}. Or fetch {ARCHIVE_NAME} yourself and pass --url <its path>") from None
    return archive, True


def install(archive: str, names: list[str], targets: dict[str, str], dest: str) -> None:
    """Extract `names` from the archive into a temporary folder in dest, verify each, then move them to targets."""
    what = "teacher archive"
    members = [m.name for m in download.check_tar_complete(archive, what) if m.isfile()]
    chosen = {name: _member_for(members, targets[name]) for name in names}
    absent = [name for name, member in chosen.items() if member is None]
    if absent:
        example = os.path.relpath(targets[absent[0]], dest)
        raise MdistillerError(f"{what} {archive} has no checkpoint for {', '.join(absent)} (e.g. no {example}); it "
                              f"holds {len(members)} files, e.g. {', '.join(members[:3]) or 'none'}; choose with "
                              f"--models")
    staging = tempfile.mkdtemp(prefix=".cifar_teachers.", suffix=".extracting", dir=dest)
    try:
        download.extract_tar(archive, staging, what, names=chosen.values())
        staged = {name: os.path.join(staging, *member.split("/")) for name, member in chosen.items()}
        for name in names:
            verify(name, staged[name], shown_as=f"{archive}:{chosen[name]}")
        for name in names:
            os.makedirs(os.path.dirname(targets[name]), exist_ok=True)
            os.replace(staged[name], targets[name])
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def main(argv: list[str] | None = None) -> dict[str, str]:
    """Fetch, extract and verify the requested teachers; returns model -> installed file."""
    args = parse_args(argv)
    names = requested_models(args.models)
    dest = os.path.abspath(os.path.expanduser(args.dest or default_dest()))
    published = published_teachers()
    targets = {name: os.path.join(dest, published[name]) for name in names}
    status = {}
    try:
        with download.file_lock(os.path.join(dest, ".cifar_teachers.lock"),
                                waiting=f"waiting for another process filling {dest}"):
            missing = [n for n in names if args.force or not os.path.isfile(targets[n])]
            if missing:
                archive, owned = obtain_archive(args.url, dest)
                try:
                    install(archive, missing, targets, dest)
                except MdistillerError as exc:
                    if not owned:
                        raise
                    os.remove(archive)  # a damaged download must not be reused by the next run
                    raise MdistillerError(f"{exc}; deleted the downloaded {ARCHIVE_NAME}, run again to download it "
                                          f"afresh") from None
                if owned and not args.keep_archive:
                    os.remove(archive)
            for name in names:
                if name not in missing:
                    try:
                        verify(name, targets[name])
                    except MdistillerError as exc:
                        raise MdistillerError(f"{exc}; --force replaces it with the published one") from None
                status[name] = "installed" if name in missing else "already in place"
    except OSError as exc:  # a read-only or full destination
        raise MdistillerError(f"could not write the teachers into {dest}: {exc.strerror or exc}") from None
    print(f"CIFAR-100 teachers in {dest} (each loads into its zoo model):")
    width = max(len(n) for n in names)
    for name in names:
        size = os.path.getsize(targets[name])
        print(f"  {name:<{width}}  {published[name]}  {download.megabytes(size):>9}  {status[name]}")
    elsewhere = [n for n in names
                 if not os.path.isfile(resolve_project_path(teacher_home(n)))
                 or not os.path.samefile(resolve_project_path(teacher_home(n)), targets[n])]
    if elsewhere:
        print(f"note: training looks for teachers in ./{CKPT_DIR} and {PROJECT_ROOT / CKPT_DIR}; from here pass "
              f"DISTILLER.TEACHER_CKPT <file> (or run from {os.path.dirname(dest)})")
    elif "resnet32x4" in names:
        print("next: python tools/train.py --cfg configs/cifar100/kd/resnet32x4_resnet8x4.yaml")
    return targets


def entry_point() -> None:
    """The console script: main() with one-line errors."""
    run_cli(main)


if __name__ == "__main__":
    entry_point()
