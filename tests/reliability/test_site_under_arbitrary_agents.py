"""A running site driven by arbitrary sequences of agent actions, honest or not.

Hypothesis picks what raw connections do (hellos as any of a few agents and instances, results for
real, stale and made-up tasks, acknowledgements, heartbeats, messages only a site may send,
goodbyes, hang-ups) interleaved with the site's own calls (run a task, abort one). Whatever the
sequence, the site never fails, keeps at most one result per task, only ever from the agent the
task was assigned to, ends every task, and serves a well-behaved agent afterwards.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reliability_helpers import echo_trainer

from flare_agent_async import AsyncFlareAgent, FlareSite, SiteError
from flare_agent_async.protocol import (
    PROTOCOL_VERSION,
    Abort,
    Bye,
    Heartbeat,
    Hello,
    Log,
    Message,
    Result,
    TaskAck,
)
from flare_agent_async.transports import MemoryConnector, MessageStream

pytestmark = pytest.mark.anyio

AGENTS = ["a", "b"]
TASK_IDS = ["t0", "t1", "t2", "nope"]

action = st.one_of(
    st.tuples(
        st.just("connect"), st.integers(0, 2), st.sampled_from(AGENTS), st.sampled_from("xy")
    ),
    st.tuples(st.just("result"), st.integers(0, 2), st.sampled_from(TASK_IDS), st.integers(0, 9)),
    st.tuples(st.just("ack"), st.integers(0, 2), st.sampled_from(TASK_IDS)),
    st.tuples(st.just("send"), st.integers(0, 2), st.sampled_from(["hb", "log", "hello", "site"])),
    st.tuples(st.just("bye"), st.integers(0, 2)),
    st.tuples(st.just("hang_up"), st.integers(0, 2)),
    st.tuples(st.just("run_task"), st.sampled_from(AGENTS)),
    st.tuples(st.just("abort"), st.sampled_from(AGENTS), st.sampled_from(TASK_IDS)),
)


class Recorder(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@settings(
    max_examples=60,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(actions=st.lists(action, max_size=30))
async def test_arbitrary_agents_cannot_break_the_site(actions: list[tuple[Any, ...]]) -> None:
    recorder = Recorder()
    site_logger = logging.getLogger("flare_agent_async.site")
    site_logger.addHandler(recorder)
    # what each raw connection claims to be, and which results each (agent, task) got from whom
    claims: dict[int, str] = {}
    sent_results: dict[tuple[str, str], list[int]] = {}
    outcomes: dict[tuple[str, str], object] = {}
    started: Counter[str] = Counter()
    try:
        async with (
            anyio.create_task_group() as background,
            FlareSite("site-1", reconnect_timeout=0.5, close_timeout=1) as site,
        ):
            url = await site.listen("memory://")
            streams: dict[int, MessageStream] = {}

            async def drain(stream: MessageStream) -> None:
                try:
                    async for _ in stream:
                        pass
                except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                    pass
                finally:
                    await stream.aclose()

            async def run(agent_id: str, task_id: str) -> None:
                try:
                    result = await site.run_task(
                        agent_id, "train", {"for": agent_id}, task_id=task_id
                    )
                    outcomes[agent_id, task_id] = result.data
                except SiteError as exc:
                    outcomes[agent_id, task_id] = exc

            async def send(slot: int, message: Message) -> None:
                stream = streams.get(slot)
                if stream is not None:
                    try:
                        await stream.send(message)
                    except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                        await streams.pop(slot).aclose()

            for step in actions:
                kind = step[0]
                if kind == "connect":
                    _, slot, agent_id, instance = step
                    if slot in streams:
                        await streams.pop(slot).aclose()
                    stream = streams[slot] = await MemoryConnector(url).connect()
                    background.start_soon(drain, stream)
                    claims[slot] = agent_id
                    hello = Hello(
                        protocol_version=PROTOCOL_VERSION,
                        agent_id=agent_id,
                        site_name="site-1",
                        instance_id=instance,
                    )
                    await send(slot, hello)
                elif kind == "result":
                    _, slot, task_id, value = step
                    if slot in streams:
                        sent_results.setdefault((claims[slot], task_id), []).append(value)
                    result = Result(task_id=task_id, return_code="OK", meta={}, data=value)
                    await send(slot, result)
                elif kind == "ack":
                    await send(step[1], TaskAck(task_id=step[2]))
                elif kind == "send":
                    _, slot, what = step
                    message: Message = {
                        "hb": Heartbeat(),
                        "log": Log(key="loss", value=0.5),
                        "hello": Hello(
                            protocol_version=PROTOCOL_VERSION,
                            agent_id="a",
                            site_name="site-1",
                            instance_id="z",
                        ),
                        "site": Abort(task_id="t0"),
                    }[what]
                    await send(slot, message)
                elif kind == "bye":
                    await send(step[1], Bye(reason="leaving"))
                elif kind == "hang_up":
                    if step[1] in streams:
                        await streams.pop(step[1]).aclose()
                elif kind == "run_task":
                    agent_id = step[1]
                    task_id = f"t{started[agent_id]}"
                    if agent_id in site.agents and started[agent_id] < 3:
                        started[agent_id] += 1
                        background.start_soon(run, agent_id, task_id)
                elif kind == "abort":
                    _, agent_id, task_id = step
                    if agent_id in site.agents:
                        await site.abort_task(agent_id, task_id)
                for _ in range(10):  # let the site take it in (asyncio's
                    await anyio.lowlevel.checkpoint()  # wait_all_tasks_blocked polls slowly)

            for stream in streams.values():
                await stream.aclose()
            # a well-behaved agent is still served
            seen = Counter[str]()
            good = AsyncFlareAgent(url, agent_id="good", site_name="site-1")
            async with good, anyio.create_task_group() as group:
                group.start_soon(echo_trainer, good, seen)
                result = await site.run_task("good", "train", {"ok": 1}, task_id="g")
                group.cancel_scope.cancel()
            assert result.data == {"ok": 1} and seen == {"g": 1}
        # leaving the site ended every task it ran
    finally:
        site_logger.removeHandler(recorder)
    assert not [line for line in recorder.lines if "unexpected error" in line], recorder.lines
    assert sum(started.values()) == len(outcomes), "a task never ended"
    for (agent_id, task_id), outcome in outcomes.items():
        if not isinstance(outcome, BaseException):  # a kept result: sent by that agent for it
            assert outcome in sent_results.get((agent_id, task_id), []), (agent_id, task_id)
