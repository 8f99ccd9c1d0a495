"""The dashboard (lightning_optim.dashboard) and the W&B record-log reader (lightning_optim.dashboard.wandb_history)."""

from __future__ import annotations

import base64
import csv
import io
import json
import math
import os
import re
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("matplotlib")
from PIL import Image  # noqa: E402  (matplotlib depends on pillow)

from lightning_optim.dashboard import figures, metrics, report  # noqa: E402
from lightning_optim.dashboard import wandb_history  # noqa: E402
from lightning_optim.dashboard import load_run, render  # noqa: E402
from lightning_optim.dashboard.wandb_history import BLOCK_SIZE, iter_records, read_history  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PNG_URI = re.compile(r"data:image/png;base64,([A-Za-z0-9+/=]+)")
GROUPS = ("embedding", "decay", "no_decay")
HEATMAP_STATS = ("v_drift", "sqrt_v_mean", "snr", "update_ratio", "dead_fraction")
ALL_FIGURES = 8  # five heatmaps, embeddings, grad norm, loss


def layer_names(n: int) -> list[str]:
    kinds = ("ln_1.weight", "attn.c_attn.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    return ["transformer.wte.weight"] + [f"transformer.blocks.{i // 4}.{kinds[i % 4]}" for i in range(n - 1)]


def write_csv_run(run_dir: Path, *, n_layers: int = 30, n_steps: int = 100, every: int = 2,
                  per_param: bool = True, embedding: bool = True, grad_norm: bool = True,
                  loss: bool = True) -> dict:
    """A metrics.csv as Lightning's CSVLogger writes it: sorted columns, a ``step`` column and
    sparse rows (training rows every step, monitor statistics every ``every`` steps, separate
    validation rows). Returns what was written, for the assertions."""
    rng = np.random.default_rng(0)
    layers = layer_names(n_layers)
    rows: list[dict] = []
    clipped = skipped = 0
    clip_steps, skip_steps = [], []
    for s in range(1, n_steps + 1):
        row: dict = {"step": s, "epoch": 0}
        if loss:
            row["train/loss"] = 5 * math.exp(-s / 40) + 0.1 * rng.random() + (2.0 if s == 70 else 0.0)
        if grad_norm:
            row["optim/grad_norm_total"] = 1 + rng.random() + (10.0 if s == 68 else 0.0)
            if s % 7 == 0:
                clipped += 1
                clip_steps.append(s)
            if s == 68:
                skipped += 1
                skip_steps.append(s)
            row["optim/clipped_steps"] = float(clipped)
            row["optim/skipped_steps"] = float(skipped)
            for g in GROUPS:
                row[f"optim/lr/{g}"] = 1e-3 * min(1.0, s / 10)
                row[f"optim/grad_norm/{g}"] = rng.random()
                row[f"optim/clipped/{g}"] = float(s % 7 == 0)
        if s % every == 0:
            if per_param:
                for i, name in enumerate(layers):
                    burst = 100.0 if 64 <= s <= 68 else 1.0
                    row[f"optim/v_drift/{name}"] = 1e-3 * (1 + rng.random()) * burst
                    row[f"optim/sqrt_v_mean/{name}"] = 10 ** (-3 - i / 10) * (1 + 0.1 * rng.random())
                    row[f"optim/snr/{name}"] = rng.random()
                    row[f"optim/update_ratio/{name}"] = 1e-3 * (1 + rng.random())
                    row[f"optim/dead_fraction/{name}"] = 0.2 * rng.random()
                    row[f"optim/grad_norm/{name}"] = rng.random()
            if embedding:
                row[f"embedding/mean_ratio/{layers[0]}"] = 0.01 * s
                row[f"embedding/isotropy/{layers[0]}"] = 1 - 0.005 * s
                row[f"embedding/mean_norm/{layers[0]}"] = 0.02 * s
        rows.append(row)
        if loss and s % 10 == 0:
            rows.append({"step": s, "epoch": 0, "val/loss": 1.0 / s})
    keys = sorted(set().union(*rows))
    path = run_dir / "logs" / "metrics.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, keys)
        writer.writeheader()
        writer.writerows(rows)
    return {"rows": rows, "layers": layers, "clip_steps": clip_steps, "skip_steps": skip_steps, "path": path}


def embedded_pngs(html_text: str) -> list[bytes]:
    return [base64.b64decode(m) for m in PNG_URI.findall(html_text)]


def assert_real_image(png: bytes) -> None:
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    with Image.open(io.BytesIO(png)) as im:
        pixels = np.asarray(im.convert("RGB"), dtype=np.float64)
    assert pixels.shape[0] > 100 and pixels.shape[1] > 500
    assert pixels.std() > 5.0, "blank image"


# --------------------------------------------------------------------------------------
# CSV runs


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("full_run")
    info = write_csv_run(run_dir)
    out = render(run_dir, run_dir / "report" / "dash.html")
    return run_dir, info, out


def test_load_run_reads_sparse_csv(full_run):
    run_dir, info, _ = full_run
    table = load_run(run_dir)
    assert "step" not in table
    steps, values = table["val/loss"]
    assert steps == list(range(10, 101, 10))  # only the validation rows, the empty cells skipped
    assert values == pytest.approx([1.0 / s for s in steps])
    steps, values = table["train/loss"]
    assert steps == list(range(1, 101)) and len(values) == 100
    name = info["layers"][5]
    steps, values = table[f"optim/v_drift/{name}"]
    assert steps == list(range(2, 101, 2))
    written = [r[f"optim/v_drift/{name}"] for r in info["rows"] if f"optim/v_drift/{name}" in r]
    assert values == pytest.approx(written)
    assert table["optim/clipped_steps"][1][-1] == len(info["clip_steps"])


def test_render_full_run(full_run):
    run_dir, info, out = full_run
    assert out == run_dir / "report" / "dash.html" and out.is_file()
    text = out.read_text()
    pngs = embedded_pngs(text)
    assert len(pngs) == ALL_FIGURES
    for png in pngs:
        assert_real_image(png)
    # the same figures beside the page
    files = sorted((run_dir / "report" / "dash_figures").glob("*.png"))
    assert {f.stem for f in files} == {*HEATMAP_STATS, "embedding", "grad_norm", "loss"}
    assert sorted(f.read_bytes() for f in files) == sorted(pngs)
    # self-contained, titled, explained
    assert "not logged in this run" not in text
    assert "<script" not in text and "<link" not in text and "http://" not in text and "https://" not in text
    assert str(run_dir) in text.split("</h1>")[0]
    assert text.count("class='read'") == ALL_FIGURES
    assert "anisotropy" in text and "Coupled Adam" in text and "before</em> a loss spike" in text


def test_last_values_table_and_group_ambiguity(full_run):
    _, info, out = full_run
    text = out.read_text()
    last = text.split("id='last'")[1]
    assert "<td>train/loss</td><td>100</td>" in last
    assert f"<td>optim/skipped_steps</td><td>100</td><td>{len(info['skip_steps'])}</td>" in last
    # optim/grad_norm/<group> is a group series; optim/grad_norm/<param> a per-parameter one
    assert "<td>optim/grad_norm/decay</td>" in last
    assert "<td>optim/grad_norm/*</td><td>30</td>" in last
    assert "<td>optim/v_drift/*</td><td>30</td>" in last


def test_layer_order_is_model_like(full_run):
    _, info, out = full_run
    details = out.read_text().split("<details>")[1]
    order = re.findall(r"<tr><td>([^<]+)</td><td>", details)
    # the CSV's columns are sorted (blocks.10 before blocks.2, wte last); rows come back
    # embedding first, then numeric-aware
    assert order[0] == "transformer.wte.weight"
    assert order.index("transformer.blocks.1.ln_1.weight") < order.index("transformer.blocks.7.ln_1.weight")
    assert sorted(order) == sorted(info["layers"])


def test_layer_order_natural_sort_across_ten():
    table = {f"optim/v_drift/blocks.{i}.w": ([1], [1.0]) for i in sorted(range(12), key=str)}
    fam = metrics._classify(table, keep_order=True)
    assert fam.layers == [f"blocks.{i}.w" for i in range(12)]
    unsorted = {f"optim/v_drift/{n}": ([1], [1.0]) for n in ("z.w", "a.w", "m.w")}  # model order kept
    assert metrics._classify(unsorted, keep_order=True).layers == ["z.w", "a.w", "m.w"]
    assert metrics._classify(unsorted, keep_order=False).layers == ["a.w", "m.w", "z.w"]


@pytest.mark.parametrize("names, labels", [
    (["a.b", "a.c"], ["a.b", "a.c"]),  # two parts at least
    (["model.transformer.wte.weight", "model.head.weight"], ["wte.weight", "head.weight"]),
    (["h.0.attn.w", "h.1.attn.w"], ["h.0.attn.w", "h.1.attn.w"]),  # an index takes its container's name
    (["x.a.weight", "a.weight"], ["x.a.weight", "a.weight"]),  # a name that is another's suffix stays whole
    (["only.one.name"], ["one.name"]),
    (["scale"], ["scale"]),
    (["enc.layers.0.linear1.bias", "dec.layers.0.linear1.bias", "dec.layers.1.linear1.bias"],
     ["enc.layers.0.linear1.bias", "dec.layers.0.linear1.bias", "layers.1.linear1.bias"]),
])
def test_short_labels_table(names, labels):
    assert figures._short_labels(names) == labels


def test_short_labels_of_lightning_demo_transformer():
    demos = pytest.importorskip("lightning.pytorch.demos")
    names = [n for n, _ in demos.Transformer(vocab_size=33).named_parameters()]
    labels = figures._short_labels(names)
    assert len(set(labels)) == len(names) == 67
    for name, label in zip(names, labels):
        parts, short = name.split("."), label.split(".")
        assert parts[-len(short):] == short, (name, label)  # a suffix of whole dotted parts
        others = [n.split(".") for n in names if n != name]
        assert not any(o[-len(short):] == short for o in others), label  # names one tensor only
        if len(short) > 2 and not parts[-len(short) + 1].isdigit():
            shorter = short[1:]  # one part less would be ambiguous
            assert any(o[-len(shorter):] == shorter for o in others), label
    got = dict(zip(names, labels))
    # the old cut drew both of these as "transformer...layers.0.linear1.bias"
    assert got["transformer.encoder.layers.0.linear1.bias"] == "encoder.layers.0.linear1.bias"
    assert got["transformer.decoder.layers.0.linear1.bias"] == "decoder.layers.0.linear1.bias"
    assert got["transformer.encoder.norm.weight"] == "encoder.norm.weight"
    assert got["embedding.weight"] == "embedding.weight" and got["decoder.weight"] == "decoder.weight"
    # the heatmap of a run of this model shows exactly these labels, each once
    table = {f"optim/v_drift/{n}": ([10, 20], [1e-3, 2e-3]) for n in names}
    _, layout, sections = report._page("csv", table)
    fig = sections[0].draw()
    shown = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert sorted(shown) == sorted(labels)
    # the left margin widens to the longest label, the same for every figure of the page
    longest = max(map(len, labels))
    assert layout.left == pytest.approx((0.25 + 0.067 * longest) / figures._WIDTH)
    assert fig.axes[0].get_position().x0 == pytest.approx(layout.left)


def monitor_table(monitor_steps, loss_steps, *, names=("blocks.0.w", "blocks.1.w")):
    """A run's table as the reader returns it: per-parameter stats at the monitor's steps (no
    v_drift at the first, as MomentMonitor logs it), train/loss at its own steps."""
    table = {"train/loss": (list(loss_steps), [1.0 / (1 + s) for s in loss_steps])}
    for i, name in enumerate(names):
        table[f"optim/sqrt_v_mean/{name}"] = (list(monitor_steps), [1e-3 * (i + 1)] * len(monitor_steps))
        table[f"optim/v_drift/{name}"] = (list(monitor_steps[1:]), [0.1 * (i + 1)] * (len(monitor_steps) - 1))
    return table


def heatmap(table, stat):
    _, layout, sections = report._page("csv", table)
    fig = next(s for s in sections if s.name == stat).draw()
    return fig, fig.axes[0], fig.axes[0].collections[0], layout


@pytest.mark.parametrize("monitor, loss", [
    ([10, 20, 30, 40, 50, 60], range(9, 60, 10)),  # monitor one step after Lightning's loss rows
    ([10, 20, 30, 40, 50, 60], range(10, 61, 10)),  # both at the same optimizer steps
    ([10, 20, 35, 60], range(1, 61)),  # irregular log steps (e.g. a resume with another cadence)
])
def test_heatmap_cells_span_the_interval_they_measure(monitor, loss):
    table = monitor_table(monitor, loss)
    _, ax, mesh, layout = heatmap(table, "v_drift")
    xs = mesh.get_coordinates()[0, :, 0]
    # v_drift at step s measures the change since the previous log step: cell [prev, s]
    assert list(xs) == monitor
    last = max(monitor[-1], max(loss))
    first = min(monitor[0] - min(b - a for a, b in zip(monitor, monitor[1:])), min(loss))
    assert ax.get_xlim() == (max(first, 0), last)  # the axis stops at the last logged step
    # the other statistics: the cell ends at its log step too; the first one takes the shortest interval
    _, ax, mesh, _ = heatmap(table, "sqrt_v_mean")
    gap = min(b - a for a, b in zip(monitor, monitor[1:]))
    assert list(mesh.get_coordinates()[0, :, 0]) == [monitor[0] - gap, *monitor]
    assert ax.get_xlim() == layout.xlim
    # every figure of the page shares the axis
    _, layout, sections = report._page("csv", table)
    for sec in sections:
        if sec.draw is not None:
            assert sec.draw().axes[0].get_xlim() == layout.xlim, sec.name


def test_heatmap_not_logged_color_and_colorbar_label():
    from matplotlib.colors import to_rgba

    table = monitor_table([10, 20, 30], range(10, 31, 10))
    _, values = table["optim/v_drift/blocks.1.w"]
    table["optim/v_drift/blocks.1.w"] = ([20], [values[0]])  # not logged at 30
    fig, ax, mesh, _ = heatmap(table, "v_drift")
    figures._png(fig)  # draws, which maps the values to colors
    name, hexa = figures._NOT_LOGGED
    gray = to_rgba(name)
    assert gray == to_rgba(hexa) == to_rgba("#808080")
    assert tuple(mesh.cmap.get_bad()) == gray and ax.get_facecolor() == gray
    colors = mesh.get_facecolors().reshape(2, 2, 4)  # rows blocks.0, blocks.1; columns 20, 30
    assert tuple(colors[1, 1]) == gray
    assert all(tuple(c) != gray for c in (colors[0, 0], colors[0, 1], colors[1, 0]))
    # the caption names that color
    caption = next(s for s in report._page("csv", table)[2] if s.name == "v_drift").how_to_read
    assert f"{name.capitalize()} ({hexa}): not logged at that step." in caption
    # the color bar gives the definition of lightning_optim.stats: ||v_s - v_s'|| / ||v_s'||
    label = fig.axes[1].get_ylabel()
    assert label == r"v_drift $= \Vert\hat{v}_s - \hat{v}_{s'}\Vert\ /\ \Vert\hat{v}_{s'}\Vert$"
    for stat in HEATMAP_STATS:  # every color bar carries its statistic's name and a formula
        assert figures._COLORBAR[stat].startswith(stat) and "$" in figures._COLORBAR[stat]


def test_one_color_per_tensor_across_figures():
    from matplotlib.colors import to_rgba

    table = monitor_table([10, 20, 30], range(10, 31, 10), names=("wte.weight", "wpe.weight", "h.0.w"))
    # the two panels' series arrive in opposite orders
    table["embedding/mean_ratio/wpe.weight"] = ([10, 20], [0.1, 0.2])
    table["embedding/mean_ratio/wte.weight"] = ([10, 20], [0.3, 0.4])
    table["embedding/isotropy/wte.weight"] = ([10, 20], [0.9, 0.8])
    table["embedding/isotropy/wpe.weight"] = ([10, 20], [0.7, 0.6])
    for g in ("decay", "no_decay"):
        table[f"optim/lr/{g}"] = ([10, 20], [1e-3, 1e-3])
        table[f"optim/grad_norm/{g}"] = ([10, 20], [1.0, 2.0])
    table["optim/grad_norm_total"] = ([10, 20], [1.0, 2.0])
    fam, layout, sections = report._page("csv", table)
    figs = {s.name: s.draw() for s in sections if s.draw is not None}

    def lines(fig):
        out = {}
        for ax in fig.axes:
            for line in ax.get_lines():
                out.setdefault(line.get_label(), set()).add(to_rgba(line.get_color()))
        return out

    emb = figs["embedding"]
    top, bottom = emb.axes
    # both legends in row order (the logged order here), not in each panel's arrival order
    assert fam.layers[:2] == ["wte.weight", "wpe.weight"]
    assert [t.get_text() for t in top.get_legend().get_texts()] == \
           [t.get_text() for t in bottom.get_legend().get_texts()] == ["wte.weight", "wpe.weight"]
    by_label = lines(emb)
    assert all(len(c) == 1 for c in by_label.values())  # the same color in both panels
    assert by_label["wpe.weight"] != by_label["wte.weight"]
    gn = lines(figs["grad_norm"])
    for g in ("decay", "no_decay"):  # a group's grad norm and lr: one color
        assert gn[f"grad norm {g}"] == gn[f"lr {g}"]
    # no two things share a color across the page
    all_colors = [c for key, c in layout.colors.items()]
    assert len(set(all_colors)) == len(all_colors)
    assert gn["grad norm decay"] != by_label["wpe.weight"]
    assert lines(figs["loss"])["train/loss"] == {to_rgba(layout.colors[("loss", "train/loss")])}


@pytest.mark.parametrize("logged, order, expected", [
    # Lightning's CSVLogger sorts its columns: embeddings first, then numeric-aware
    (["h.10.w", "h.2.w", "wte.weight"], "sorted", ["wte.weight", "h.2.w", "h.10.w"]),
    # a source that keeps the model's order
    (["wte.weight", "h.2.w", "h.10.w", "head.w"], "logged", ["wte.weight", "h.2.w", "h.10.w", "head.w"]),
])
def test_rows_in_the_order_the_page_states(logged, order, expected):
    table = {f"optim/sqrt_v_mean/{n}": ([10], [1.0]) for n in logged}
    table["embedding/mean_ratio/wte.weight"] = ([10], [0.1])
    fam, layout, sections = report._page("csv", table)
    assert fam.order == order and fam.layers == expected
    sec = sections[1]
    assert sec.name == "sqrt_v_mean" and metrics._ORDER_TEXT[order] in sec.how_to_read
    shown = [t.get_text() for t in sec.draw().axes[0].get_yticklabels()]
    assert shown == [layout.labels[n] for n in expected]  # top to bottom


def test_missing_families_get_notes(tmp_path):
    write_csv_run(tmp_path, n_layers=4, n_steps=20, per_param=False, embedding=False)
    out = render(tmp_path)
    assert out == tmp_path / "dashboard.html"
    text = out.read_text()
    pngs = embedded_pngs(text)
    assert len(pngs) == 2  # grad norm and loss only
    for png in pngs:
        assert_real_image(png)
    for stat in HEATMAP_STATS:
        assert f"not logged in this run: optim/{stat}/&lt;parameter&gt;" in text
    assert ("not logged in this run: embedding/mean_ratio/&lt;name&gt;, "
            "embedding/isotropy/&lt;name&gt;") in text
    assert {f.stem for f in (tmp_path / "dashboard_figures").glob("*.png")} == {"grad_norm", "loss"}
    # deterministic: the same input gives the same page
    first = out.read_bytes()
    assert render(tmp_path).read_bytes() == first

    # a later render with less data removes the figure it no longer draws
    write_csv_run(tmp_path, n_layers=4, n_steps=20, per_param=False, embedding=False, loss=False)
    text = render(tmp_path).read_text()
    assert len(embedded_pngs(text)) == 1
    assert "not logged in this run: train/loss, val/loss" in text
    assert {f.stem for f in (tmp_path / "dashboard_figures").glob("*.png")} == {"grad_norm"}


def test_per_parameter_only_run(tmp_path):
    write_csv_run(tmp_path, n_layers=3, n_steps=6, grad_norm=False, loss=False, embedding=False)
    text = render(tmp_path, tmp_path / "x.html").read_text()
    assert len(embedded_pngs(text)) == len(HEATMAP_STATS)
    assert "not logged in this run: optim/grad_norm_total" in text


def test_no_metrics_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path))):
        load_run(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        render(tmp_path / "nope")
    (tmp_path / "metrics.csv").write_text("epoch,loss\n0,1.0\n")
    with pytest.raises(ValueError, match="no 'step' column"):
        load_run(tmp_path)


# --------------------------------------------------------------------------------------
# W&B offline run


@pytest.fixture(scope="module")
def wandb_run(tmp_path_factory):
    wandb = pytest.importorskip("wandb")
    root = tmp_path_factory.mktemp("wandb_run")
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DISABLE_GIT": "true",
           "WANDB_DISABLE_CODE": "true", "WANDB_CONSOLE": "off", "WANDB_DIR": str(root)}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    logged = []
    try:
        run = wandb.init(dir=str(root), mode="offline", project="dashboard-test",
                         settings=wandb.Settings(disable_git=True, save_code=False, console="off"))
        for step in range(6):
            row = {
                "train/loss": 2.0 / (step + 1),
                "optim/grad_norm_total": 1.0 + step,
                "optim/lr/decay": 1e-3,
                "optim/skipped_steps": float(step >= 4),
                "optim/v_drift/blocks.0.attn.c_attn.weight": 0.1 * (step + 1),
                "optim/v_drift/blocks.1.mlp.c_fc.weight": 0.2 * (step + 1),
                "trainer/global_step": 10 * step,  # as Lightning's WandbLogger logs it
                "optim/log10_sqrt_v/blocks.0.attn.c_attn.weight": wandb.Histogram(np.arange(10.0) + step),
            }
            run.log(row)
            logged.append(row)
        run.finish()
        # the wandb-core service may still hold the run file's last block in its buffer after
        # finish() returns: shutting it down closes the file
        wandb.teardown()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return root, logged


