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
