"""Every shell command in the docs runs as written, or this file says why it is not run here.

The docs are the README and the pages under ``docs/``. Their commands are the lines of fenced
``bash`` blocks and the inline code spans that start with a program (``python``,
``.venv/bin/python``, ``pip``, ``bash``, ``./setup.sh``). :data:`COMMANDS` holds each of them
with what this file does about it: run it (and how), or skip it (and why, naming where its code
is tested instead). A command on a page missing from the table, or an entry no page has any
more, fails :func:`test_every_docs_command_is_in_the_table`, so a new command cannot go
unchecked.

Commands run as written (anything added is said in the table), through ``bash -c``, from a
temporary directory, with ``python`` the interpreter running the tests (its directory first on
``PATH``), W&B offline (``WANDB_MODE=offline``), the corpus cache in a temporary directory
(``LIGHTNING_OPTIM_CACHE``, unless the environment sets it already) and, for a Hydra run,
``hydra.run.dir=<tmp>`` appended (where the run directory goes, nothing else).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROGRAM = r"(?:\./setup\.sh|\.venv/bin/python|python3?|pip|bash)"


class Run(NamedTuple):
    how: str  # what is added to the command as written, if anything, and what is checked


class Skip(NamedTuple):
    why: str


HYDRA_EXAMPLE = ("python -m lightning_optim.train optimizer=coupled_adam optimizer.lr=3e-4 scheduler=warmup_cosine "
                 "scheduler.warmup_steps=10 clipping=norm trainer.max_steps=50 logger=wandb")
DASHBOARD = "python -m lightning_optim.dashboard RUN_DIR -o dashboard.html"
DEMO = "python -m lightning_optim.demo"

PIP_SKIP = ("installs packages from an index; tests/test_extras.py checks what each extra makes work and the "
            "error naming the pip install when it is missing")

COMMANDS: dict[str, Run | Skip] = {
    # README.md
    "./setup.sh && .venv/bin/python -m lightning_optim.train": Skip(
        "makes .venv and installs packages, then the main job's full default run (300 steps, minutes); "
        "tests/test_main_job.py runs the main job shortened (the README gives no shorter form of this one)"),
    "./setup.sh && .venv/bin/python -m pytest": Skip(
        "the test suite itself; tests/test_docs.py checks that CI (.ci/run) runs this very line"),
    HYDRA_EXAMPLE: Run("as written plus hydra.run.dir=<tmp>/run: exit 0, a checkpoint, a W&B offline run"),
    DEMO: Run("with --steps 10 appended (200 by default, 90 s of CPU): the README claims only that it runs every "
              "optimizer and prints a table, which 10 steps check as well; exit 0, one row per registry name, finite"),
    DASHBOARD: Run("RUN_DIR is the README's placeholder: the Hydra example's run directory; dashboard.html written"),
    "pip install .": Skip(PIP_SKIP),
    'pip install ".[wandb]"': Skip(PIP_SKIP),
    'pip install "lightning_optim[wandb]"': Skip(PIP_SKIP),
    # docs/reference.md
    "python -m lightning_optim.train": Skip("the main job's full default run, as in the README's first command"),
    # docs/checkpoints.md
    "python -m lightning_optim.train hydra.run.dir=runs/gpt checkpoint.every_n_steps=25": Skip(
        "the main job's full default run (300 steps, minutes), checkpointing; tests/test_kill_resume.py runs the "
        "same command on a tiny main job and SIGKILLs it"),
    "python -m lightning_optim.train hydra.run.dir=runs/gpt checkpoint.every_n_steps=25 resume=auto": Skip(
        "continues the run above; tests/test_kill_resume.py resumes its killed tiny run with resume=auto"),
    # docs/speed.md
    "python benchmarks/step.py": Skip("a timing benchmark (minutes); its figures and command are in benchmarks/RESULTS.md"),
    "python benchmarks/monitor.py": Skip("a timing benchmark; its figures and command are in benchmarks/RESULTS.md"),
    "python benchmarks/step.py --device cuda": Skip("needs a CUDA GPU (benchmarks/gpu_session.sh runs it on one)"),
    "bash benchmarks/gpu_session.sh": Skip("needs a CUDA GPU"),
    "python benchmarks/host_overhead.py": Skip("a timing benchmark; its figures and command are in benchmarks/RESULTS.md"),
    "python benchmarks/soak.py": Skip("thousands of steps (minutes); tests/test_soak_smoke.py runs it with --steps 50"),
    # docs/architecture.md
    "python -m lightning_optim.train [overrides]": Skip(
        "the command's synopsis ([overrides] is a placeholder); the README's Hydra example runs it with overrides"),
    "python -m lightning_optim.dashboard RUN_DIR -o OUT.html": Skip(
        "the command's synopsis; the README's form of it (-o dashboard.html) runs on the Hydra example's run"),
}

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def readme_commands(text: str | None = None) -> list[str]:
    """A page's commands (the README's by default), in order, each once."""
    text = (ROOT / "README.md").read_text() if text is None else text
    found: list[str] = []
    for lang, body in re.findall(r"```(\w*)\n(.*?)\n```", text, re.S):
        if lang in ("bash", "sh", "shell", "console"):
            found += [line.strip() for line in body.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    # A program with an argument; `pip install` alone names the tool, not a command to run.
    found += [span for span in re.findall(r"`([^`\n]+)`", prose)
              if re.match(PROGRAM + r" \S", span) and not re.fullmatch(r"pip \w+", span)]
    return list(dict.fromkeys(found))


def test_the_extraction_finds_blocks_and_inline_commands():
    text = ("x\n```bash\n./setup.sh && .venv/bin/python -m pytest\n# a comment\n```\n"
            "Run `python -m a.b --x 1`, or `pip install .`; not `python` alone, `pip install`, `wandb/offline-run-*` or\n"
            "```python\nimport os\n```\n")
    assert readme_commands(text) == ["./setup.sh && .venv/bin/python -m pytest", "python -m a.b --x 1", "pip install ."]


def docs_commands() -> dict[str, list[str]]:
    """Every command of the README and the docs pages, with the pages that show it."""
    found: dict[str, list[str]] = {}
    for page in PAGES:
        for command in readme_commands(page.read_text()):
            found.setdefault(command, []).append(page.relative_to(ROOT).as_posix())
    return found


def test_every_docs_command_is_in_the_table():
    commands = docs_commands()
    assert HYDRA_EXAMPLE in readme_commands() and DASHBOARD in readme_commands() and DEMO in readme_commands()
    missing = [f"{c} ({', '.join(pages)})" for c, pages in commands.items() if c not in COMMANDS]
    assert not missing, f"commands on a docs page with no entry in COMMANDS (run or skip, and why): {missing}"
    stale = [c for c in COMMANDS if c not in commands]
    assert not stale, f"COMMANDS entries no page has any more: {stale}"
    assert all(isinstance(v, Run) and v.how or isinstance(v, Skip) and v.why for v in COMMANDS.values())


def shell(command: str, cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["WANDB_MODE"] = "offline"
    env.setdefault("LIGHTNING_OPTIM_CACHE", str(cwd / "corpus_cache"))
    return subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_hydra_example_and_dashboard_commands(tmp_path):
    """The README's Hydra example, then its dashboard command on that run."""
    assert isinstance(COMMANDS[HYDRA_EXAMPLE], Run) and isinstance(COMMANDS[DASHBOARD], Run)
    run_dir = tmp_path / "run"
    proc = shell(f"{HYDRA_EXAMPLE} hydra.run.dir={run_dir}", tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert list(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    log = (run_dir / "train.log").read_text()
    assert "schedule warmup_cosine: 10 warmup steps, cosine to 0x over 50 steps" in log
    assert "`Trainer.fit` stopped: `max_steps=50` reached." in log

    proc = shell(DASHBOARD.replace("RUN_DIR", str(run_dir)), tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    html = (tmp_path / "dashboard.html").read_text()
    assert html.count("data:image/png;base64,") > 0


def test_demo_command(tmp_path):
    import math

    import lightning_optim as lo

    assert isinstance(COMMANDS[DEMO], Run)
    proc = shell(f"{DEMO} --steps 10", tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {line.split()[0]: line.split()[1:] for line in proc.stdout.splitlines()[2:] if line.strip()}
    assert list(rows) == lo.optimizers()
    assert all(len(v) == 3 and all(math.isfinite(float(x)) for x in v) for v in rows.values()), rows
