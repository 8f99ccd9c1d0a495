"""Dashboard of a run's optimizer statistics: one self-contained HTML page plus its PNGs.

Usage::

    python -m lightning_optim.dashboard RUN_DIR [-o OUT.html] [--source auto|csv|wandb]

prints the path of the page it wrote (default ``RUN_DIR/dashboard.html``); the figures are
also saved as PNG files in ``<OUT stem>_figures/`` beside it. It exits with status 2 and a
one-line message when ``RUN_DIR`` has no metrics. Works on a finished, a running, a killed
or a resumed run. Warnings (skipped lines) go to stderr as ``warning: ...`` lines.

Inputs, found under ``RUN_DIR`` (which may also be the metrics file itself):

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

The keys it plots are those the :class:`lightning_optim.MomentMonitor` and the
:class:`lightning_optim.OptimizerCallback` log:

* heatmaps, parameter tensors (rows) x logged steps (columns), of ``optim/v_drift/<param>``
  (log color scale), ``optim/sqrt_v_mean/<param>`` (log), ``optim/snr/<param>``,
  ``optim/update_ratio/<param>`` (log) and ``optim/dead_fraction/<param>``. Rows are in model
  order as far as the source keeps it: a CSV's column order when it is not merely sorted,
  otherwise (Lightning sorts its CSV columns; W&B keeps no key order) the embedding tensors
  first, then a numeric-aware sort of the names, so ``blocks.2`` comes before ``blocks.10``;
  each heatmap's caption says which. A row's label is the shortest suffix of whole dotted
  parts that no other tensor's name ends with (never two rows with one label). Columns are
  the monitor's log steps (every step at which some per-parameter statistic was logged): a
  cell spans from the previous log step to its own, the interval over which ``v_drift``
  measures the change of v; the other statistics are the value at the cell's right edge.
  The color bar carries the statistic's definition; gray cells were not logged;
* ``embedding/mean_ratio/<name>`` and ``embedding/isotropy/<name>`` over steps;
* ``optim/grad_norm_total`` (and the per-group ``optim/grad_norm/<group>``), with clip events
  (steps where ``optim/clipped_steps`` grew, or any ``optim/clipped/<group>`` is 1) and
  skipped steps (where ``optim/skipped_steps`` grew) marked, and ``optim/lr/<group>`` on a
  second axis;
* loss curves: ``train/loss``, ``val/loss`` and any other key whose last part says ``loss``.

``optim/grad_norm/<x>`` is per group when ``x`` is a group name (one also seen under
``optim/lr/``, ``optim/clipped/`` or ``optim/clipped_fraction/``), per parameter otherwise.
All figures share one step axis, from the first logged step (or the first cell's left edge)
to the last logged step, so a stripe in a heatmap lines up with the loss spike it precedes;
a tensor, group or loss has one line color in every figure. A figure whose keys were not
logged is replaced by a "not logged in this run" note.
The page ends with the last value of every run-level key, a summary of the per-parameter
statistics and (folded) their full table.

Python API: :func:`load_run` (``{key: (steps, values)}``), :func:`find_metrics` and
:func:`render`. Matplotlib draws without pyplot (no global backend is switched), with sizes
and margins that depend only on the metrics, so the output is deterministic for given inputs.
"""

from __future__ import annotations

import argparse
import base64
import csv
import functools
import html
import io
import itertools
import math
import os
import re
import sys
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "PARAM_STATS", "MetricsFileWarning", "NoMetricsError", "find_metrics", "load_run", "render", "main",
]

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


# --------------------------------------------------------------------------------------
# Loading


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


# --------------------------------------------------------------------------------------
# Figures

