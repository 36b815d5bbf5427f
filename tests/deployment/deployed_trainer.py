"""The trainer a deployed job's AgentExecutor launches, for the deployment tests.

``python deployed_trainer.py MODE RECORDS [--slow] [--ca CA --cert CERT] [--reconnect S]``: MODE is
``async`` or ``sync``; the site is in the environment AgentExecutor sets. Each task adds 1 to
every weight, or, with ``--slow``, waits until it is aborted. Events go to
``RECORDS/<site>.jsonl``, one JSON line each: ``started``, ``task``, ``aborted``, ``closed`` (the
site is gone: AgentClosed with a failure), ``end`` (the site's goodbye).
"""

from __future__ import annotations

import argparse
import json
import os
import threading
from pathlib import Path
from typing import Any

import anyio

from flare_agent_async import AgentClosed, AsyncFlareAgent, SyncFlareAgent, Task, TaskResult
from flare_agent_async.tls import client_context

META = {"NUM_STEPS_CURRENT_ROUND": 1}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["async", "sync"])
    parser.add_argument("records", type=Path)
    parser.add_argument("--slow", action="store_true")
    parser.add_argument("--ca")
    parser.add_argument("--cert")
    parser.add_argument("--reconnect", type=float, default=60.0)
    args = parser.parse_args()
    site = os.environ["FLARE_AGENT_SITE_NAME"]
    log = (args.records / f"{site}.jsonl").open("a", buffering=1)

    def record(event: str, **fields: Any) -> None:
        log.write(json.dumps({"event": event, "pid": os.getpid(), **fields}) + "\n")

    options: dict[str, Any] = {
        "agent_id": os.environ["FLARE_AGENT_ID"],
        "site_name": site,
        "reconnect_timeout": args.reconnect,
    }
    if args.ca:
        options["ssl_context"] = client_context(args.ca, certfile=args.cert)
    url = os.environ["FLARE_AGENT_URL"]
    record("started", url=url)
    try:
        if args.mode == "async":
            anyio.run(run_async, url, options, args.slow, record)
        else:
            run_sync(url, options, args.slow, record)
    except AgentClosed as exc:
        record("closed", reason=str(exc))
        raise SystemExit(3) from exc
    record("end")


def add_one(task: Task) -> dict[str, Any]:
    return {name: value + 1 for name, value in task.data.items()}


async def run_async(url: str, options: dict[str, Any], slow: bool, record: Any) -> None:
    async with AsyncFlareAgent(url, **options) as agent:
        async for task in agent.tasks():
            record("task", task_id=task.task_id, round=task.meta.get("current_round"))
            if slow:
                aborted = anyio.Event()
                task.add_abort_callback(aborted.set)
                await aborted.wait()
                record("aborted", task_id=task.task_id)
                continue
            await agent.submit_result(TaskResult(META, add_one(task)))


def run_sync(url: str, options: dict[str, Any], slow: bool, record: Any) -> None:
    with SyncFlareAgent(url, **options) as agent:
        for task in agent.tasks():
            record("task", task_id=task.task_id, round=task.meta.get("current_round"))
            if slow:
                aborted = threading.Event()
                task.add_abort_callback(aborted.set)
                if not aborted.wait(300):
                    raise SystemExit("no abort within 300 s")
                record("aborted", task_id=task.task_id)
                continue
            agent.submit_result(TaskResult(META, add_one(task)))


if __name__ == "__main__":
    main()
