"""What the reliability scenarios share: payloads with checksums, a trainer that counts what it
saw, a ledger that checks every task ended with exactly one intact result, and figures."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections import Counter
from collections.abc import Mapping
from contextlib import aclosing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import numpy as np

from flare_agent_async import AsyncFlareAgent, TaskResult

HERE = Path(__file__).parent
PEER = str(HERE / "peer_process.py")
"""A site or an agent in a process of its own (see that file)."""


def checksum(data: Any) -> str:
    """SHA-256 over a payload's arrays and values, in key order."""
    digest = hashlib.sha256()

    def feed(value: Any) -> None:
        if isinstance(value, np.ndarray):
            digest.update(str((value.dtype.str, value.shape)).encode())
            digest.update(np.ascontiguousarray(value).data)
        elif isinstance(value, Mapping):
            for key in sorted(value):
                digest.update(repr(key).encode())
                feed(value[key])
        else:
            digest.update(repr(value).encode())

    feed(data)
    return digest.hexdigest()


def big_payload(mebibytes: int) -> dict[str, np.ndarray]:
    """An array of ``mebibytes`` MiB whose every word differs (a misplaced chunk would show)."""
    return {"w": np.arange(mebibytes * 2**20 // 4, dtype=np.uint32)}


async def echo_trainer(agent: AsyncFlareAgent, seen: Counter[str]) -> None:
    """Answer every task with its own data and the checksum it arrived with; count each task id.

    Runs until cancelled or the agent closes.
    """
    async with aclosing(agent.tasks()) as tasks:
        async for task in tasks:
            seen[task.task_id] += 1
            await agent.submit_result(TaskResult({"checksum": checksum(task.data)}, task.data))


@dataclass
class Ledger:
    """Every task the site ran, and every result it got back: lost and duplicated must be 0."""

    sent: dict[tuple[str, str], str] = field(default_factory=dict)
    results: Counter[tuple[str, str]] = field(default_factory=Counter)
    corrupted: list[tuple[str, str]] = field(default_factory=list)

    async def run(self, site: Any, agent_id: str, task_id: str, data: Any) -> TaskResult:
        """`FlareSite.run_task`, booked: the result must carry the data it was sent."""
        expected = self.sent[agent_id, task_id] = checksum(data)
        result = await site.run_task(agent_id, "train", data, task_id=task_id)
        self.results[agent_id, task_id] += 1
        if result.meta.get("checksum") != expected or checksum(result.data) != expected:
            self.corrupted.append((agent_id, task_id))
        return result

    @property
    def lost(self) -> int:
        return sum(1 for key in self.sent if self.results[key] == 0)

    @property
    def duplicated(self) -> int:
        return sum(count - 1 for count in self.results.values() if count > 1)

    def check(self, seen: Mapping[tuple[str, str], int] | None = None) -> None:
        """Exactly one intact result per task; with ``seen``, each trainer saw each task once."""
        assert self.lost == 0, f"results lost: {[k for k in self.sent if not self.results[k]]}"
        assert self.duplicated == 0, "results duplicated"
        assert not self.corrupted, f"payloads corrupted: {self.corrupted}"
        if seen is not None:
            twice = {key: count for key, count in seen.items() if count != 1}
            assert not twice, f"trainers saw tasks more than once: {twice}"
            assert set(seen) == set(self.sent), "a trainer missed a task, or saw a stray one"


def report(scenario: str, **figures: object) -> None:
    """Append a scenario's figures to the file named by ``FLARE_AGENT_ASYNC_REPORT``, if set."""
    target = os.environ.get("FLARE_AGENT_ASYNC_REPORT")
    if target:
        with open(target, "a") as file:
            file.write(json.dumps({"scenario": scenario, **figures}) + "\n")


class Peer:
    """A site or agent process (`peer_process.py`) whose stdout is read line by line.

    Use with ``async with``: the process is killed on the way out, whatever happened.
    """

    def __init__(self, *args: str) -> None:
        self.args = [sys.executable, PEER, *args]
        self.process: anyio.abc.Process | None = None
        self._buffer = b""

    async def __aenter__(self) -> Peer:
        self.process = await anyio.open_process(
            self.args, stdin=-1, stdout=-1, stderr=None, start_new_session=True
        )
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        process = self.process
        assert process is not None
        with anyio.CancelScope(shield=True):
            if process.returncode is None:
                try:
                    process.kill()
                    os.kill(process.pid, 18)  # SIGCONT: a stopped process cannot die
                except ProcessLookupError:
                    pass
            with anyio.move_on_after(10):
                await process.wait()
            await process.aclose()

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    async def kill(self) -> None:
        """SIGKILL the process and wait until it is gone (its sockets closed with it)."""
        assert self.process is not None
        self.process.kill()
        with anyio.fail_after(10):
            await self.process.wait()

    async def line(self, timeout: float = 20) -> str:
        """The next line the process printed.

        :raises AssertionError: nothing within ``timeout`` seconds, or the process ended.
        """
        assert self.process is not None and self.process.stdout is not None
        with anyio.move_on_after(timeout):
            while b"\n" not in self._buffer:
                try:
                    self._buffer += await self.process.stdout.receive()
                except anyio.EndOfStream:
                    raise AssertionError(f"{self.args[2:]} ended without a line") from None
            line, _, self._buffer = self._buffer.partition(b"\n")
            return line.decode()
        raise AssertionError(f"{self.args[2:]} printed no line within {timeout} s")

    async def expect(self, prefix: str, timeout: float = 20) -> str:
        """The next line, which must start with ``prefix``."""
        line = await self.line(timeout)
        assert line.startswith(prefix), f"expected {prefix!r} from {self.args[2:]}, got {line!r}"
        return line

    async def tell(self, text: str) -> None:
        assert self.process is not None and self.process.stdin is not None
        await self.process.stdin.send(text.encode() + b"\n")


async def wait_until(condition: Any, what: str, timeout: float = 10) -> float:
    """Poll ``condition()`` every 5 ms until true; returns the seconds it took.

    :raises AssertionError: it stayed false for ``timeout`` seconds (saying ``what``).
    """
    start = anyio.current_time()
    with anyio.move_on_after(timeout):
        while not condition():  # noqa: ASYNC110 - for state no event announces (a process's)
            await anyio.sleep(0.005)
        return anyio.current_time() - start
    raise AssertionError(f"{what}: not within {timeout} s")