_WIDTH = 11.0  # inches; every figure shares the width and the horizontal margins,
_LEFT, _RIGHT = 0.22, 0.885  # so their step axes line up on the page (the left one may widen)
_MAX_LEFT = 0.45
_DPI = 100
#: Heatmap cells with no value (not logged at that step, or not finite), named as the captions name it.
_NOT_LOGGED = ("gray", "#808080")
# line colors, one per tensor, group or loss across every figure; no black (the total gradient
# norm), orange or red (clip and skip events)
_PALETTE = ("tab:blue", "tab:green", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan",
            "tab:gray", "#aec7e8", "#98df8a", "#c5b0d5", "#c49c94", "#f7b6d2", "#dbdb8d", "#9edae5")

#: The color-bar label of each heatmap: the statistic's definition (lightning_optim.stats), where
#: s is the cell's log step and s' the previous one.
_COLORBAR = {
    "v_drift": r"v_drift $= \Vert\hat{v}_s - \hat{v}_{s'}\Vert\ /\ \Vert\hat{v}_{s'}\Vert$",
    "sqrt_v_mean": r"sqrt_v_mean $= \mathrm{mean}\ \sqrt{\hat{v}_s}$",
    "snr": r"snr $= \mathrm{mean}\ |\hat{m}_s| / (\sqrt{\hat{v}_s} + \epsilon)$",
    "update_ratio": r"update_ratio $= \Vert p_s - p_{s-1}\Vert\ /\ \Vert p_{s-1}\Vert$",
    "dead_fraction": r"dead_fraction: share of $\sqrt{\hat{v}_s} < \epsilon$",
}


def _short_labels(names: list[str]) -> list[str]:
    """Row labels: for each name, its shortest suffix of whole dotted parts that no other name
    ends with, so that two tensors never get the same label. Two parts at least (``weight``
    alone names no tensor), and a suffix that would start with an index takes the part before
    it too (``layers.0.linear1.bias``, not ``0.linear1.bias``). A name that is itself a suffix
    of another keeps all its parts.

    Distinct labels: two labels with k parts are the k-part suffixes of their names, and the
    first one was only chosen because no other name has that k-part suffix.
    """
    from collections import Counter

    parts = [n.split(".") for n in names]
    depth = max((len(p) for p in parts), default=0)
    counts = [Counter(".".join(p[-k:]) for p in parts if len(p) >= k) for k in range(depth + 1)]
    out = []
    for p in parts:
        k = next((k for k in range(min(2, len(p)), len(p) + 1) if counts[k][".".join(p[-k:])] == 1), len(p))
        if k < len(p) and p[-k].isdigit():
            k += 1
        out.append(".".join(p[-k:]))
    return out


@dataclass
class _Layout:
    """What every figure of one page shares, so that they read as one."""

    xlim: tuple[float, float]  # the step axis: first logged step (or cell edge) to the last logged step
    left: float  # left margin, figure fraction: wide enough for the longest row label
    labels: dict[str, str]  # tensor name -> its short label, the same in every figure
    colors: dict[tuple[str, str], str]  # ("tensor" | "group" | "loss", name) -> line color


def _cell_edges(columns: list[float], monitor_steps: list[float]) -> list[float]:
    """Cell edges of heatmap columns (monitor log steps, a tail of ``monitor_steps``): a cell spans
    from the previous log step to its own, the interval over which ``v_drift`` measures the change
    of v; the first log step, which has no previous one, gets the width of the shortest interval
    (1 with a single log step), starting no earlier than step 0 (step -1 for a log at step 0)."""
    j = monitor_steps.index(columns[0])
    if j > 0:
        left = monitor_steps[j - 1]
    else:
        gaps = [b - a for a, b in itertools.pairwise(monitor_steps)]
        left = max(columns[0] - (min(gaps) if gaps else 1), min(0, columns[0] - 1))
    return [left, *columns]


def _heatmap_columns(stat: str, fam: _Families) -> list[float]:
    data = fam.per_param[stat]
    first = min(steps[0] for steps, _ in data.values() if steps)
    return [s for s in fam.monitor_steps if s >= first]


