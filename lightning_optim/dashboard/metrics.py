"""A run's logged metrics, read back as numeric series and sorted into families.

Inputs, found under a run directory (which may also be the metrics file itself):

* ``metrics.csv`` from Lightning's ``CSVLogger`` (searched recursively, the newest taken):
  one ``step`` column, one column per key, sparse rows (an empty cell = not logged then). No
  value is ever shown at a wrong step: a line that was cut (the last one, with no line end,
  as a kill or a running writer leaves it) or is malformed (a wrong number of fields, a cell
  that is not a number) is skipped with a :class:`MetricsFileWarning` naming ``file:line``.
  Rows need not be in step order (the monitor's and Lightning's rows interleave), a repeated
  header starts a new column set, and when a step appears in several rows each key takes the
  value of the last row that has one: a resumed run's rows supersede the killed run's;
* otherwise a W&B run (``wandb/offline-run-*/run-*.wandb``, offline or online, the latest
  taken, together with the earlier run files of the same run id that a resumed run leaves,
  read oldest first so a step logged again takes the later value), read without a server by
  :mod:`lightning_optim.dashboard.wandb_history`. The step is
  Lightning's ``trainer/global_step`` when logged, else W&B's ``_step``; histograms are left
  out of the numeric series.

The families (:func:`_classify`): per-parameter statistics ``optim/<stat>/<parameter>``
(:data:`PARAM_STATS`), per-group keys (``optim/lr/<group>``, ``optim/clipped/<group>``,
``optim/grad_norm/<group>``), embedding statistics, losses and the other run-level scalars.
``optim/grad_norm/<x>`` is per group when ``x`` is a group name (one also seen under
``optim/lr/``, ``optim/clipped/`` or ``optim/clipped_fraction/``), per parameter otherwise.

Plain Python: no matplotlib, so a run's series can be read where the ``dashboard`` extra is
not installed.
"""

from __future__ import annotations

import csv
import functools
import math
import re
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["PARAM_STATS", "MetricsFileWarning", "NoMetricsError", "Series", "Table", "find_metrics", "load_run"]

#: Per-parameter statistics logged as ``optim/<stat>/<parameter name>``.
PARAM_STATS = (
    "grad_norm", "param_norm", "update_ratio", "exp_avg_norm", "sqrt_v_mean", "sqrt_v_max",
    "v_drift", "v_log_ratio", "snr", "dead_fraction",
)
_GROUP_PREFIXES = ("optim/lr/", "optim/clipped/", "optim/clipped_fraction/")
_EMBEDDING_STATS = ("mean_ratio", "isotropy", "mean_norm")

Series = tuple[list[float], list[float]]
Table = dict[str, Series]


class NoMetricsError(FileNotFoundError):
    """``RUN_DIR`` holds no metrics.csv and no W&B run."""


def find_metrics(run_dir: str | Path, source: str = "auto") -> tuple[str, Path]:
    """``("csv", path)`` or ``("wandb", path)``: the metrics file of the run under ``run_dir``.

    ``source="auto"`` takes the newest ``metrics.csv`` found recursively, else the latest W&B
    run file (:func:`load_run` also reads the earlier files of that run id, which a resumed
    run leaves); ``"csv"`` or ``"wandb"`` looks for that kind only. ``run_dir`` may also be a
    ``.csv`` or ``.wandb`` file. Raises :class:`NoMetricsError` (a ``FileNotFoundError``)
    naming ``run_dir`` when nothing is found.
    """
    if source not in ("auto", "csv", "wandb"):
        raise ValueError(f"source: expected 'auto', 'csv' or 'wandb', got {source!r}")
    root = Path(run_dir)
    if not root.exists():
        raise NoMetricsError(f"run directory {str(root)!r} does not exist")
    if root.is_file():
        kind = "wandb" if root.suffix == ".wandb" else "csv"
        if source not in ("auto", kind):
            raise NoMetricsError(f"{str(root)!r} is a {kind} file, not {source}")
        return kind, root
    if source in ("auto", "csv"):
        found = [p for p in root.rglob("metrics.csv") if p.is_file()]
        if found:
            return "csv", max(found, key=lambda p: (p.stat().st_mtime, str(p)))
    if source in ("auto", "wandb"):
        from .wandb_history import latest_run_file

        runs = [p for p in root.rglob("run-*.wandb") if p.is_file()]
        if runs:
            return "wandb", latest_run_file(runs)
    wanted = {"auto": "metrics.csv or W&B run (wandb/offline-run-*)", "csv": "metrics.csv",
              "wandb": "W&B run (wandb/offline-run-*)"}[source]
    raise NoMetricsError(f"no metrics in {str(root)!r}: no {wanted} under it")


