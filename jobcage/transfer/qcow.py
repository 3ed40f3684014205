"""Copy-on-write qcow2 instances of a base image on shared storage, made with qemu-img.

Invariants, each one a refusal with a :class:`TransferError` that says what to fix:

* The base is named by an absolute path without ``..``; its format comes from
  ``qemu-img info --output=json`` on the base, and is passed to ``qemu-img create`` as
  ``-F`` so it is recorded in the instance and never probed again.
* Every image of the base's backing chain is a plain local file we can read, and each
  overlay in the chain records its backing file's format: an overlay without one would
  make qemu probe (guess) the format of its backing file, the confusion that lets a raw
  image pass for a qcow2 header. The chain is walked by hand, one ``qemu-img info``
  per image with the recorded format, never with ``--backing-chain`` (which probes).
* The instance lands in the scratch directory and nowhere else: the destination's
  directory is resolved, checked to be the scratch directory or under it, and pinned
  with an O_DIRECTORY descriptor; qemu-img writes through ``/proc/self/fd/N`` of that
  descriptor, so a directory swapped for a symlink after the check changes nothing.
* Nothing half-made: qemu-img writes a temporary name in the destination directory,
  which is checked, fsynced and renamed over the destination in one step, or removed.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import shutil
import stat
import subprocess
from dataclasses import dataclass

from ..errors import TransferError

QEMU_IMG_TIMEOUT_SECONDS = 120.0
MAX_BACKING_CHAIN = 16  # deeper chains are not what a site keeps; also stops loops
TEMP_PREFIX = ".jobcage-cow-"


@dataclass(frozen=True)
class ImageInfo:
    path: str
    format: str
    virtual_size_bytes: int
    backing_path: str | None
    backing_format: str | None


@dataclass(frozen=True)
class Instance:
    path: str
    base_path: str
    base_format: str
    size_bytes: int  # what landed on local disk: the overlay's metadata, not the base


def check_absolute(path: str, what: str) -> str:
    """``path`` normalised, refused when relative or holding a ``..`` component."""
    if not path:
        raise TransferError(f"{what} is empty: give an absolute path")
    if "\0" in path:
        raise TransferError(f"{what} {path!r} holds a NUL byte")
    if not path.startswith("/"):
        raise TransferError(f"{what} {path!r} is relative: give an absolute path")
    if ".." in path.split("/"):
        raise TransferError(f"{what} {path!r} holds '..': give the path without it")
    return os.path.normpath(path)


def image_info(path: str, fmt: str | None = None, pass_fds: tuple[int, ...] = ()) -> ImageInfo:
    """``qemu-img info`` of one image (no backing chain: nothing else is opened)."""
    argv = [_qemu_img(), "info", "--output=json"]
    if fmt is not None:
        argv += ["-f", fmt]
    out = _run([*argv, path], f"read the image header of {path}", pass_fds)
    try:
        info = json.loads(out)
        image_format = info["format"]
        size = int(info["virtual-size"])
    except (ValueError, KeyError, TypeError) as e:
        raise TransferError(f"qemu-img info gave an unexpected answer for {path}: {e}") from None
    data = (info.get("format-specific") or {}).get("data") or {}
    if data.get("data-file"):
        raise TransferError(
            f"image {path} keeps its data in an external file {data['data-file']!r}: "
            "use an image without a data-file"
        )
    backing = info.get("backing-filename")
    backing_path = None
    if backing:
        full = info.get("full-backing-filename") or backing
        if not full.startswith("/"):
            full = os.path.join(os.path.dirname(path), full)
        backing_path = full
    return ImageInfo(path, image_format, size, backing_path, info.get("backing-filename-format"))


def check_chain(base: str) -> ImageInfo:
    """The base's own info, after every image of its backing chain proved readable."""
    first = image_info(_readable_file(base, "base image"))
    current = first
    seen = {os.path.realpath(base)}
    for _ in range(MAX_BACKING_CHAIN):
        if current.backing_path is None:
            return first
        backing = current.backing_path
        if not backing.startswith("/") or ".." in backing.split("/"):
            raise TransferError(
                f"base image {base} is an overlay of {backing!r} (in {current.path}), "
                "not an absolute local path: rebase it onto a plain file"
            )
        if current.backing_format is None:
            raise TransferError(
                f"base image {base} is an overlay of {backing} (in {current.path}) "
                "without a recorded backing format, so qemu would guess it: record it "
                f"with `qemu-img rebase -u -b {backing} -F <format> {current.path}`"
            )
        real = os.path.realpath(backing)
        if real in seen:
            raise TransferError(f"base image {base} has a backing chain loop at {backing}")
        seen.add(real)
        _readable_file(backing, f"base image {base} is an overlay of {backing}, which")
        current = image_info(backing, current.backing_format)
    raise TransferError(
        f"base image {base} has a backing chain deeper than {MAX_BACKING_CHAIN}: "
        "flatten it with `qemu-img convert`"
    )