def _layout(fam: _Families, table: Table) -> _Layout:
    lo, hi = math.inf, -math.inf
    for steps, _ in table.values():
        if steps:
            lo, hi = min(lo, steps[0]), max(hi, steps[-1])
    for stat, *_ in _HEATMAPS:
        if fam.per_param.get(stat):
            lo = min(lo, _cell_edges(_heatmap_columns(stat, fam), fam.monitor_steps)[0])
    if not math.isfinite(lo):
        lo, hi = 0.0, 1.0
    elif hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    names = list(dict.fromkeys([*fam.layers, *fam.embedding_names]))
    labels = dict(zip(names, _short_labels(names)))
    longest = max((len(labels[n]) for n in fam.layers), default=0)
    # 8 pt DejaVu Sans averages under 0.067 in per character; 0.25 in of tick padding
    left = min(max(_LEFT, (0.25 + 0.067 * longest) / _WIDTH), _MAX_LEFT)
    keys = ([("tensor", n) for n in fam.embedding_names] + [("group", g) for g in dict.fromkeys(
        [*fam.group_norms, *fam.lrs])] + [("loss", k) for k in fam.losses])
    colors = {key: _PALETTE[i % len(_PALETTE)] for i, key in enumerate(keys)}
    return _Layout((lo, hi), left, labels, colors)


def _new_figure(layout: _Layout, height: float, bottom_in: float = 0.55,
                top_in: float = 0.4) -> tuple[Any, list[float]]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(_WIDTH, height), dpi=_DPI)
    b, t = bottom_in / height, 1 - top_in / height
    return fig, [layout.left, b, _RIGHT - layout.left, t - b]


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI, metadata={"Software": None})
    return buf.getvalue()


def _heatmap(stat: str, fam: _Families, layout: _Layout, *, log: bool, cmap: str,
             vrange: tuple[float, float] | None = None) -> Any:
    import numpy as np
    from matplotlib import colormaps
    from matplotlib.colors import LogNorm, Normalize

    data = fam.per_param[stat]
    names = [n for n in fam.layers if n in data]
    columns = _heatmap_columns(stat, fam)
    col = {s: i for i, s in enumerate(columns)}
    grid = np.full((len(names), len(columns)), np.nan)
    for r, name in enumerate(names):
        s, v = data[name]
        grid[r, [col[x] for x in s]] = v
    grid[~np.isfinite(grid)] = np.nan
    finite = grid[np.isfinite(grid)]
    norm: Any
    scale = "linear"
    if vrange is not None:
        norm = Normalize(*vrange)
    elif log and (finite > 0).any():
        positive = finite[finite > 0]
        lo, hi = float(positive.min()), float(positive.max())
        if hi <= lo:
            lo, hi = lo / 10, hi * 10
        grid = np.where(np.isfinite(grid) & (grid <= lo), lo, grid)  # zeros: bottom color
        norm, scale = LogNorm(lo, hi), "log"
    else:
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        if hi <= lo:
            lo, hi = lo - 0.5, hi + 0.5
        norm = Normalize(lo, hi)
    n = len(names)
    fig, rect = _new_figure(layout, min(max(0.15 * n + 1.0, 3.0), 18.0))
    ax = fig.add_axes(rect)
    # uncovered parts of the axes are unlogged too: the same color as a missing cell
    ax.set_facecolor(_NOT_LOGGED[1])
    edges = _cell_edges(columns, fam.monitor_steps)
    mesh = ax.pcolormesh(edges, np.arange(n + 1), np.ma.masked_invalid(grid),
                         cmap=colormaps[cmap].with_extremes(bad=_NOT_LOGGED[1]), norm=norm, shading="flat")
    ax.set_ylim(n, 0)
    every = max(1, math.ceil(n / 90))
    ticks = list(range(0, n, every))
    ax.set_yticks([t + 0.5 for t in ticks], [layout.labels[names[t]] for t in ticks],
                  fontsize=7 if n > 12 else 8)
    ax.tick_params(axis="y", length=0)
    ax.set_xlim(*layout.xlim)
    ax.set_xlabel("step  (a cell spans from the previous log step s' to its log step s)")
    ax.set_title(f"optim/{stat}/<parameter>  ({n} tensors, {len(columns)} log steps, {scale} color scale)",
                 fontsize=10, loc="left")
    cax = fig.add_axes([_RIGHT + 0.015, rect[1], 0.012, rect[3]])
    fig.colorbar(mesh, cax=cax).set_label(_COLORBAR.get(stat, stat), fontsize=8)
    return fig