def _number(text: Any) -> float | None:
    if isinstance(text, bool):
        return float(text)
    if isinstance(text, (int, float)):
        return float(text)
    if isinstance(text, str) and text.strip():
        try:
            return float(text)
        except ValueError:
            return None
    return None


def _step(value: Any) -> float | int | None:
    x = _number(value)
    if x is None or not math.isfinite(x):
        return None
    return int(x) if x.is_integer() else x


class _Collector:
    """Per key: last value per step wins; keys kept in first-seen order."""

    def __init__(self) -> None:
        self.data: dict[str, dict[float, float]] = {}

    def add(self, key: str, step: float, value: float) -> None:
        self.data.setdefault(key, {})[step] = value

    def table(self) -> Table:
        out: Table = {}
        for key, points in self.data.items():
            steps = sorted(points)
            out[key] = (steps, [points[s] for s in steps])
        return out


class MetricsFileWarning(UserWarning):
    """A line of a metrics file was skipped (``path:line: why``): it was cut or malformed, so
    its values could sit at the wrong step."""


_MAX_LINE_WARNINGS = 20  # then one summary, so a damaged file does not flood the console


def _read_csv(path: Path) -> Table:
    """The series of a CSVLogger ``metrics.csv``, skipping every line that could misplace a value.

    Each physical line is parsed on its own. Skipped, each with a :class:`MetricsFileWarning`
    naming ``path:line``: a last line with no line end (a row still being written or cut by a
    kill: a cut inside the ``step`` field would turn step 199 into 19, a cut inside a value
    would shorten it), a row whose number of fields differs from its header's, a row whose
    step or any non-empty cell is not a number. A later line that is a header (holds ``step``
    and no number) starts a new header, as a resumed run may write. When a step appears in
    several rows, each key keeps the value of the last row that has one (a resumed run's rows
    supersede those of the run it continues).
    """
    collector = _Collector()
    where = str(path)
    header: list[str] | None = None
    step_col = -1
    columns: list[tuple[int, str]] = []
    skipped: list[tuple[int, str]] = []
    data = path.read_bytes()
    for lineno, raw in enumerate(data.splitlines(keepends=True), start=1):
        if not raw.endswith((b"\n", b"\r")):
            skipped.append((lineno, "the line has no line end (still being written, or cut)"))
            continue
        text = raw.decode("utf-8", errors="replace").rstrip("\r\n")
        if not text.strip():
            continue
        row = next(csv.reader([text]))
        if "step" in row and not any(_number(cell) is not None for cell in row):
            header = row
            step_col = row.index("step")
            columns = [(i, key) for i, key in enumerate(row) if i != step_col and key]
            continue
        if header is None:
            raise ValueError(f"{where!r} has no 'step' column (first line: {text[:80]!r})")
        if len(row) != len(header):
            skipped.append((lineno, f"{len(row)} fields where the header has {len(header)}"))
            continue
        step = _step(row[step_col])
        if step is None:
            skipped.append((lineno, f"step {row[step_col]!r} is not a finite number"))
            continue
        values = []
        for i, key in columns:
            if row[i]:
                value = _number(row[i])
                if value is None:
                    values = None
                    skipped.append((lineno, f"{row[i]!r} in column {key!r} is not a number"))
                    break
                values.append((key, value))
        for key, value in values or ():
            collector.add(key, step, value)
    for lineno, why in skipped[:_MAX_LINE_WARNINGS]:
        warnings.warn(f"{where}:{lineno}: line skipped: {why}", MetricsFileWarning, stacklevel=2)
    if len(skipped) > _MAX_LINE_WARNINGS:
        rest = [n for n, _ in skipped[_MAX_LINE_WARNINGS:]]
        warnings.warn(f"{where}: {len(rest)} more lines skipped (lines {rest[0]} to {rest[-1]}): cut or "
                      "malformed", MetricsFileWarning, stacklevel=2)
    return collector.table()


def _flatten(prefix: str, value: Any, out: dict[str, float]) -> None:
    if isinstance(value, dict):
        if "_type" in value:  # histograms and other media: not a numeric series
            return
        for k, v in value.items():
            _flatten(f"{prefix}.{k}", v, out)
        return
    x = _number(value) if not isinstance(value, str) else None
    if x is not None:
        out[prefix] = x


def _wandb_table(rows: Iterable[Mapping[str, Any]]) -> Table:
    collector = _Collector()
    for row in rows:
        step = _step(row.get("trainer/global_step"))
        if step is None:
            step = _step(row.get("_step"))
        if step is None:
            continue
        values: dict[str, float] = {}
        for key, value in row.items():
            if key.startswith("_") or key == "trainer/global_step":
                continue
            _flatten(key, value, values)
        for key, value in values.items():
            collector.add(key, step, value)
    return collector.table()


