"""The README's code runs as written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).parent.parent / "README.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)


def test_the_readme_trainer_and_site_run_as_written(tmp_path: Path) -> None:
    blocks = python_blocks(README.read_text())
    assert len(blocks) == 2, "the README shows a trainer and a site"
    for block in blocks:
        assert len(block.strip().splitlines()) <= 16, "README examples stay about 15 lines"
    script = tmp_path / "readme_example.py"
    script.write_text("\n".join(blocks))
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.splitlines()[-1] == "round 2: {'w': 3.0, 'b': 3.0}"