def _legend(ax: Any, handles: list[Any] | None = None) -> None:
    if handles is None:
        handles, _ = ax.get_legend_handles_labels()
    if handles:  # in the left margin, so it never hides data
        ax.legend(handles=handles, loc="upper right", bbox_to_anchor=(-0.075, 1.0), fontsize=7,
                  frameon=False, borderaxespad=0)


def _maybe_log(ax: Any, series: Iterable[Series], ratio: float = 20.0) -> None:
    values = [v for _, vs in series for v in vs if math.isfinite(v)]
    if values and min(values) > 0 and max(values) / min(values) > ratio:
        from matplotlib.ticker import NullFormatter

        ax.set_yscale("log")
        ax.yaxis.set_minor_formatter(NullFormatter())


def _marker(steps: list[float]) -> dict[str, Any]:
    """Dots on the line when the points are few enough to see."""
    return {"marker": "o", "markersize": 3} if len(steps) <= 60 else {}


def _embedding_figure(fam: _Families, layout: _Layout) -> Any:
    fig, rect = _new_figure(layout, 4.6, bottom_in=0.55, top_in=0.35)
    gap = 0.5 / 4.6
    h = (rect[3] - gap) / 2
    names = fam.embedding_names  # the same order, labels and colors in both panels
    for i, (stat, what) in enumerate((("mean_ratio", "||mean row|| / mean ||row||"),
                                      ("isotropy", "higher = more isotropic"))):
        ax = fig.add_axes([rect[0], rect[1] + (1 - i) * (h + gap), rect[2], h])
        data = fam.embedding.get(stat, {})
        if data:
            for name in names:
                if name in data:
                    steps, values = data[name]
                    ax.plot(steps, values, label=layout.labels[name], linewidth=1.2,
                            color=layout.colors[("tensor", name)], **_marker(steps))
            _legend(ax)
        else:
            ax.text(0.5, 0.5, f"embedding/{stat}/<name> not logged in this run", ha="center", va="center",
                    transform=ax.transAxes, color="0.4")
        ax.set_xlim(*layout.xlim)
        ax.set_title(f"embedding/{stat}  ({what})", fontsize=10, loc="left")
        ax.grid(alpha=0.3)
        if i == 1:
            ax.set_xlabel("step")
    return fig


def _increases(series: Series | None) -> list[float]:
    if series is None:
        return []
    out, prev = [], 0.0
    for s, v in zip(*series):
        if math.isfinite(v):
            if v > prev:
                out.append(s)
            prev = v
    return out


