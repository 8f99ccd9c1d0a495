"""Checkpoint files: refuse a damaged one by name, write one atomically, find the one to resume from.

torch's zip checkpoints store a CRC-32 per record, but ``torch.load`` does not check them: a
flipped byte inside a tensor loads silently as a wrong number. :func:`verify_checkpoint`
checks every record (``zipfile.ZipFile.testzip``) and raises :class:`CheckpointError` naming
the file and the bad record. :func:`atomic_write` replaces a file so that a kill at any moment
leaves the old one whole, and :func:`newest_intact_checkpoint` picks the checkpoint a run
resumes from, passing over damaged ones.

Plain PyTorch: nothing here imports Lightning (the hook that runs the check before Lightning
loads a file is ``lightning_optim.integration.checkpoint_guard``).
"""

from __future__ import annotations

import os
import pickle
import signal
import struct
import tempfile
import warnings
import zipfile
from pathlib import Path

import torch

from .validation import LightningOptimWarning

__all__ = ["CheckpointError", "verify_checkpoint", "atomic_write", "newest_intact_checkpoint"]

# torch.save's legacy (pre-1.6, ``_use_new_zipfile_serialization=False``) format opens with
# the pickled magic number 0x1950a86a20f9469cfc6c (pickle protocol 2, LONG1 of 10 bytes).
_LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"
_ZIP_MAGIC = b"PK\x03\x04"
_warned_legacy: set[str] = set()


class CheckpointError(ValueError):
    """A checkpoint file that cannot be resumed from: truncated, corrupted, or not a checkpoint.

    A ``ValueError`` (the input is bad, as everywhere in lightning_optim). The message names
    the file and says what is wrong with it, e.g. ``checkpoint '/runs/last.ckpt' is truncated
    or corrupted (record 'last/data/3' fails its CRC-32 check): it cannot be resumed from;
    use an earlier checkpoint``.
    """


# ----- verification ---------------------------------------------------------------------------


def verify_checkpoint(path: str | os.PathLike) -> None:
    """Check that the torch checkpoint at ``path`` is whole; raise :class:`CheckpointError` if not.

    - zip format (torch's default since 1.6, and Lightning's ``.ckpt``): every record is read
      and checked against the CRC-32 the zip stores for it, so truncation (the zip's central
      directory is at the end of the file) and any changed byte are both caught. It reads the
      whole file once, at disk or page-cache speed (CRC-32 runs at GB/s).
    - torch's legacy format (``_use_new_zipfile_serialization=False``) stores no checksums:
      it is loaded once (``torch.load(..., weights_only=True, map_location="cpu")``) so that
      truncation shows, and a one-time :class:`LightningOptimWarning` says that a changed
      byte inside a tensor cannot be detected. (A file holding objects that a
      ``weights_only`` load refuses is not unpickled here; it passes.) Re-save such files
      with ``torch.save``.
    - an empty file, or anything else (text, another archive), is refused.

    Raises:
        FileNotFoundError: nothing at ``path``.
        CheckpointError: the file is truncated, corrupted, or not a torch checkpoint.
    """
    _verify(path, load_legacy=True)


