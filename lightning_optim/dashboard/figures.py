"""The dashboard's figures, drawn with matplotlib (the ``dashboard`` extra).

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

All figures share one step axis (:class:`_Layout`), from the first logged step (or the first
cell's left edge) to the last logged step, so a stripe in a heatmap lines up with the loss
spike it precedes; a tensor, group or loss has one line color in every figure. Matplotlib
draws without pyplot (no global backend is switched), with sizes and margins that depend only
on the metrics, so the output is deterministic for given inputs. Matplotlib is imported inside
the drawing functions: importing this module needs only the standard library.
"""

from __future__ import annotations

import io
import itertools
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from .metrics import Series, Table, _Families

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


#: The heatmaps, in page order: (statistic, title, log color scale, colormap, fixed value range).
_HEATMAPS = (
    ("v_drift", "Second-moment drift per layer", True, "viridis", None),
    ("sqrt_v_mean", "Second-moment scale per layer: mean sqrt(v)", True, "viridis", None),
    ("snr", "Signal-to-noise ratio per layer", False, "viridis", None),
    ("update_ratio", "Update-to-parameter ratio per layer", True, "viridis", None),
    ("dead_fraction", "Dead fraction per layer", False, "magma", (0.0, 1.0)),
)


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
