"""The docs match the code.

The README is the newcomer's page: it opens with the two commands (CI runs the second) and
names every registry name and every install extra. The option, config and metric tables live
on ``docs/reference.md``; the tests here (and the metric and monitor tables' tests in
``tests/test_callback.py`` and ``tests/test_monitor.py``) read them from there, so a default or
a key that changes in the code without changing there fails. Every page (the README and
``docs/*.md``) names only paths, modules, public names and links that exist.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lightning_optim.registry import markdown_table

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
REFERENCE = ROOT / "docs" / "reference.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]


def readme_commands() -> list[str]:
    return re.findall(r"```bash\n(.+?)\n```", README.read_text())


def test_readme_opens_with_the_two_commands():
    main_job, tests = readme_commands()[:2]
    assert main_job == "./setup.sh && .venv/bin/python -m lightning_optim.train"
    assert tests == "./setup.sh && .venv/bin/python -m pytest"
    # They are the page's first code, of any kind.
    first_blocks = re.findall(r"```\w*\n(.+?)\n```", README.read_text(), re.S)[:2]
    assert first_blocks == [main_job, tests]


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert readme_commands()[1] in ci.splitlines()


def test_readme_is_a_first_page():
    """The README stays a page a newcomer reads through; the reference material is in docs/."""
    assert len(README.read_text()) < 10_000


def test_reference_optimizer_table_matches_the_registry():
    assert markdown_table() in REFERENCE.read_text(), (
        "docs/reference.md's optimizer table is stale: paste lightning_optim.registry.markdown_table()"
    )


def test_readme_lists_the_registry_names_in_order():
    from lightning_optim.registry import optimizers

    text = README.read_text()
    listed = re.search(r"The registry names \(`lo.optimizers\(\)`.*?\): (.+?)\. ", text, re.S).group(1)
    assert re.findall(r"`(\w+)`", listed) == optimizers()


def test_readme_lists_every_install_extra():
    """The README's extras table has one row per extra of pyproject.toml, in its order."""
    tomllib = pytest.importorskip("tomllib")
    extras = list(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    text = README.read_text()
    table = text[text.index("| extra | adds | for |"):].split("\n\n", 1)[0]
    assert re.findall(r"^\| `([\w-]+)` \|", table, re.M) == extras


def test_reference_documents_every_config_field():
    import dataclasses

    from lightning_optim import config

    text = REFERENCE.read_text()
    for cls in (config.SchedulerConfig, config.ClippingConfig, config.AccumulationConfig, config.PartitionConfig,
                config.MonitorConfig):
        for f in dataclasses.fields(cls):
            assert f"`{f.name}`" in text, f"docs/reference.md does not document {cls.__name__}.{f.name}"


# ----- the reference's option tables give the defaults the code has ---------------------------------------


def _md(value) -> str:
    """A default as the reference writes it: YAML spelling, in backticks."""
    import json

    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, (list, tuple, dict)):
        return f"`{json.dumps(value)}`"
    return f"`{value}`"


def _reference_defaults() -> dict[str, list[str]]:
    """Every ``| `option` | default | ... |`` row of the reference's tables, by option name (a row may
    name several: ``| `include` / `exclude` | `["*"]` / `[]` |``)."""
    rows: dict[str, list[str]] = {}
    for line in REFERENCE.read_text().splitlines():
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
    """The reference's default cell of a scheduler option, from lightning_optim.schedules.defaults:
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


def test_reference_tables_give_the_code_defaults():
    """Every field of every config node has a row on docs/reference.md whose default cell is the code's:
    the dataclass default, or for the scheduler the schedules' own (schedules.defaults)."""
    import dataclasses

    from lightning_optim import config

    rows = _reference_defaults()
    for cls in (config.SchedulerConfig, config.ClippingConfig, config.AccumulationConfig, config.MonitorConfig):
        for f in dataclasses.fields(cls):
            if cls is config.SchedulerConfig and f.name not in ("name", "total_steps"):
                expected = _schedule_cell(f.name)
            else:
                default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
                expected = _md(default)
            cells = rows.get(f.name, [])  # the default, maybe followed by a word on it: `null` (one micro-batch)
            assert any(c == expected or c.startswith(expected + " (") for c in cells), (
                f"docs/reference.md: {cls.__name__}.{f.name} should read {expected}, has {cells}")


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


# ----- every page names only what exists ------------------------------------------------------------

