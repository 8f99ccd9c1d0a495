"""Read the history of a W&B run from its ``run-<id>.wandb`` file, without a server.

A W&B run (offline or online) keeps everything it logged in ``wandb/offline-run-<time>-<id>/
run-<id>.wandb`` (``run-<time>-<id>/`` when online). The file is a LevelDB-style record log:

* a 7-byte file header: ``b":W&B"``, a 2-byte little-endian magic (``0xBEE1``) and a
  version byte (``0``);
* then 32 KiB blocks, counted from the start of the file (header included). Each block holds
  chunks, each with a 7-byte header: checksum (4 bytes LE), payload length (2 bytes LE) and
  type (1 byte: FULL=1, FIRST=2, MIDDLE=3, LAST=4). A chunk never crosses a block boundary: a
  record that does not fit is split into FIRST, MIDDLE..., LAST chunks, and a block tail
  shorter than a chunk header is zero padding;
* the checksum is the CRC-32 (zlib's, IEEE polynomial, not CRC-32C) of the type byte followed
  by the payload, as W&B's own writer computes it;
* each reassembled record is a serialized ``wandb.proto.wandb_internal_pb2.Record``; the
  history rows are the records whose ``record_type`` is ``"history"``.

wandb itself ships no public Python reader for this format any more (0.31, the version this was
written against, has none: the old ``wandb.sdk.internal.datastore.DataStore`` went with the move
to the Go ``wandb-core``), so this module is the reader; only the protobuf classes come from
wandb, imported on first use. History values are decoded from ``value_json`` or, for runs
logged with ``x_history_value_encoding="json,typed"``, from the typed ``value`` fields.

A run that is still being written may end in a partial chunk: reading stops there, so the
rows logged so far are returned. A wrong file header, a checksum mismatch, a chunk sequence
that makes no sense or a record that does not parse raise ``ValueError`` naming the file and
the byte offset.
"""

from __future__ import annotations

import json
import re
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..extras import require

__all__ = [
    "BLOCK_SIZE",
    "find_run_file",
    "iter_records",
    "read_history",
    "is_histogram",
    "latest_run_file",
    "run_files",
]

FILE_MAGIC = b":W&B"
FILE_MAGIC_NUMBER = 0xBEE1
FILE_VERSION = 0
FILE_HEADER = struct.Struct("<4sHB")  # 7 bytes
CHUNK_HEADER = struct.Struct("<IHB")  # 7 bytes: checksum, length, type
BLOCK_SIZE = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4
_TYPE_CRC = {t: zlib.crc32(bytes([t])) for t in (FULL, FIRST, MIDDLE, LAST)}

_RUN_DIR = re.compile(r"^(?:offline-)?run-(\d{8}_\d{6})-(.+)$")


def latest_run_file(files: list[Path]) -> Path:
    """Of several run files, the run started last (the time in its directory name), then the
    last written."""

    def key(f: Path) -> tuple[str, float, str]:
        m = _RUN_DIR.match(f.parent.name)
        return (m.group(1) if m else "", f.stat().st_mtime, str(f))

    return max(files, key=key)


def run_files(files: list[Path]) -> list[Path]:
    """The files of the run that :func:`latest_run_file` picks, oldest first: a resumed run
    (``wandb.init(id=..., resume=...)``) starts a new ``offline-run-<time>-<id>`` directory
    for the same run id each time, and each holds only the history logged since that start.
    The id is the directory name's tail (else the file name's ``run-<id>.wandb``)."""

    def run_id(f: Path) -> str:
        m = _RUN_DIR.match(f.parent.name)
        return m.group(2) if m else f.stem.removeprefix("run-")

    def key(f: Path) -> tuple[str, float, str]:
        m = _RUN_DIR.match(f.parent.name)
        return (m.group(1) if m else "", f.stat().st_mtime, str(f))

    latest = latest_run_file(files)
    return sorted((f for f in files if run_id(f) == run_id(latest)), key=key)


def find_run_file(path: str | Path) -> Path:
    """The ``run-*.wandb`` file that ``path`` names.

    ``path`` is the file itself, a run directory (``offline-run-*`` or ``run-*``) holding it,
    or a directory holding run directories directly or under ``wandb/`` (the latest run is
    taken). Raises ``FileNotFoundError`` naming the path when there is none.
    """
    p = Path(path)
    if p.is_file():
        return p
    if not p.exists():
        raise FileNotFoundError(f"W&B run not found: {str(p)!r} does not exist")
    files = [f for f in p.glob("*.wandb") if f.is_file()]
    if not files:
        for base in (p, p / "wandb"):
            for pattern in ("offline-run-*/run-*.wandb", "run-*/run-*.wandb"):
                files += [f for f in base.glob(pattern) if f.is_file()]
    if not files:
        raise FileNotFoundError(
            f"no W&B run file (run-*.wandb) in {str(p)!r}, its offline-run-*/run-* directories "
            "or its wandb/ directory"
        )
    return latest_run_file(files)