def _verify(path: str | os.PathLike, load_legacy: bool) -> str:
    """:func:`verify_checkpoint`; returns the format, ``"zip"`` or ``"legacy"``.

    ``load_legacy=False`` leaves the load of a legacy file to the caller, who loads it anyway
    (see :func:`guard_checkpoint_loading`): loading it here too would read it twice.
    """
    name = os.fspath(path)
    if os.path.isdir(name):
        raise CheckpointError(
            f"checkpoint {name!r} is a directory (a sharded checkpoint?): verify_checkpoint checks "
            "single-file torch checkpoints"
        )
    if not os.path.exists(name):
        raise FileNotFoundError(f"checkpoint {name!r} does not exist")
    size = os.path.getsize(name)
    if size == 0:
        raise CheckpointError(f"checkpoint {name!r} is empty (0 bytes): it cannot be resumed from; "
                              "use an earlier checkpoint")
    with open(name, "rb") as f:
        head = f.read(len(_LEGACY_MAGIC))
    if head.startswith(_ZIP_MAGIC):
        _verify_zip(name, size)
        return "zip"
    if head == _LEGACY_MAGIC:
        _warn_legacy(name)
        if load_legacy:
            try:
                torch.load(name, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError as err:
                if "Weights only load failed" not in str(err):
                    raise _legacy_error(name, err) from err
                # It holds objects a safe load refuses: reading it would mean running its pickle.
                # It is not damaged as far as we know; Lightning's own load will tell.
            except Exception as err:  # torch raises RuntimeError or EOFError on a short file
                raise _legacy_error(name, err) from err
        return "legacy"
    raise CheckpointError(
        f"checkpoint {name!r} is not a torch checkpoint: it starts with {head[:8]!r}, neither a zip "
        f"archive ({_ZIP_MAGIC!r}) nor torch's legacy format: it cannot be resumed from"
    )


def _verify_zip(name: str, size: int) -> None:
    try:
        with zipfile.ZipFile(name) as archive:
            records = archive.namelist()
            bad = archive.testzip()
    except (zipfile.BadZipFile, EOFError, struct.error, OSError, ValueError) as err:
        # The central directory sits at the end of the file: a truncated file loses it first.
        raise CheckpointError(
            f"checkpoint {name!r} is truncated or corrupted ({size} bytes, its zip directory cannot be "
            f"read: {err}): it cannot be resumed from; use an earlier checkpoint"
        ) from err
    if bad is not None:
        raise CheckpointError(
            f"checkpoint {name!r} is truncated or corrupted (record {bad!r} fails its CRC-32 check): "
            "it cannot be resumed from; use an earlier checkpoint"
        )
    if not any(r == "data.pkl" or r.endswith("/data.pkl") for r in records):
        raise CheckpointError(
            f"checkpoint {name!r} is a zip archive but not a torch checkpoint (no 'data.pkl' record among "
            f"{records[:5]!r}): it cannot be resumed from"
        )


def _warn_legacy(name: str) -> None:
    if name not in _warned_legacy:
        _warned_legacy.add(name)
        warnings.warn(
            f"checkpoint {name!r} is in torch's legacy (non-zip) format, which stores no checksums: "
            "truncation is detected, a changed byte inside a tensor is not. Re-save it with torch.save "
            "(the zip format) to have it fully verified.",
            LightningOptimWarning, stacklevel=4,
        )


def _legacy_error(name: str, err: BaseException) -> CheckpointError:
    return CheckpointError(
        f"checkpoint {name!r} cannot be read ({type(err).__name__}: {err}); it is in torch's legacy format, "
        "which has no checksums, so it is most likely truncated or corrupted: it cannot be resumed from; "
        "use an earlier checkpoint"
    )


# ----- atomic writes and finding the checkpoint to resume from ------------------------------

# Test hook: an atomic_write to a file of this name writes half its bytes to the temporary
# file, flushes them and SIGKILLs the process (tests/test_kill_resume.py: a kill while a
# checkpoint is being written). Unset, nothing changes.
KILL_IN_WRITE_ENV = "LIGHTNING_OPTIM_TEST_KILL_IN_WRITE"


def _file_mode(path: Path) -> int:
    """The mode ``open(path, "w")`` would give: the old file's, else 0o666 less the umask
    (``mkstemp`` creates 0o600)."""
    try:
        return os.stat(path).st_mode & 0o7777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def atomic_write(data: bytes, path: str | os.PathLike) -> None:
    """Write ``data`` to ``path`` so that ``path`` holds either its old content or all of ``data``.

    The bytes go to a temporary file in the same directory (``.<name>.<random>.tmp``: a rename
    is atomic only within one file system), are ``fsync``-ed, and ``os.replace`` puts the file
    in place; the directory is ``fsync``-ed after the rename so that the new entry survives a
    power loss (POSIX; a no-op where directories cannot be opened). A process killed at any
    moment leaves the old file whole, and at worst a temporary file, which nothing reads.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            if os.environ.get(KILL_IN_WRITE_ENV) == path.name:
                f.write(data[: len(data) // 2])
                f.flush()
                os.fsync(f.fileno())
                os.kill(os.getpid(), signal.SIGKILL)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _file_mode(path))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory handles
        return
    try:
        os.fsync(dir_fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(dir_fd)


def checkpoint_step(path: str | os.PathLike) -> int:
    """``global_step`` of a Lightning checkpoint (its optimizer steps), read without copying its tensors."""
    checkpoint = torch.load(os.fspath(path), map_location="cpu", weights_only=False, mmap=True)
    return int(checkpoint.get("global_step", 0))


def newest_intact_checkpoint(directory: str | os.PathLike) -> tuple[Path, int, list[str]] | None:
    """The checkpoint to resume a run from: the ``*.ckpt`` of ``directory`` with the most
    optimizer steps that passes :func:`verify_checkpoint` (at equal steps ``last.ckpt``,
    which later saves replace in place). Returns ``(path, global_step, skipped)``, where
    ``skipped`` holds one message per damaged file passed over (newer or not), or None when
    the directory holds no ``.ckpt`` file; raises :class:`CheckpointError` when none is intact.
    """
    directory = Path(directory)
    files = sorted(p for p in directory.glob("*.ckpt") if p.is_file()) if directory.is_dir() else []
    if not files:
        return None
    intact, skipped = [], []
    for path in files:
        try:
            verify_checkpoint(path)
            step = checkpoint_step(path)
        except (CheckpointError, RuntimeError, EOFError, pickle.UnpicklingError) as err:
            skipped.append(str(err) if isinstance(err, CheckpointError) else f"checkpoint {str(path)!r}: {err}")
            continue
        intact.append((step, path.name == "last.ckpt", path))
    if not intact:
        raise CheckpointError(f"no intact checkpoint in {str(directory)!r}: " + "; ".join(skipped))
    step, _, path = max(intact)
    return path, step, skipped
