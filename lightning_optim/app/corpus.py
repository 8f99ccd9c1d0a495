"""The main job's corpus: the running interpreter's own standard library, tokenized.

Every machine with Python has it, so the main job needs no download. :func:`load_corpus`

1. lists the non-empty ``.py`` files under ``sysconfig.get_paths()["stdlib"]``, leaving out
   ``site-packages``/``dist-packages`` (installed packages, not the stdlib) and the
   ``test``/``tests``/``idlelib`` directories (``lib2to3/tests`` included), sorted by path;
2. keeps at most ``max_bytes`` of them: files are taken in the order of a hash of their
   relative path (a fixed pseudo-random order, so a small budget still samples the whole
   library rather than the modules starting with "a"), each while it fits;
3. splits them by file: in the order of another hash of the path, files go to validation
   until it holds ``val_fraction`` of the bytes (at least one file each side);
4. trains a byte-level BPE (GPT-2's scheme, from the ``tokenizers`` library) with
   ``vocab_size`` tokens on the training files only;
5. encodes each file and joins them with ``<|endoftext|>`` into one flat id tensor per split.

The result is cached in ``<cache>/corpus-<key>/`` (``train.npy``, ``val.npy``,
``tokenizer.json``, ``meta.json``), where ``<cache>`` is the ``cache_dir`` argument, else
``$LIGHTNING_OPTIM_CACHE``, else ``~/.cache/lightning_optim``, and ``<key>`` hashes the
settings, the Python version, the tokenizers version and the list of files with their sizes,
so another interpreter or budget gets its own entry. It is built in a temporary directory
and renamed into place, so an interrupted build leaves nothing half-written.

Determinism: the BPE trainer sums its pair counts (order-free) and breaks ties between
equally frequent pairs by the pair itself, so threads do not change the result: the
vocabulary and ids were identical across processes with 1, 2 and 16 threads
(``RAYON_NUM_THREADS``), and ``tests/test_main_job.py`` checks two builds against each other.

Plain Python, torch and tokenizers: no Lightning.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..extras import import_extra
from ..validation import ConfigurationError, invalid

__all__ = ["Corpus", "TokenWindows", "load_corpus", "stdlib_files", "split_files", "zipf_exponent", "cache_root"]

FORMAT = 2  # bump when the cache layout or the preparation changes
EOT = "<|endoftext|>"
EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__"})


@dataclass
class Corpus:
    """The prepared corpus: flat token ids per split, the tokenizer, and where it lives."""

    train: torch.Tensor  # int64, all training files joined by <|endoftext|>
    val: torch.Tensor
    tokenizer: "tokenizers.Tokenizer"  # noqa: F821
    meta: dict
    path: Path

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()


def _digest(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def stdlib_files(max_bytes: int | None = None, root: str | Path | None = None) -> list[tuple[str, int]]:
    """``(relative path, size)`` of the stdlib ``.py`` files kept, sorted by path.

    With ``max_bytes``, files are taken in hash order while they fit (a file larger than
    what is left is passed over, and a smaller one after it may still fit).
    """
    root = Path(root or sysconfig.get_paths()["stdlib"])
    found: list[tuple[str, int]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in EXCLUDED_DIRS)
        for name in filenames:
            path = Path(dirpath) / name
            if name.endswith(".py") and path.is_file() and path.stat().st_size > 0:
                found.append((path.relative_to(root).as_posix(), path.stat().st_size))
    found.sort()
    if max_bytes is not None:
        kept, total = set(), 0
        for rel, size in sorted(found, key=lambda f: (_digest("take:" + f[0]), f[0])):
            if total + size <= max_bytes:
                kept.add(rel)
                total += size
        found = [f for f in found if f[0] in kept]
    return found


def split_files(files: list[tuple[str, int]], val_fraction: float) -> tuple[list[str], list[str]]:
    """Train and validation paths: files in the order of a hash of their path go to
    validation until it holds ``val_fraction`` of the bytes; at least one file each side."""
    if len(files) < 2:
        raise ConfigurationError(f"corpus: {len(files)} file(s) selected: need at least 2 (raise max_bytes)")
    target, held, val = val_fraction * sum(size for _, size in files), 0, set()
    for rel, size in sorted(files, key=lambda f: (_digest("split:" + f[0]), f[0])):
        if held >= target or len(val) == len(files) - 1:
            break
        val.add(rel)
        held += size
    return [rel for rel, _ in files if rel not in val], [rel for rel, _ in files if rel in val]


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """``cache_dir``, else ``$LIGHTNING_OPTIM_CACHE``, else ``$XDG_CACHE_HOME`` or ``~/.cache``, plus ``lightning_optim``."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    if os.environ.get("LIGHTNING_OPTIM_CACHE"):
        return Path(os.environ["LIGHTNING_OPTIM_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lightning_optim"


def train_tokenizer(texts: list[str], vocab_size: int) -> "tokenizers.Tokenizer":  # noqa: F821
    """A byte-level BPE (GPT-2's pre-tokenization and byte alphabet) with ``vocab_size`` tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, show_progress=False, special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def _encode(tok: "tokenizers.Tokenizer", texts: list[str]) -> np.ndarray:  # noqa: F821
    eot = tok.token_to_id(EOT)
    pieces = []
    for enc in tok.encode_batch(texts):
        pieces.append(np.asarray(enc.ids, dtype=np.int64))
        pieces.append(np.array([eot], dtype=np.int64))
    ids = np.concatenate(pieces) if pieces else np.zeros(0, np.int64)
    return ids.astype(np.uint16 if tok.get_vocab_size() <= 2**16 else np.int32)


def _read(root: Path, rel: str) -> str:
    return (root / rel).read_bytes().decode("utf-8", errors="replace")


def load_corpus(
    vocab_size: int = 4096,
    max_bytes: int = 6_000_000,
    val_fraction: float = 0.05,
    cache_dir: str | Path | None = None,
    verbose: bool = True,
) -> Corpus:
    """The prepared corpus, from the cache or built now (see the module docstring)."""
    tokenizers = import_extra("tokenizers", extra="app", feature="the main job's corpus")

    if isinstance(vocab_size, bool) or not (isinstance(vocab_size, int) and 257 <= vocab_size < 2**31):
        raise invalid("corpus", "vocab_size", vocab_size, "must be an int >= 257 (the 256 bytes and <|endoftext|>)")
    if isinstance(max_bytes, bool) or not (isinstance(max_bytes, int) and max_bytes > 0):
        raise invalid("corpus", "max_bytes", max_bytes, "must be an int > 0")
    if isinstance(val_fraction, bool) or not (isinstance(val_fraction, (int, float)) and 0 < val_fraction < 1):
        raise invalid("corpus", "val_fraction", val_fraction, "must be in (0, 1)")
    say = print if verbose else (lambda *a, **k: None)
    root = Path(sysconfig.get_paths()["stdlib"])
    files = stdlib_files(max_bytes, root)
    settings = {"format": FORMAT, "vocab_size": vocab_size, "max_bytes": max_bytes, "val_fraction": val_fraction}
    meta = {
        **settings,
        "python": sys.version.split()[0],
        "tokenizers": tokenizers.__version__,
        "stdlib": str(root),
        "files": len(files),
        "bytes": sum(size for _, size in files),
        "file_list_sha256": hashlib.sha256(json.dumps(files).encode()).hexdigest(),
    }
    key = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_root(cache_dir) / f"corpus-{key}"
    if not (path / "meta.json").is_file():
        _build(path, root, files, meta, say)
    return _load(path)


def _build(path: Path, root: Path, files: list[tuple[str, int]], meta: dict, say) -> None:
    start = time.perf_counter()
    names = [rel for rel, _ in files]
    train_names, val_names = split_files(files, meta["val_fraction"])
    say(f"corpus: first run, preparing {path} (later runs load it)")
    texts = {rel: _read(root, rel) for rel in names}
    t0 = time.perf_counter()
    say(f"corpus: read {len(names)} stdlib files, {meta['bytes'] / 1e6:.1f} MB, from {root} "
        f"({len(train_names)} train / {len(val_names)} validation) in {t0 - start:.1f} s")
    tok = train_tokenizer([texts[r] for r in train_names], meta["vocab_size"])
    t1 = time.perf_counter()
    say(f"corpus: trained a byte-level BPE tokenizer, {tok.get_vocab_size()} tokens, in {t1 - t0:.1f} s")
    train = _encode(tok, [texts[r] for r in train_names])
    val = _encode(tok, [texts[r] for r in val_names])
    t2 = time.perf_counter()
    say(f"corpus: encoded {len(train):,} train / {len(val):,} validation tokens in {t2 - t1:.1f} s")

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        np.save(tmp / "train.npy", train)
        np.save(tmp / "val.npy", val)
        tok.save(str(tmp / "tokenizer.json"))
        full = {**meta, "vocab": tok.get_vocab_size(), "train_tokens": int(len(train)), "val_tokens": int(len(val)),
                "train_files": train_names, "val_files": val_names}
        (tmp / "meta.json").write_text(json.dumps(full, indent=1))  # written last: marks the entry complete
        try:
            os.rename(tmp, path)
        except OSError:  # another process finished the same entry first: keep theirs
            if not (path / "meta.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    say(f"corpus: cached in {path} ({time.perf_counter() - start:.1f} s in all)")


def _load(path: Path) -> Corpus:
    from tokenizers import Tokenizer

    meta = json.loads((path / "meta.json").read_text())
    ids = {split: torch.from_numpy(np.load(path / f"{split}.npy").astype(np.int64)) for split in ("train", "val")}
    return Corpus(ids["train"], ids["val"], Tokenizer.from_file(str(path / "tokenizer.json")), meta, path)


class TokenWindows(torch.utils.data.Dataset):
    """Windows of ``seq_len + 1`` consecutive ids (inputs ``w[:-1]``, targets ``w[1:]``),
    starting every ``seq_len`` tokens; ``limit`` keeps that many, evenly spaced over the split."""

    def __init__(self, ids: torch.Tensor, seq_len: int, limit: int | None = None) -> None:
        count = (len(ids) - 1) // seq_len
        if count < 1:
            raise invalid("corpus", "seq_len", seq_len, f"is longer than the split ({len(ids)} tokens)")
        self.starts = torch.arange(count) * seq_len
        if limit is not None and limit < count:
            self.starts = self.starts[torch.linspace(0, count - 1, limit).long()]
        self.ids, self.seq_len = ids, seq_len

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> torch.Tensor:
        start = int(self.starts[i])
        return self.ids[start : start + self.seq_len + 1]


def zipf_exponent(ids: torch.Tensor, min_rank: int = 10, max_rank: int = 1000) -> float:
    """``s`` of Zipf's law ``frequency ~ rank^-s``: the least-squares slope of log frequency
    against log rank over ranks ``min_rank..max_rank`` (1-based; the very top ranks are
    whitespace and punctuation, which bend any natural-text curve). Natural language gives s
    near 1."""
    counts = torch.bincount(ids.flatten().long()).double()
    counts = counts[counts > 0].sort(descending=True).values
    hi = min(max_rank, len(counts))
    if hi - min_rank < 2:
        raise ValueError(f"zipf_exponent: only {len(counts)} distinct ids: need more than min_rank + 2 = {min_rank + 2}")
    ranks = torch.arange(min_rank, hi + 1, dtype=torch.float64)
    x, y = ranks.log(), counts[min_rank - 1 : hi].log()
    x, y = x - x.mean(), y - y.mean()
    return float(-(x * y).sum() / (x * x).sum())


def main() -> None:  # python -m lightning_optim.corpus: build (or find) the default corpus and describe it
    corpus = load_corpus()
    print(f"{corpus.path}: {corpus.meta['files']} files, vocab {corpus.vocab_size}, "
          f"{len(corpus.train):,} train / {len(corpus.val):,} validation tokens, "
          f"Zipf exponent {zipf_exponent(corpus.train):.2f}")
    sample = corpus.tokenizer.decode(corpus.val[:40].tolist())
    print(f"a validation sample, decoded: {sample!r}")
    print(f"...as tokens: {[corpus.tokenizer.id_to_token(i) for i in corpus.val[:20].tolist()]}")


if __name__ == "__main__":
    main()