# Repo paths a page may name; a path's placeholder part (``conf/optimizer/<name>.yaml``) is cut at "<".
_PATH = re.compile(r"(?<![\w/.-])(?:lightning_optim|conf|docs|tests|benchmarks|recipes)/[\w/.-]*[\w/]")
_PAGE_IDS = [p.relative_to(ROOT).as_posix() for p in PAGES]


def page_paths(text: str) -> set[str]:
    return {p.rstrip("/.") for p in _PATH.findall(text)}


def _resolve(dotted: str) -> bool:
    """``a.b.c`` is an importable module, or attributes of the longest importable prefix."""
    import importlib
    import importlib.util

    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        module = ".".join(parts[:cut])
        try:
            if importlib.util.find_spec(module) is None:
                continue
        except ModuleNotFoundError:
            continue
        obj = importlib.import_module(module)
        for attr in parts[cut:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_the_page_checks_see_what_they_check():
    """The extraction below finds paths, dotted names and links, placeholders cut off."""
    text = ("`lightning_optim/backends/triton/` and `conf/optimizer/<name>.yaml`, see lightning_optim.schedules.defaults"
            " and `lo.partition.find_unembedding(model)`; [x](docs/reference.md#backends), runs/gpt, hello.")
    assert page_paths(text) == {"lightning_optim/backends/triton", "conf/optimizer", "docs/reference.md"}
    assert _resolve("lightning_optim.schedules.defaults") and _resolve("lightning_optim.conf")
    assert not _resolve("lightning_optim.schedules.no_such_name") and not _resolve("lightning_optim.nowhere")
    assert _slug("The partition: `param_groups(module, ...)`") == "the-partition-param_groupsmodule-"


@pytest.mark.parametrize("page", PAGES, ids=_PAGE_IDS)
def test_page_paths_exist(page):
    """Every repo path (``lightning_optim/...``, ``conf/...``, ``tests/...``, ...) and every
    backticked ``*.py`` file name on the page exists."""
    text = page.read_text()
    paths = page_paths(text)
    if page == ARCHITECTURE:
        assert "lightning_optim/backends/reference.py" in paths and len(paths) > 20
    missing = [p for p in sorted(paths) if not (ROOT / p).exists()]
    repo_files = {p.name for d in ("lightning_optim", "benchmarks", "recipes", "tests") for p in (ROOT / d).rglob("*.py")}
    missing += [n for n in sorted(set(re.findall(r"`(\w+\.py)`", text))) if n not in repo_files]
    assert not missing, f"{page.relative_to(ROOT)} names what does not exist: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=_PAGE_IDS)
def test_page_dotted_names_exist(page):
    """``lightning_optim.x.y`` and ``lo.x.y`` (``import lightning_optim as lo``) on the page are
    modules of the package or names in them."""
    text = page.read_text()
    dotted = set(re.findall(r"(?<![\w.])lightning_optim(?:\.\w+)+", text))
    dotted |= {"lightning_optim." + n for n in re.findall(r"(?<![\w.])lo\.(\w+(?:\.\w+)*)", text)}
    if page == ARCHITECTURE:
        assert {"lightning_optim.train", "lightning_optim.dashboard", "lightning_optim.MomentMonitor"} <= dotted
    missing = [name for name in sorted(dotted) if not _resolve(name)]
    assert not missing, f"{page.relative_to(ROOT)} names modules or names that do not exist: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=_PAGE_IDS)
def test_page_links_resolve(page):
    """Every relative link goes to a file of the repo, and an ``#anchor`` into a page to one of
    its headings."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"\w+://", target):
            continue
        file, _, anchor = target.partition("#")
        path = (page.parent / file).resolve() if file else page
        if not path.exists():
            broken.append(target)
        elif anchor:
            headings = re.findall(r"^#+ (.+)$", re.sub(r"```.*?```", "", path.read_text(), flags=re.S), re.M)
            if anchor not in {_slug(h) for h in headings}:
                broken.append(target)
    assert not broken, f"{page.relative_to(ROOT)} links to what does not exist: {broken}"


def test_architecture_lists_the_registry_and_the_hydra_groups():
    from lightning_optim.registry import optimizers

    text = ARCHITECTURE.read_text()
    listed = re.search(r"in the order of the registry table: (.+?)\.\n", text, re.S).group(1)
    assert re.findall(r"`(\w+)`", listed) == optimizers()
    groups = re.search(r"the Hydra config groups \((.+?)\)", text, re.S).group(1)
    conf = ROOT / "conf"
    on_disk = sorted(p.name for p in conf.iterdir() if p.is_dir() and p.name != "__pycache__")
    assert sorted(re.findall(r"`(\w+)`", groups)) == on_disk