def _grad_norm_figure(fam: _Families, table: Table, layout: _Layout) -> Any:
    from matplotlib.lines import Line2D

    fig, rect = _new_figure(layout, 3.6)
    ax = fig.add_axes(rect)
    total = table.get("optim/grad_norm_total")
    if total is not None:
        ax.plot(*total, color="black", linewidth=1.3, label="total (before clipping)", **_marker(total[0]))
    groups = fam.group_norms
    for g, series in groups.items():
        ax.plot(*series, linewidth=0.9, alpha=0.8, color=layout.colors[("group", g)], label=f"grad norm {g}",
                **_marker(series[0]))
    _maybe_log(ax, ([total] if total else []) + list(groups.values()), ratio=10.0)
    handles, _ = ax.get_legend_handles_labels()

    if "optim/clipped_steps" in table:
        clips = _increases(table["optim/clipped_steps"])
        clip_source = "optim/clipped_steps"
    else:
        flagged = {s for steps, values in fam.clipped_flags.values() for s, v in zip(steps, values) if v > 0}
        clips = sorted(flagged)
        clip_source = "optim/clipped/<group>" if fam.clipped_flags else ""
    skips = _increases(table.get("optim/skipped_steps"))
    trans = ax.get_xaxis_transform()
    if clips:
        ax.plot(clips, [0.03] * len(clips), "|", color="tab:orange", markersize=9, markeredgewidth=1.5,
                transform=trans, clip_on=False)
        handles.append(Line2D([], [], color="tab:orange", marker="|", linestyle="", markersize=9,
                              markeredgewidth=1.5, label=f"clipped ({len(clips)} log points)"))
    for s in skips:
        ax.axvline(s, color="tab:red", linewidth=0.8, alpha=0.6, linestyle=":")
    if skips:
        ax.plot(skips, [0.1] * len(skips), "x", color="tab:red", markersize=6, transform=trans, clip_on=False)
        handles.append(Line2D([], [], color="tab:red", marker="x", linestyle=":",
                              label=f"skipped steps ({len(skips)} log points)"))
    counters = []
    if clip_source:
        counters.append(f"{len(clips)} with clipping")
    if "optim/skipped_steps" in table:
        counters.append(f"{len(skips)} with skipped steps")
    note = ", ".join(counters) if counters else "clip/skip counters not logged"

    if fam.lrs:
        ax2 = ax.twinx()
        for g, series in fam.lrs.items():
            (line,) = ax2.plot(*series, linestyle="--", linewidth=1.0, color=layout.colors[("group", g)],
                               label=f"lr {g}")
            handles.append(line)
        ax2.set_ylabel("learning rate", fontsize=8)
        ax2.tick_params(labelsize=7)
        ax2.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    ax.set_xlim(*layout.xlim)
    ax.set_xlabel("step")
    ax.set_ylabel("gradient norm", fontsize=8)
    ax.grid(alpha=0.3)
    ax.set_title(f"optim/grad_norm_total  (log points: {note})", fontsize=10, loc="left")
    _legend(ax, handles)
    return fig


def _loss_figure(fam: _Families, layout: _Layout) -> Any:
    fig, rect = _new_figure(layout, 3.4)
    ax = fig.add_axes(rect)
    for key, (steps, values) in fam.losses.items():
        ax.plot(steps, values, label=key, linewidth=1.1, color=layout.colors[("loss", key)], **_marker(steps))
    _maybe_log(ax, fam.losses.values())
    ax.set_xlim(*layout.xlim)
    ax.set_xlabel("step")
    ax.set_ylabel("loss", fontsize=8)
    ax.grid(alpha=0.3)
    ax.set_title("loss", fontsize=10, loc="left")
    _legend(ax)
    return fig


@dataclass
class _Section:
    name: str  # file stem of the PNG
    title: str
    keys: str  # what would have to be logged
    how_to_read: str
    draw: Callable[[], Any] | None  # returns the matplotlib Figure; None: not logged


