"""The dashboard page of a run: ``python -m lightning_optim.dashboard RUN_DIR [-o OUT.html]``.

Usage::

    python -m lightning_optim.dashboard RUN_DIR [-o OUT.html] [--source auto|csv|wandb]

prints the path of the page it wrote (default ``RUN_DIR/dashboard.html``); the figures are
also saved as PNG files in ``<OUT stem>_figures/`` beside it. It exits with status 2 and a
one-line message when ``RUN_DIR`` has no metrics, or when matplotlib (the ``dashboard``
extra) is not installed. Works on a finished, a running, a killed or a resumed run. Warnings
(skipped lines) go to stderr as ``warning: ...`` lines.

The page: one section per figure of :mod:`lightning_optim.dashboard.figures`, each with how to
read it (a figure whose keys were not logged is replaced by a "not logged in this run" note),
then the last value of every run-level key, a summary of the per-parameter statistics and
(folded) their full table. What is read, and how damaged files are handled:
:mod:`lightning_optim.dashboard.metrics`.

Python API: :func:`render`, and :func:`~lightning_optim.dashboard.metrics.load_run` /
:func:`~lightning_optim.dashboard.metrics.find_metrics` for the series alone.
"""

from __future__ import annotations

import argparse
import base64
import html
import math
import os
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..extras import MissingExtraError, require
from .figures import (
    _HEATMAPS,
    _NOT_LOGGED,
    _Layout,
    _embedding_figure,
    _grad_norm_figure,
    _heatmap,
    _layout,
    _loss_figure,
    _png,
)
from .metrics import (
    _ORDER_TEXT,
    PARAM_STATS,
    MetricsFileWarning,
    Table,
    _classify,
    _Families,
    _load,
)

__all__ = ["render", "main"]


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
    Files are replaced atomically. Raises :class:`NoMetricsError` when there are no metrics,
    and :class:`~lightning_optim.extras.MissingExtraError` (before reading anything) when
    matplotlib is not installed.
    """
    require("matplotlib", extra="dashboard", feature="the dashboard")
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
        except (OSError, ValueError, MissingExtraError) as exc:
            out = None
            error = "error: " + " ".join(str(exc).splitlines())
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    if out is None:
        print(error, file=sys.stderr)
        return 2
    print(out)
    return 0