def iter_records(path: str | Path) -> Iterator[bytes]:
    """The records of a W&B record log, reassembled from their chunks, as raw bytes."""
    file = Path(path)
    try:
        data = file.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"W&B run file not found: {str(file)!r}") from None
    where = repr(str(file))
    if len(data) < FILE_HEADER.size:
        raise ValueError(f"{where} is not a W&B run file: {len(data)} bytes, shorter than the 7-byte header")
    ident, magic, version = FILE_HEADER.unpack_from(data, 0)
    if ident != FILE_MAGIC or magic != FILE_MAGIC_NUMBER:
        raise ValueError(f"{where} is not a W&B run file: header {data[:7]!r}, "
                         "expected b':W&B\\xe1\\xbe\\x00'")
    if version != FILE_VERSION:
        raise ValueError(f"{where}: W&B record log version {version} is not supported (only {FILE_VERSION})")

    pos, end = FILE_HEADER.size, len(data)
    pending: bytearray | None = None  # payload of a record begun by a FIRST chunk
    while pos < end:
        left_in_block = BLOCK_SIZE - pos % BLOCK_SIZE
        if left_in_block < CHUNK_HEADER.size:
            pos += left_in_block  # zero padding at the block's tail
            continue
        if end - pos < CHUNK_HEADER.size:
            return  # a chunk header still being written
        checksum, length, ctype = CHUNK_HEADER.unpack_from(data, pos)
        if checksum == 0 and length == 0 and ctype == 0:
            pos += left_in_block  # zeroed (preallocated) rest of the block
            continue
        if ctype not in _TYPE_CRC:
            raise ValueError(f"{where} is corrupt: chunk type {ctype} at byte {pos} (expected 1-4)")
        if CHUNK_HEADER.size + length > left_in_block:
            raise ValueError(f"{where} is corrupt: chunk of {length} bytes at byte {pos} "
                             "crosses a block boundary")
        start = pos + CHUNK_HEADER.size
        if start + length > end:
            return  # a chunk still being written: stop at the last complete record
        payload = data[start : start + length]
        if zlib.crc32(payload, _TYPE_CRC[ctype]) != checksum:
            raise ValueError(f"{where} is corrupt: checksum mismatch in the chunk at byte {pos}")
        here, pos = pos, start + length
        if ctype == FULL or ctype == FIRST:
            if pending is not None:
                raise ValueError(f"{where} is corrupt: a record begun before byte {here} has no LAST chunk")
            if ctype == FULL:
                yield payload
            else:
                pending = bytearray(payload)
        else:
            if pending is None:
                name = "MIDDLE" if ctype == MIDDLE else "LAST"
                raise ValueError(f"{where} is corrupt: {name} chunk at byte {here} without a FIRST chunk")
            pending += payload
            if ctype == LAST:
                yield bytes(pending)
                pending = None


def _item_value(item: Any) -> Any:
    which = item.WhichOneof("value") if "value" in item.DESCRIPTOR.oneofs_by_name else None
    if which is None:
        return json.loads(item.value_json) if item.value_json else None
    if which == "none":
        return None
    if which == "json":
        return json.loads(item.json)
    return getattr(item, which)


def _set_path(row: dict[str, Any], path: list[str], value: Any) -> None:
    node = row
    for part in path[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[path[-1]] = value


def is_histogram(value: Any) -> bool:
    """Whether a history value is a logged ``wandb.Histogram`` (a dict with ``_type: histogram``)."""
    return isinstance(value, dict) and value.get("_type") == "histogram"


def read_history(path: str | Path) -> list[dict[str, Any]]:
    """The history rows of a W&B run, in logged order.

    ``path``: a ``run-*.wandb`` file, an ``offline-run-*`` (or ``run-*``) directory, or a
    directory with such run directories in it or in its ``wandb/`` (the latest is read).

    Each row maps the logged key (``"train/loss"``, ``"optim/v_drift/blocks.0.attn.weight"``)
    to its decoded JSON value, plus W&B's ``_step``, ``_runtime`` and ``_timestamp``. A
    ``wandb.Histogram`` comes back as its dict (``{"_type": "histogram", "bins": [...],
    "values": [...]}``, see :func:`is_histogram`); a logged nested dict as a nested dict.

    Raises ``FileNotFoundError`` when there is no run file and ``ValueError`` when the file is
    not a W&B record log or is corrupt, both naming the path; needs wandb (the ``wandb``
    extra), else :class:`~lightning_optim.extras.MissingExtraError`.
    """
    file = find_run_file(path)
    # the record types are wandb's own protobuf messages (protobuf comes with wandb)
    require("wandb", extra="wandb", feature="reading a W&B run")
    from google.protobuf.message import DecodeError

    from wandb.proto import wandb_internal_pb2 as pb

    rows: list[dict[str, Any]] = []
    for n, raw in enumerate(iter_records(file)):
        record = pb.Record()
        try:
            record.ParseFromString(raw)
        except DecodeError as exc:
            raise ValueError(f"{str(file)!r} is corrupt: record {n} is not a W&B Record ({exc})") from None
        if record.WhichOneof("record_type") != "history":
            continue
        row: dict[str, Any] = {}
        for item in record.history.item:
            try:
                value = _item_value(item)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{str(file)!r} is corrupt: record {n} has a value that is not JSON "
                                 f"({exc})") from None
            if item.nested_key:
                _set_path(row, list(item.nested_key), value)
            else:
                row[item.key] = value
        if "_step" not in row and record.history.HasField("step"):
            row["_step"] = record.history.step.num
        rows.append(row)
    return rows