def test_read_history_of_a_real_offline_run(wandb_run):
    root, logged = wandb_run
    run_dirs = list((root / "wandb").glob("offline-run-*"))
    assert len(run_dirs) == 1
    for where in (root, root / "wandb", run_dirs[0], next(run_dirs[0].glob("run-*.wandb"))):
        rows = read_history(where)
        assert [r["_step"] for r in rows] == list(range(len(logged)))
    for row, sent in zip(rows, logged):
        for key, value in sent.items():
            if key.startswith("optim/log10_sqrt_v/"):
                hist = row[key]
                assert wandb_history.is_histogram(hist)
                assert len(hist["bins"]) == len(hist["values"]) + 1 and sum(hist["values"]) == 10
            else:
                assert row[key] == pytest.approx(value), key


def test_dashboard_from_a_wandb_run(wandb_run, tmp_path):
    root, logged = wandb_run
    table = load_run(root)
    # histograms and W&B's own keys are not numeric series
    assert not any(k.startswith("optim/log10_sqrt_v") or k.startswith("_") for k in table)
    assert "trainer/global_step" not in table
    steps, values = table["train/loss"]
    assert steps == [10 * i for i in range(len(logged))]  # Lightning's step, not W&B's _step
    assert values == pytest.approx([r["train/loss"] for r in logged])
    out = render(root, tmp_path / "wb.html")
    text = out.read_text()
    pngs = embedded_pngs(text)
    assert len(pngs) == 3  # v_drift heatmap, grad norm, loss
    for png in pngs:
        assert_real_image(png)
    assert "W&amp;B run file" in text
    assert "not logged in this run: optim/snr/&lt;parameter&gt;" in text