def _load(run_dir: str | Path, source: str = "auto") -> tuple[str, Path, Table]:
    kind, path = find_metrics(run_dir, source)
    if kind == "csv":
        table = _read_csv(path)
    else:
        from .wandb_history import read_history, run_files

        root = Path(run_dir)
        # a resumed W&B run: one file per start of the same run id, read oldest first so the
        # later rows win where the resumed run logged a step again
        files = run_files([p for p in root.rglob("run-*.wandb") if p.is_file()]) if root.is_dir() else [path]
        table = _wandb_table(row for f in files for row in read_history(f))
    if not table:
        raise NoMetricsError(f"no metrics in {str(run_dir)!r}: {str(path)!r} has no numeric values")
    return kind, path, table


def load_run(run_dir: str | Path, source: str = "auto") -> Table:
    """The numeric series of the run under ``run_dir``: ``{key: (steps, values)}``.

    Steps are increasing (a step logged twice keeps its last value); values are floats (NaN
    and inf kept). Keys are in first-seen order. See :func:`find_metrics` for what is
    searched; raises :class:`NoMetricsError` when there are no metrics.
    """
    return _load(run_dir, source)[2]


# --------------------------------------------------------------------------------------
# Classifying keys


def _natural_key(name: str) -> list[Any]:
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", name) if t]


#: How the heatmap rows are ordered, as the page states it (see :func:`_classify`).
_ORDER_TEXT = {
    "logged": "in the order the run logged them (the model's order), first at the top",
    "sorted": "embedding tensors first, then the others by name with numbers in numeric order "
              "(<code>blocks.2</code> before <code>blocks.10</code>); the metrics file does not keep "
              "the model's order",
}


@dataclass
class _Families:
    per_param: dict[str, dict[str, Series]]  # stat -> parameter -> series
    layers: list[str]  # parameter names in display order
    groups: list[str]
    group_norms: dict[str, Series]
    lrs: dict[str, Series]
    clipped_flags: dict[str, Series]
    embedding: dict[str, dict[str, Series]]  # stat -> tensor -> series
    losses: dict[str, Series]
    scalars: dict[str, Series]  # everything that is not per parameter
    order: str = "logged"  # a key of _ORDER_TEXT: how ``layers`` is ordered

    @functools.cached_property
    def monitor_steps(self) -> list[float]:
        """Every step at which some per-parameter statistic was logged: the monitor's log steps."""
        return sorted({s for stat in self.per_param.values() for steps, _ in stat.values() for s in steps})

    @property
    def embedding_names(self) -> list[str]:
        """The tensors of the embedding statistics: in row order, then in first-seen order."""
        seen = dict.fromkeys(n for stat in self.embedding.values() for n in stat)
        rank = {name: i for i, name in enumerate(self.layers)}
        return sorted(seen, key=lambda n: rank.get(n, len(rank)))


def _classify(table: Table, keep_order: bool) -> _Families:
    """Sort the series into families. Rows (``layers``) keep the source's key order when
    ``keep_order`` and that order is not merely sorted; otherwise (Lightning's CSVLogger sorts its
    columns, W&B keeps no key order) embedding tensors come first, then a numeric-aware sort."""
    groups: list[str] = []
    for key in table:
        for prefix in _GROUP_PREFIXES:
            if key.startswith(prefix) and key[len(prefix):] not in groups:
                groups.append(key[len(prefix):])
    per_param: dict[str, dict[str, Series]] = {}
    seen: dict[str, None] = {}
    embedding: dict[str, dict[str, Series]] = {}
    fam = _Families(per_param, [], groups, {}, {}, {}, embedding, {}, {})
    for key, series in table.items():
        parts = key.split("/", 2)
        if len(parts) == 3 and parts[0] == "optim" and parts[1] in PARAM_STATS and parts[2] not in groups:
            per_param.setdefault(parts[1], {})[parts[2]] = series
            seen[parts[2]] = None
            continue
        fam.scalars[key] = series
        if len(parts) == 3 and parts[0] == "optim":
            if parts[1] == "grad_norm":
                fam.group_norms[parts[2]] = series
            elif parts[1] == "lr":
                fam.lrs[parts[2]] = series
            elif parts[1] == "clipped":
                fam.clipped_flags[parts[2]] = series
        elif len(parts) == 3 and parts[0] == "embedding" and parts[1] in _EMBEDDING_STATS:
            embedding.setdefault(parts[1], {})[parts[2]] = series
        elif parts[0] not in ("optim", "embedding") and "loss" in parts[-1].lower():
            fam.losses[key] = series
    fam.layers = list(seen)
    if not keep_order or fam.layers == sorted(fam.layers):
        # model order is lost: embeddings (the model's first tensors) on top, then by name
        first = {name for stat in embedding.values() for name in stat}
        fam.layers.sort(key=lambda name: (name not in first, _natural_key(name)))
        fam.order = "sorted"
    return fam
