"""The docs match the code: README tables come from the registry, CI runs README's command."""

from __future__ import annotations

import re
from pathlib import Path

from lightning_optim.registry import markdown_table

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    return re.findall(r"```bash\n(.+?)\n```", (ROOT / "README.md").read_text())


def test_readme_opens_with_the_two_commands():
    main_job, tests = readme_commands()[:2]
    assert main_job.startswith("./setup.sh && ")
    assert tests == "./setup.sh && .venv/bin/python -m pytest"


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert readme_commands()[1] in ci.splitlines()


def test_readme_optimizer_table_matches_the_registry():
    assert markdown_table() in (ROOT / "README.md").read_text(), (
        "README's optimizer table is stale: paste lightning_optim.registry.markdown_table()"
    )


def test_readme_documents_every_config_field():
    import dataclasses

    from lightning_optim import config

    readme = (ROOT / "README.md").read_text()
    for cls in (config.SchedulerConfig, config.ClippingConfig, config.AccumulationConfig, config.PartitionConfig,
                config.MonitorConfig):
        for f in dataclasses.fields(cls):
            assert f"`{f.name}`" in readme, f"README does not document {cls.__name__}.{f.name}"


# ----- the README's option tables give the defaults the code has ---------------------------------------


def _md(value) -> str:
    """A default as the README writes it: YAML spelling, in backticks."""
    import json

    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, (list, tuple, dict)):
        return f"`{json.dumps(value)}`"
    return f"`{value}`"


def _readme_defaults() -> dict[str, list[str]]:
    """Every ``| `option` | default | ... |`` row of the README's tables, by option name (a row may
    name several: ``| `include` / `exclude` | `["*"]` / `[]` |``)."""
    rows: dict[str, list[str]] = {}
    for line in (ROOT / "README.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not cells[0].startswith("`"):
            continue
        names = [n.strip().strip("`") for n in cells[0].split(" / ")]
        values = cells[1].split(" / ") if len(names) > 1 else [cells[1]]
        if len(values) != len(names):
            continue
        for name, value in zip(names, values):
            rows.setdefault(name, []).append(value.strip())
    return rows


def _schedule_cell(option: str) -> str:
    """The README's default cell of a scheduler option, from lightning_optim.schedules.defaults:
    the value most schedules take first, then the others with the schedules that take them."""
    from lightning_optim.schedules import READS, SCHEDULES, defaults

    by_value: dict = {}
    for name in SCHEDULES:
        if option in READS[name]:
            by_value.setdefault(defaults(name)[option], []).append(name)
    ranked = sorted(by_value.items(), key=lambda kv: -len(kv[1]))
    if len(ranked) == 1:
        return _md(ranked[0][0])
    parts = []
    for i, (value, names) in enumerate(ranked):
        plain = i == 0 and len(names) > len(ranked[1][1])
        parts.append(_md(value) if plain else f"{_md(value)} for {', '.join(f'`{n}`' for n in names)}")
    return "; ".join(parts)


def test_readme_tables_give_the_code_defaults():
    """Every field of every config node has a README row whose default cell is the code's:
    the dataclass default, or for the scheduler the schedules' own (schedules.defaults)."""
    import dataclasses

    from lightning_optim import config

    rows = _readme_defaults()
    for cls in (config.SchedulerConfig, config.ClippingConfig, config.AccumulationConfig, config.MonitorConfig):
        for f in dataclasses.fields(cls):
            if cls is config.SchedulerConfig and f.name not in ("name", "total_steps"):
                expected = _schedule_cell(f.name)
            else:
                default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
                expected = _md(default)
            cells = rows.get(f.name, [])  # the default, maybe followed by a word on it: `null` (one micro-batch)
            assert any(c == expected or c.startswith(expected + " (") for c in cells), (
                f"README: {cls.__name__}.{f.name} should read {expected}, has {cells}")


# ----- the repo documents itself: docs/architecture.md, and no citation of a file outside the repo ------

ARCHITECTURE = ROOT / "docs" / "architecture.md"
# Spelled in pieces so that this file does not match its own test.
_OUTSIDE = ("DESIGN" + ".md", "../" + "shared", "/" + "shared/")


def _tracked_text_files() -> list[Path]:
    import subprocess

    names = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    files = []
    for name in names.decode().split("\0"):
        path = ROOT / name
        if name and path.is_file() and b"\0" not in path.read_bytes()[:8192]:
            files.append(path)
    return files


def test_no_tracked_file_cites_a_file_outside_the_repo():
    files = _tracked_text_files()
    assert ROOT / "README.md" in files and Path(__file__) in files
    found = [f"{p.relative_to(ROOT)}:{i}: {line.strip()}"
             for p in files
             for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1)
             if any(s in line for s in _OUTSIDE)]
    assert not found, "cites a file outside the repo (document it in docs/architecture.md):\n" + "\n".join(found)


def test_architecture_paths_exist():
    """Every ``lightning_optim/...`` path and every backticked ``*.py`` file name on the page exists."""
    text = ARCHITECTURE.read_text()
    paths = set(re.findall(r"lightning_optim/[\w/.]*\w/?", text))
    assert "lightning_optim/backends/reference.py" in paths and len(paths) > 20
    missing = [p for p in sorted(paths) if not (ROOT / p).exists()]
    package_files = {p.name for p in (ROOT / "lightning_optim").rglob("*.py")}
    names = set(re.findall(r"`(\w+\.py)`", text))
    assert "coupled_adam.py" in names
    missing += [n for n in sorted(names) if n not in package_files]
    assert not missing, f"docs/architecture.md names what does not exist: {missing}"


def test_architecture_dotted_names_exist():
    """``lightning_optim.x.y`` is a module or package of the repo, or ``lightning_optim.<public name>``."""
    import lightning_optim

    text = ARCHITECTURE.read_text()
    dotted = set(re.findall(r"\blightning_optim(?:\.\w+)+", text))
    assert {"lightning_optim.train", "lightning_optim.dashboard", "lightning_optim.MomentMonitor"} <= dotted
    missing = []
    for name in sorted(dotted):
        parts = name.split(".")
        base = ROOT.joinpath(*parts)
        if base.with_suffix(".py").is_file() or (base / "__init__.py").is_file():
            continue
        if len(parts) == 2 and parts[1] in lightning_optim.__all__:
            continue
        missing.append(name)
    assert not missing, f"docs/architecture.md names modules or public names that do not exist: {missing}"


def test_architecture_lists_the_registry_and_the_hydra_groups():
    from lightning_optim.registry import optimizers

    text = ARCHITECTURE.read_text()
    listed = re.search(r"in the order of the registry table: (.+?)\.\n", text, re.S).group(1)
    assert re.findall(r"`(\w+)`", listed) == optimizers()
    groups = re.search(r"the Hydra config groups \((.+?)\)", text, re.S).group(1)
    conf = ROOT / "conf"
    on_disk = sorted(p.name for p in conf.iterdir() if p.is_dir() and p.name != "__pycache__")
    assert sorted(re.findall(r"`(\w+)`", groups)) == on_disk