# --------------------------------------------------------------------------------------
# The record log, by hand


def chunk(ctype: int, payload: bytes) -> bytes:
    crc = zlib.crc32(bytes([ctype]) + payload)
    return struct.pack("<IHB", crc, len(payload), ctype) + payload


def write_log(path: Path, records: list[bytes]) -> list[int]:
    """W&B's writer, as specified: returns the chunk types written, in order."""
    out = bytearray(b":W&B" + struct.pack("<HB", 0xBEE1, 0))
    types = []
    for record in records:
        rest, first = record, True
        while True:
            left = BLOCK_SIZE - len(out) % BLOCK_SIZE
            if left < 7:
                out += b"\x00" * left
                left = BLOCK_SIZE
            piece, rest = rest[: left - 7], rest[left - 7:]
            ctype = (1 if first else 4) if not rest else (2 if first else 3)
            out += chunk(ctype, piece)
            types.append(ctype)
            first = False
            if not rest:
                break
    path.write_bytes(bytes(out))
    return types


def history_record(step: int, items: dict, typed: dict | None = None) -> bytes:
    from wandb.proto import wandb_internal_pb2 as pb

    rec = pb.Record()
    rec.history.step.num = step
    for key, value in items.items():
        item = rec.history.item.add()
        item.nested_key.extend(key if isinstance(key, tuple) else [key])
        item.value_json = json.dumps(value)
    for key, (field, value) in (typed or {}).items():
        item = rec.history.item.add()
        item.key = key
        if field == "none":
            item.none = 0
        else:
            setattr(item, field, value)
    return rec.SerializeToString()


