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