def create_instance(base: str, dest: str, scratch: str) -> Instance:
    """A qcow2 overlay of ``base`` at ``dest``, which must lie in ``scratch``."""
    base = check_absolute(base, "base image")
    dest = check_absolute(dest, "destination")
    name = os.path.basename(dest)
    if not name or name in {".", ".."}:
        raise TransferError(f"destination {dest!r} names no file")
    try:
        info = check_chain(base)
    except TransferError as e:
        e.kind = "Specification"  # the base the job named is missing or unusable
        raise
    real_base = os.path.realpath(base)
    dir_fd = _open_dest_dir(os.path.dirname(dest), scratch)
    try:
        return _create_in(dir_fd, name, dest, real_base, info)
    finally:
        os.close(dir_fd)


def _create_in(dir_fd: int, name: str, dest: str, base: str, info: ImageInfo) -> Instance:
    try:
        existing = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        existing = None
    if existing is not None and stat.S_ISDIR(existing.st_mode):
        raise TransferError(f"destination {dest} is a directory: name a file")
    temp = f"{TEMP_PREFIX}{secrets.token_hex(8)}-{name}"[:255]
    temp_path = f"/proc/self/fd/{dir_fd}/{temp}"
    argv = [_qemu_img(), "create", "-q", "-f", "qcow2", "-b", base, "-F", info.format]
    argv += [temp_path, str(info.virtual_size_bytes)]
    try:
        _run(argv, f"create the instance {dest}", pass_fds=(dir_fd,))
        made = image_info(temp_path, "qcow2", (dir_fd,))
        if made.backing_path != base or made.backing_format != info.format:
            raise TransferError(
                f"qemu-img made {dest} backed by {made.backing_path} ({made.backing_format}), "
                f"not {base} ({info.format}): check the qemu-img installation"
            )
        fd = os.open(temp, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=dir_fd)
        try:
            os.fsync(fd)
            size = os.fstat(fd).st_size
        finally:
            os.close(fd)
        os.rename(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp, dir_fd=dir_fd)
        raise
    os.fsync(dir_fd)
    return Instance(dest, base, info.format, size)


def _open_dest_dir(directory: str, scratch: str) -> int:
    scratch_real = os.path.realpath(scratch)
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as e:
        raise TransferError(
            f"destination directory {directory} cannot be opened: {e.strerror}"
        ) from None
    real = os.readlink(f"/proc/self/fd/{fd}")  # what the descriptor really is, now
    if real != scratch_real and not real.startswith(scratch_real.rstrip("/") + "/"):
        os.close(fd)
        raise TransferError(
            f"destination directory {directory} (really {real}) is outside the job's "
            f"scratch directory {scratch_real}: name a file inside it"
        )
    return fd


def _readable_file(path: str, what: str) -> str:
    try:
        st = os.stat(path)
    except OSError as e:
        raise TransferError(f"{what} cannot be read: {path}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise TransferError(f"{what} is not a regular file: {path}")
    if not os.access(path, os.R_OK):
        raise TransferError(f"{what} is not readable by uid {os.geteuid()}: {path}")
    return path


def _qemu_img() -> str:
    found = shutil.which("qemu-img")
    if found is None:
        raise TransferError("qemu-img is not installed: install Debian's qemu-utils")
    return found


def _run(argv: list[str], doing: str, pass_fds: tuple[int, ...] = ()) -> str:
    try:
        done = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=QEMU_IMG_TIMEOUT_SECONDS,
            pass_fds=pass_fds,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise TransferError(
            f"qemu-img did not {doing} within {QEMU_IMG_TIMEOUT_SECONDS:.0f} s: "
            "check the shared storage"
        ) from None
    if done.returncode != 0:
        detail = " ".join(done.stderr.split()) or f"exit status {done.returncode}"
        if os.strerror(errno.ENOSPC) in detail:
            raise TransferError(f"qemu-img could not {doing}: {detail}", "Transfer", True)
        raise TransferError(f"qemu-img could not {doing}: {detail}")
    return done.stdout