_READ = {
    "v_drift": (
        "Each cell is how much that tensor's second-moment estimate v moved from the previous log step to "
        "this one (log scale). A calm run shows a quiet band. A bright vertical stripe, v jumping in many "
        "layers at once, tends to come some steps <em>before</em> a loss spike: v lags a sudden rise of the "
        "gradients, so the updates were already too large when it catches up. A single bright row points at "
        "one unstable layer (often the embedding or the last layers)."
    ),
    "sqrt_v_mean": (
        "Mean of sqrt(v&#770;) per tensor: the typical Adam denominator, i.e. the recent gradient scale "
        "(log scale). Rows that sink by orders of magnitude receive almost no gradient, so their effective "
        "step lr/sqrt(v) grows and they can jump when gradient returns; rows that rise abruptly mark a "
        "gradient blow-up. Embeddings of rare tokens usually sit lowest."
    ),
    "snr": (
        "Pseudo signal-to-noise ratio of the update: the first moment against the square root of the "
        "second. Near 1 the gradient points the same way step after step (signal); near 0 it is mostly "
        "noise and Adam's steps become a random walk. SNR falling across many layers late in training "
        "suggests the learning rate is now too high for the noise (time to decay it). Read it with the "
        "dead-fraction map: a layer with low SNR and many dead entries learns little."
    ),
    "update_ratio": (
        "||update|| / ||parameter|| per step (log scale): how fast each tensor changes relative to its "
        "size. Around 1e-3 is typical of healthy Adam training; 1e-2 and above means the layer is rewritten"
        " every step (learning rate too high, or instability), far below means it is effectively frozen "
        "(warmup, tiny gradients, or an overly large weight norm)."
    ),
    "dead_fraction": (
        "Fraction of a tensor's entries whose gradient/second moment is (near) zero: dead units, unused "
        "vocabulary rows, masked weights (0 to 1). A rising fraction means capacity being lost; for "
        "embeddings it reflects tokens not seen recently. Together with a low SNR it marks layers that have"
        " stopped learning."
    ),
    "embedding": (
        "Top: mean_ratio = ||mean of the embedding rows|| / mean row norm, 0 for embeddings centered on the"
        " origin, 1 when all rows point the same way. A growing mean_ratio means the embeddings drift "
        "together in one direction (anisotropy): with plain Adam the per-row second moment lets rare-token "
        "rows take large steps along the common gradient direction. Coupled Adam shares the second moment "
        "over the vocabulary and should keep it low. Bottom: isotropy (higher = the rows use their "
        "dimensions more evenly), which falls as the same degeneration sets in. Each tensor has one color "
        "in both panels."
    ),
    "grad_norm": (
        "Global gradient norm before clipping (black) and per parameter group (thin lines). Orange ticks at"
        " the bottom: log points at which clipping had triggered since the previous one; red crosses and "
        "dotted lines: log points at which the non-finite guard had skipped a step. Clipping at nearly "
        "every step means the threshold is below the typical norm (it acts as a learning-rate cut); "
        "isolated clips at spikes are what clipping is for. Any skipped step means a NaN/inf gradient: look"
        " at the drift heatmap just before it. Dashed, right axis: learning rate per group, in its group's "
        "color."
    ),
    "loss": (
        "Training and validation loss. All figures share this step axis: compare a loss spike here with the"
        " stripes of the drift heatmap above it, and with the clip events of the gradient-norm figure."
    ),
}


def _heatmap_caption(stat: str, order: str) -> str:
    """The caption of a heatmap: what its statistic says, then how rows, cells and colors read."""
    cells = ("the interval over which the drift is measured" if stat == "v_drift"
             else "colored by the value logged at its right edge")
    return (f"{_READ[stat]} Rows: one per parameter tensor, {_ORDER_TEXT[order]}. Columns: each cell spans "
            f"from the previous log step to its own, {cells}; the axis ends at the run's last logged step. "
            f"{_NOT_LOGGED[0].capitalize()} ({_NOT_LOGGED[1]}): not logged at that step.")


_HEATMAPS = (
    ("v_drift", "Second-moment drift per layer", True, "viridis", None),
    ("sqrt_v_mean", "Second-moment scale per layer: mean sqrt(v)", True, "viridis", None),
    ("snr", "Signal-to-noise ratio per layer", False, "viridis", None),
    ("update_ratio", "Update-to-parameter ratio per layer", True, "viridis", None),
    ("dead_fraction", "Dead fraction per layer", False, "magma", (0.0, 1.0)),
)


