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
    assert len(blocks) == 3, "the README shows an async trainer, a sync trainer and a site"
    for block in blocks:
        assert len(block.strip().splitlines()) <= 20, "README examples stay short"
    script = tmp_path / "readme_example.py"
    script.write_text("\n".join(blocks))
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60, check=True
    )
    # FedAvg of +1 (weight 100) and +2 (weight 50): 4/3 per round.
    last = done.stdout.splitlines()[-1]
    assert last.startswith("round 2: {'w': 4.0") and "'b': 4.0" in last, done.stdout
