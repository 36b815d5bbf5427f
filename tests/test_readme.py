"""The README's example runs as written, and its two commands are the ones CI runs."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent
README = ROOT / "README.md"


def fenced(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE)


def test_the_readme_example_runs_as_written(tmp_path: Path) -> None:
    blocks = fenced(README.read_text(), "python")
    assert len(blocks) == 1, "the README shows one example"
    code_lines = [line for line in blocks[0].splitlines() if line.strip()]
    assert len(code_lines) <= 18, "the README's example stays short"
    script = tmp_path / "readme_example.py"
    script.write_text(blocks[0])
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.splitlines() == [
        "round 0: {'w': 1.0}",
        "round 1: {'w': 2.0}",
        "round 2: {'w': 3.0}",
    ], done.stdout


def test_ci_runs_the_readme_commands_first_and_as_written() -> None:
    commands = [" ".join(block.split()) for block in fenced(README.read_text(), "sh")]
    assert len(commands) == 2, "the README gives two commands"
    ci = (ROOT / ".ci" / "run").read_text()
    step_1 = ci.split('/newcomer/bin/activate"\n', 1)[1].split("\n)", 1)[0]
    assert [line.strip() for line in step_1.splitlines()] == commands
    installs = [
        line.strip()
        for line in ci.splitlines()
        if "pip install" in line and not line.lstrip().startswith("#")
    ]
    assert installs[0] == commands[0], "the first install in .ci/run is README's"
    assert installs[1] == commands[1], "the second install in .ci/run is README's"
    done = subprocess.run(
        ["bash", str(ROOT / ".ci" / "run"), "--dry-run"],  # its own check of README.md
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert done.stdout.splitlines() == commands


def test_the_readme_links_point_at_pages_that_exist() -> None:
    links = re.findall(r"\]\(([^)#]+)\)", README.read_text())
    assert links, "the README links into the docs"
    missing = [link for link in links if "://" not in link and not (ROOT / link).is_file()]
    assert not missing, missing