def _sections(fam: _Families, table: Table, layout: _Layout) -> list[_Section]:
    out = []
    for stat, title, log, cmap, vrange in _HEATMAPS:
        draw = None
        if fam.per_param.get(stat):
            def draw(stat=stat, log=log, cmap=cmap, vrange=vrange) -> Any:
                return _heatmap(stat, fam, layout, log=log, cmap=cmap, vrange=vrange)
        out.append(_Section(stat, title, f"optim/{stat}/&lt;parameter&gt;", _heatmap_caption(stat, fam.order),
                            draw))
    has_emb = bool(fam.embedding.get("mean_ratio") or fam.embedding.get("isotropy"))
    out.append(_Section("embedding", "Embedding anisotropy", "embedding/mean_ratio/&lt;name&gt;, "
                        "embedding/isotropy/&lt;name&gt;", _READ["embedding"],
                        (lambda: _embedding_figure(fam, layout)) if has_emb else None))
    has_gn = "optim/grad_norm_total" in table or bool(fam.group_norms)
    out.append(_Section("grad_norm", "Gradient norm, clipping and skipped steps", "optim/grad_norm_total",
                        _READ["grad_norm"],
                        (lambda: _grad_norm_figure(fam, table, layout)) if has_gn else None))
    out.append(_Section("loss", "Loss", "train/loss, val/loss", _READ["loss"],
                        (lambda: _loss_figure(fam, layout)) if fam.losses else None))
    return out


def _page(kind: str, table: Table) -> tuple[_Families, _Layout, list[_Section]]:
    """The families, shared layout and sections (each with its figure-drawing function) of a page."""
    fam = _classify(table, keep_order=(kind == "csv"))
    layout = _layout(fam, table)
    return fam, layout, _sections(fam, table, layout)


# --------------------------------------------------------------------------------------
# HTML


def _fmt(x: float) -> str:
    return f"{x:.4g}" if math.isfinite(x) else str(x)


def _fmt_step(s: float) -> str:
    return str(int(s)) if float(s).is_integer() else f"{s:g}"


def _tables(fam: _Families) -> str:
    e = html.escape
    rows = []
    for key, (steps, values) in sorted(fam.scalars.items()):
        if steps:
            rows.append(f"<tr><td>{e(key)}</td><td>{_fmt_step(steps[-1])}</td>"
                        f"<td>{_fmt(values[-1])}</td></tr>")
    parts = ["<h2 id='last'>Last values</h2>"]
    if rows:
        head = "<tr><th>key</th><th>step</th><th>last value</th></tr>"
        parts.append(f"<table>{head}{''.join(rows)}</table>")
    if fam.per_param:
        summary = []
        for stat in PARAM_STATS:
            data = fam.per_param.get(stat)
            if not data:
                continue
            last = sorted((v[-1], name) for name, (_, v) in data.items() if v and math.isfinite(v[-1]))
            if not last:
                continue
            half = len(last) // 2
            med = last[half][0] if len(last) % 2 else (last[half - 1][0] + last[half][0]) / 2
            summary.append(
                f"<tr><td>optim/{e(stat)}/*</td><td>{len(data)}</td><td>{_fmt(last[0][0])}</td>"
                f"<td>{_fmt(med)}</td>"
                f"<td>{_fmt(last[-1][0])}</td><td>{e(last[-1][1])}</td></tr>"
            )
        parts.append("<h3>Per-parameter statistics, last logged value across tensors</h3>"
                     "<table><tr><th>stat</th><th>tensors</th><th>min</th><th>median</th><th>max</th>"
                     "<th>max at</th></tr>"
                     + "".join(summary) + "</table>")
        stats = [s for s in PARAM_STATS if s in fam.per_param]
        head = "".join(f"<th>{e(s)}</th>" for s in stats)
        body = []
        for name in fam.layers:
            cells = []
            for s in stats:
                series = fam.per_param[s].get(name)
                cells.append(f"<td>{_fmt(series[1][-1])}</td>" if series and series[1] else "<td></td>")
            body.append(f"<tr><td>{e(name)}</td>{''.join(cells)}</tr>")
        parts.append(f"<details><summary>All per-parameter last values ({len(fam.layers)} tensors)</summary>"
                     f"<table><tr><th>parameter</th>{head}</tr>{''.join(body)}</table></details>")
    return "\n".join(parts)