def other_record(text: str) -> bytes:
    from wandb.proto import wandb_internal_pb2 as pb

    rec = pb.Record()
    rec.output_raw.line = text
    return rec.SerializeToString()


def test_record_spanning_blocks(tmp_path):
    big = list(range(20000))  # ~110 KB of JSON: FIRST, MIDDLE, MIDDLE, LAST
    first = history_record(0, {"_step": 0, "train/loss": 1.5, ("h", "_type"): "histogram",
                               ("h", "values"): [1, 2]})
    # a filler sized so that block 0 ends in a 3-byte tail, shorter than a chunk header (padding)
    target = BLOCK_SIZE - 3 - 7 - (7 + len(first)) - 7
    length = target
    while len(other_record("x" * length)) != target:
        length += target - len(other_record("x" * length))
    filler = other_record("x" * length)
    records = [
        first,
        filler,
        history_record(1, {"_step": 1, "big": big, "train/loss": 0.75}),
        history_record(2, {"train/loss": 0.5},
                       typed={"i": ("integer", 2**40 + 1), "f": ("number", 0.25), "t": ("text", "ok"),
                              "b": ("boolean", True), "j": ("json", "[1, 2]"), "n": ("none", None)}),
    ]
    path = tmp_path / "run-hand.wandb"
    types = write_log(path, records)
    assert types[:2] == [1, 1] and types[2:].count(3) >= 1 and 2 in types and 4 in types
    data = path.read_bytes()
    assert len(data) > 3 * BLOCK_SIZE and data[BLOCK_SIZE - 3:BLOCK_SIZE] == b"\x00\x00\x00"
    assert list(iter_records(path)) == records

    rows = read_history(path)
    assert rows[0] == {"_step": 0, "train/loss": 1.5, "h": {"_type": "histogram", "values": [1, 2]}}
    assert rows[1]["big"] == big and rows[1]["train/loss"] == 0.75
    assert rows[2] == {"train/loss": 0.5, "_step": 2, "i": 2**40 + 1, "f": 0.25, "t": "ok", "b": True,
                       "j": [1, 2], "n": None}
    table = metrics._wandb_table(rows)
    assert table["train/loss"] == ([0, 1, 2], [1.5, 0.75, 0.5])
    assert "h" not in table and "big" not in table and "t" not in table