_CSS = """
body{font-family:-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;margin:1.5em auto;max-width:1150px;
color:#222;padding:0 1em}
h1{font-size:1.35em;word-break:break-all}h2{font-size:1.1em;margin-top:1.8em;border-bottom:1px solid #ddd}
h3{font-size:1em}p.read{max-width:1100px;line-height:1.45;color:#333}p.missing{color:#777;font-style:italic}
img{width:100%;max-width:1100px;height:auto;display:block}.meta{color:#555;font-size:.9em}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0}td,th{border:1px solid #ddd;padding:2px 8px;
text-align:right}td:first-child,th:first-child{text-align:left;font-family:monospace}nav a{margin-right:1em}
"""


def _write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def render(run_dir: str | Path, out_html: str | Path | None = None, *, source: str = "auto") -> Path:
    """Write the dashboard of the run under ``run_dir`` and return the HTML file's path.

    ``out_html`` defaults to ``run_dir/dashboard.html``. The page embeds its PNG figures as
    base64 data URIs (no network, no external CSS or JS); the same PNGs are written to
    ``<out stem>_figures/<figure>.png`` (stale figures from an earlier render are removed).
    Files are replaced atomically. Raises :class:`NoMetricsError` when there are no metrics.
    """
    kind, path, table = _load(run_dir, source)
    fam, _, sections = _page(kind, table)

    root = Path(run_dir)
    if out_html is None:
        out_html = (root if root.is_dir() else root.parent) / "dashboard.html"
    out = Path(out_html)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig_dir = out.with_name(f"{out.stem}_figures")
    fig_dir.mkdir(exist_ok=True)

    e = html.escape
    body = []
    for sec in sections:
        body.append(f"<h2 id='{sec.name}'>{e(sec.title)}</h2>")
        png_path = fig_dir / f"{sec.name}.png"
        if sec.draw is None:
            body.append(f"<p class='missing'>not logged in this run: {sec.keys}</p>")
            png_path.unlink(missing_ok=True)
            continue
        png = _png(sec.draw())
        _write_bytes(png_path, png)
        body.append(f"<p class='read'>{sec.how_to_read}</p>")
        uri = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
        body.append(f"<img alt='{e(sec.title)}' src='{uri}'>")

    steps = [s for series in table.values() for s in series[0]]
    nav = " ".join(f"<a href='#{s.name}'>{e(s.title)}</a>" for s in sections)
    origin = "Lightning CSVLogger" if kind == "csv" else "W&amp;B run file"
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>Optimizer dashboard: {e(str(run_dir))}</title>
<style>{_CSS}</style></head><body>
<h1>Optimizer dashboard: {e(str(run_dir))}</h1>
<p class="meta">Metrics from {e(str(path))} ({origin}): {len(table)} series, {len(fam.layers)} parameter
tensors, steps {_fmt_step(min(steps))} to {_fmt_step(max(steps))}.
Written by <code>python -m lightning_optim.dashboard</code>; figures also in {e(fig_dir.name)}/.</p>
<nav>{nav} <a href='#last'>Last values</a></nav>
{chr(10).join(body)}
{_tables(fam)}
</body></html>
"""
    _write_bytes(out, page.encode("utf-8"))
    return out


# --------------------------------------------------------------------------------------
# CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lightning_optim.dashboard",
        description="Write an HTML dashboard (with PNG figures) of a run's optimizer statistics.",
    )
    parser.add_argument("run_dir", help="run directory (searched for metrics.csv or a W&B run), "
                        "or the metrics file itself")
    parser.add_argument("-o", "--output", help="HTML file to write (default: RUN_DIR/dashboard.html)")
    parser.add_argument("--source", choices=("auto", "csv", "wandb"), default="auto",
                        help="which metrics to read when the run has both (default: metrics.csv first)")
    args = parser.parse_args(argv)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", MetricsFileWarning)
        try:
            out = render(args.run_dir, args.output, source=args.source)
        except (OSError, ValueError) as exc:
            out = None
            error = "error: " + " ".join(str(exc).splitlines())
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    if out is None:
        print(error, file=sys.stderr)
        return 2
    print(out)
    return 0