def test_padding_left_by_a_block_tail(tmp_path):
    # a first record that leaves exactly 3 bytes in block 0: the next chunk starts in block 1
    size = BLOCK_SIZE - 7 - 7 - 3
    first = b"a" * size
    path = tmp_path / "pad.wandb"
    write_log(path, [first, b"second"])
    data = path.read_bytes()
    assert data[BLOCK_SIZE - 3:BLOCK_SIZE] == b"\x00\x00\x00"
    assert list(iter_records(path)) == [first, b"second"]


def test_running_run_truncated_tail(tmp_path):
    path = tmp_path / "live.wandb"
    records = [history_record(i, {"_step": i, "train/loss": 1.0 / (i + 1)}) for i in range(3)]
    write_log(path, records)
    data = path.read_bytes()
    path.write_bytes(data[:-5])  # the last record still being written
    assert [r["_step"] for r in read_history(path)] == [0, 1]


def test_corrupt_files_raise_clear_errors(tmp_path):
    path = tmp_path / "run-bad.wandb"
    write_log(path, [history_record(0, {"_step": 0, "train/loss": 1.0}), b"tail record"])
    data = bytearray(path.read_bytes())
    data[20] ^= 0xFF  # inside the first record's payload
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*checksum"):
        read_history(path)

    path.write_bytes(b"PK\x03\x04 not a run file at all")
    with pytest.raises(ValueError, match="not a W&B run file"):
        read_history(path)

    write_log(path, [b""])
    data = bytearray(path.read_bytes())
    data[13] = 4  # a LAST chunk with no FIRST (its checksum fixed to match)
    data[7:11] = struct.pack("<I", zlib.crc32(bytes([4])))
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="without a FIRST"):
        read_history(path)

    write_log(path, [b"\xff\xff\xff not a protobuf"])
    with pytest.raises(ValueError, match="not a W&B Record"):
        read_history(path)

    with pytest.raises(FileNotFoundError, match="missing"):
        read_history(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no W&B run file"):
        read_history(tmp_path / "empty")


# --------------------------------------------------------------------------------------
# CLI


def test_cli(full_run, tmp_path):
    run_dir, _, _ = full_run
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = tmp_path / "cli.html"
    ok = subprocess.run([sys.executable, "-m", "lightning_optim.dashboard", str(run_dir), "-o", str(out)],
                        capture_output=True, text=True, env=env, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == str(out)
    assert len(embedded_pngs(out.read_text())) == ALL_FIGURES

    empty = tmp_path / "empty_run"
    empty.mkdir()
    bad = subprocess.run([sys.executable, "-m", "lightning_optim.dashboard", str(empty)],
                         capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2
    assert bad.stdout == ""
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and "no metrics" in lines[0] and str(empty) in lines[0]
    assert not (empty / "dashboard.html").exists()


# --------------------------------------------------------------------------------------
# A metrics.csv cut, damaged or continued by a resumed run


@pytest.fixture(scope="module")
def tail_csv(tmp_path_factory):
    """The header and the last ten rows (the validation row of step 190, then steps 191 to 199) of
    a CSVLogger file: sorted columns, so ``step`` sits between the ``optim/*`` values and
    ``train/loss``; ``\\r\\n`` line ends."""
    run_dir = tmp_path_factory.mktemp("tail")
    info = write_csv_run(run_dir, n_layers=3, n_steps=199, every=1)
    lines = info["path"].read_bytes().splitlines(keepends=True)
    data = lines[0] + b"".join(lines[-10:])
    assert lines[0].split(b",").index(b"step") > 20 and data.endswith(b"\r\n")
    assert lines[-1].split(b",")[lines[0].split(b",").index(b"step")] == b"199"
    return data


def flat(table):
    return {(key, s): v for key, (steps, values) in table.items() for s, v in zip(steps, values)}


def test_cut_at_every_byte_of_the_last_two_lines(tail_csv, tmp_path):
    """A kill (or a running writer) leaves the file cut anywhere: every value read is the uncut
    file's value at that step, or absent, and the cut line is named in a warning."""
    path = tmp_path / "metrics.csv"
    path.write_bytes(tail_csv)
    full = flat(load_run(path))
    assert len({s for _, s in full}) == 10
    lines = tail_csv.splitlines(keepends=True)
    start = len(tail_csv) - len(lines[-1]) - len(lines[-2])
    step_field = None
    for cut in range(start, len(tail_csv) + 1):
        path.write_bytes(tail_csv[:cut])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = flat(load_run(path))
        for (key, step), value in got.items():
            assert full.get((key, step)) == value, (cut, key, step)
        ends = {start, start + len(lines[-2]), len(tail_csv)}
        complete = cut in ends or tail_csv[cut - 1:cut] == b"\r"  # cut between \r and \n: a whole row
        lineno = tail_csv[:cut].count(b"\n") + 1  # the line the cut falls in
        messages = [str(w.message) for w in caught if issubclass(w.category, metrics.MetricsFileWarning)]
        if complete:
            assert messages == [], cut
        else:
            assert messages == [(f"{path}:{lineno}: line skipped: the line has no line end (still being "
                                 "written, or cut)")], cut
        if tail_csv[:cut].endswith(b",19") and step_field is None:
            step_field = cut
            assert not any(step == 19 for _, step in got)  # the cut that used to move step 199 to 19
    assert step_field is not None


@pytest.mark.parametrize("damage, why", [
    (lambda row: row[:3] + row[4:], r"\d+ fields where the header has \d+"),
    (lambda row: row + ["1.0"], r"\d+ fields where the header has \d+"),
    (lambda row: [("x1" if i == 5 else c) for i, c in enumerate(row)],
     r"'x1' in column '[^']+' is not a number"),
    (lambda row: [("" if c == "195" else c) for c in row], r"step '' is not a finite number"),
])
def test_malformed_line_is_skipped_and_named(tail_csv, tmp_path, damage, why):
    text = tail_csv.decode()
    lines = text.splitlines(keepends=True)
    bad = next(csv.reader([lines[6]]))  # step 195
    assert "195" in bad
    lines[6] = ",".join(damage(bad)) + "\r\n"
    path = tmp_path / "metrics.csv"
    path.write_text("".join(lines), newline="")
    with pytest.warns(metrics.MetricsFileWarning, match=re.escape(f"{path}:7: line skipped: ") + why):
        table = load_run(path)
    path.write_bytes(tail_csv)
    full = flat(load_run(path))
    got = flat(table)
    assert {k: v for k, v in full.items() if k[1] != 195} == got  # that row only, nothing else


def test_many_bad_lines_warn_once_each_then_a_summary(tail_csv, tmp_path):
    header, *rows = tail_csv.decode().splitlines(keepends=True)
    path = tmp_path / "metrics.csv"
    path.write_text(header + "1,2\r\n" * 25 + "".join(rows), newline="")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        table = load_run(path)
    messages = [str(w.message) for w in caught]
    assert len(messages) == metrics._MAX_LINE_WARNINGS + 1
    assert messages[0].startswith(f"{path}:2: line skipped") and messages[19].startswith(f"{path}:21: ")
    assert messages[-1] == f"{path}: 5 more lines skipped (lines 22 to 26): cut or malformed"
    path.write_bytes(tail_csv)
    assert table == load_run(path)  # the bad lines only


def test_resumed_run_continues_the_csv_and_later_rows_win(tmp_path):
    """A run killed while writing step 5, resumed from its step-2 checkpoint, appends to the same
    file: its first row lands on the cut line (too many fields: skipped and named), steps 3 and 4
    appear twice (the later row wins), and a new header (a new key) continues the columns."""
    path = tmp_path / "metrics.csv"
    killed = "epoch,step,train/loss\r\n" + "".join(f"0,{s},{s}.0\r\n" for s in range(1, 5)) + "0,5,5."
    resumed = "".join(f"0,{s},{s}.5\r\n" for s in range(3, 5))
    new_header = "epoch,optim/v_drift/w.weight,step,train/loss\r\n" + "".join(
        f"0,0.{s},{s},{s}.5\r\n" for s in range(5, 7))
    path.write_text(killed + resumed + new_header, newline="")
    with pytest.warns(metrics.MetricsFileWarning,
                      match=re.escape(f"{path}:6: line skipped: 5 fields where the header has 3")):
        table = load_run(path)
    # step 3: the killed run's row (the resumed one was merged into the cut line); 4 to 6: the resumed run
    assert table["train/loss"] == ([1, 2, 3, 4, 5, 6], [1.0, 2.0, 3.0, 4.5, 5.5, 6.5])
    assert table["optim/v_drift/w.weight"] == ([5, 6], [0.5, 0.6])
    # rows need not come in step order (the monitor's row of step 10 before Lightning's of step 9)
    path.write_text("step,a,b\r\n10,1.0,\r\n9,,2.0\r\n20,3.0,\r\n19,,4.0\r\n", newline="")
    assert load_run(path) == {"a": ([10, 20], [1.0, 3.0]), "b": ([9, 19], [2.0, 4.0])}


def test_cli_prints_skipped_lines_as_warnings(tail_csv, tmp_path, capsys):
    path = tmp_path / "metrics.csv"
    path.write_bytes(tail_csv[:-30])
    assert report.main([str(tmp_path), "-o", str(tmp_path / "d.html")]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == str(tmp_path / "d.html")
    lineno = tail_csv.count(b"\n")  # the last line, cut
    assert err.splitlines() == [(f"warning: {path}:{lineno}: line skipped: the line has no line end "
                                 "(still being written, or cut)")]


def test_resumed_wandb_run_reads_as_one_history(tmp_path):
    """A resumed W&B run starts a new offline-run-<time>-<id> directory with the same id: the
    dashboard reads every file of the latest run's id, oldest first (the later row wins), and
    leaves other runs out."""
    wandb_dir = tmp_path / "wandb"

    def run(name, steps, loss):
        d = wandb_dir / name
        d.mkdir(parents=True)
        write_log(d / f"run-{name.rsplit('-', 1)[1]}.wandb",
                  [history_record(i, {"_step": i, "trainer/global_step": s, "train/loss": loss(s)})
                   for i, s in enumerate(steps)])

    run("offline-run-20260101_000000-other", [0, 1], lambda s: 100.0)  # an older, unrelated run
    run("offline-run-20260101_010000-abc123", [0, 10, 20, 30], lambda s: float(s))  # killed after 30
    run("offline-run-20260101_020000-abc123", [20, 30, 40], lambda s: s + 0.5)  # resumed from 10
    files = wandb_history.run_files(sorted(wandb_dir.rglob("run-*.wandb")))
    assert [f.parent.name for f in files] == ["offline-run-20260101_010000-abc123",
                                              "offline-run-20260101_020000-abc123"]
    assert load_run(tmp_path)["train/loss"] == ([0, 10, 20, 30, 40], [0.0, 10.0, 20.5, 30.5, 40.5])
    # the file itself: that file only
    assert load_run(files[0])["train/loss"] == ([0, 10, 20, 30], [0.0, 10.0, 20.0, 30.0])
