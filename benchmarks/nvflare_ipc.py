"""The incumbent: NVFlare 2.9's own ``IPCAgent``, measured with the same small-task and large-model
scenarios as flare_agent_async.

The agent process runs NVFlare's real ``nvflare.client.ipc.ipc_agent.IPCAgent``, unchanged, the
way a trainer does: ``get_task``, then ``submit_result`` with the task's data as the result.

The site process reproduces what NVFlare's ``IPCExchanger`` executor does on the site's side of the
cell network, driving a real ``nvflare.fuel.f3.cellnet.Cell`` directly:

* the cell is named after the site (``site-1``) and opens an internal listener on 127.0.0.1; the
  agent's cell is its child, named ``defs.agent_site_fqcn(site, agent_id)`` (``site-1.-trainer``)
  as both the exchanger and the agent compute it, and connects to that listener;
* the ``flare_agent`` channel with its ``get_task``, ``submit_result``, ``heartbeat`` and ``bye``
  topics; the ``task_id`` and ``task_name`` headers; the payload ``{"data": ..., "meta": ...}``,
  where meta carries ``data_kind`` (``WEIGHTS``), ``current_round`` and ``total_round``;
* the exchanger's defaults and message flow: a heartbeat every 5 s (ack timeout 5 s, optional) that
  marks the agent connected; a task is sent only to a connected agent, with a 5 s timeout, and
  resent every 2 s until the agent answers OK; the result is awaited on an event checked every
  0.2 s; the result handler checks the task id, the payload's ``data`` and ``meta`` and the ``rc``
  header and answers OK; at the end, ``bye``;
* NVFlare's numpy decomposers on both sides, as an NVFlare job registers them.

Left out, because they are the rest of an NVFlare job rather than the agent contract: the client
job process and the parent cell that relays between it and the agent (here the exchanger's cell is
the site's parent cell itself, one hop fewer than a deployment, so these figures are a lower bound
for NVFlare), the server and the client runner's loop that fetches tasks from it, the engine and
``FLContext``, the ``Shareable``/``DXO`` wrapping around the payload, aborts and system panics. The
site's cell is a client root, whose server root is a cell in the same process that is never
contacted. Before the first task the site waits for the agent's cell to connect, so a run does not
include the up to 5 s an exchanger can take to notice a new agent.

Between two tasks the site pauses for `TURNAROUND` (50 ms), standing for the job's trip to the
server with the result and back with the next task. In a deployment that trip always ends after the
agent's ``submit_result`` has returned, so the next task finds the agent in ``get_task``, which
looks for a task every 0.2 s: one task per poll, about 205 ms a task whatever the pause (below
0.2 s). Sent back to back instead, the next task races the agent's bookkeeping after
``submit_result``: when the task wins, IPCAgent keeps it as pending and hands it over at once
(about 7 ms a task); when it loses, it waits for the next poll (about 205 ms); the mean depends on
that race. Small tasks are therefore timed over the whole loop, pause included (the cycle a trainer
sees), large ones from send to result.

Each side runs in its own process; memory is peak RSS growth during the transfer over the payload
size, as for our own scenarios.

    python -m benchmarks.nvflare_ipc [--tasks 20] [--mib 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import tempfile
import threading
import time
import uuid
from typing import Any

from benchmarks import _harness

SITE_NAME = "site-1"
AGENT_ID = "trainer"
TASK_NAME = "train"

# NVFlare's IPCExchanger defaults, in seconds.
SEND_TASK_TIMEOUT = 5.0
RESEND_TASK_INTERVAL = 2.0
HEARTBEAT_INTERVAL = 5.0
ACK_TIMEOUT = 5.0
CHECK_INTERVAL = 0.2

#: Between two tasks, the pause a job spends taking the result to the server and fetching the next
#: task (see the module's docstring).
TURNAROUND = 0.05

#: The longest any one task, connection or goodbye may take before a role gives up.
TASK_DEADLINE = 120.0
#: The agent gives up when the site (which heartbeats every 5 s) has been silent this long.
SITE_SILENCE_TIMEOUT = 60.0
WARMUP_TASKS = 2
_UNUSED_URL = "tcp://127.0.0.1:0"


def unavailable() -> str | None:
    """None when nvflare 2.9.x is importable; otherwise the reason to skip this scenario."""
    if importlib.util.find_spec("nvflare") is None:
        return "nvflare is not installed: pip install flare-agent-async[nvflare]"
    try:
        version = importlib.metadata.version("nvflare")
    except importlib.metadata.PackageNotFoundError:
        return "nvflare is not installed as a package: pip install flare-agent-async[nvflare]"
    if not version.startswith("2.9."):
        return (
            f"nvflare {version} is installed, this scenario needs 2.9.x: pip install nvflare~=2.9.0"
        )
    return None


# -- the site: the exchanger's side of the cell network --------------------------------------------


class _Exchanger:
    """The site's half of NVFlare's IPC contract over one cell, one task at a time."""

    def __init__(self, cell: Any) -> None:
        from nvflare.client.ipc import defs

        self._defs = defs
        self.cell = cell
        self.agent_fqcn = defs.agent_site_fqcn(SITE_NAME, AGENT_ID)
        self.connected = threading.Event()
        self.stopping = threading.Event()
        self._task_id: str | None = None
        self._result: dict[str, Any] | None = None
        self._result_rc: str | None = None
        self._result_arrived = threading.Event()
        cell.register_request_cb(
            channel=defs.CHANNEL, topic=defs.TOPIC_SUBMIT_RESULT, cb=self._receive_result
        )

    def monitor(self) -> None:
        """Heartbeat the agent every few seconds; an OK marks it connected (a thread's loop)."""
        from nvflare.fuel.f3.cellnet.cell import Message, MessageHeaderKey, ReturnCode

        last_heartbeat = 0.0
        while not self.stopping.is_set():
            if time.time() - last_heartbeat > HEARTBEAT_INTERVAL:
                reply = self.cell.send_request(
                    channel=self._defs.CHANNEL,
                    topic=self._defs.TOPIC_HEARTBEAT,
                    target=self.agent_fqcn,
                    request=Message(),
                    timeout=ACK_TIMEOUT,
                    optional=True,
                )
                last_heartbeat = time.time()
                if reply.get_header(MessageHeaderKey.RETURN_CODE) == ReturnCode.OK:
                    self.connected.set()
            self.stopping.wait(CHECK_INTERVAL)

    def execute(self, data: dict[str, Any], current_round: int, total_rounds: int) -> Any:
        """Send one task to the agent and wait for its result; the result's data."""
        from nvflare.apis.dxo import DataKind
        from nvflare.fuel.f3.cellnet.cell import Message, MessageHeaderKey, ReturnCode

        defs = self._defs
        deadline = time.monotonic() + TASK_DEADLINE
        if not self.connected.wait(TASK_DEADLINE):
            raise TimeoutError(f"the agent did not answer a heartbeat within {TASK_DEADLINE} s")
        task_id = self._expect_result_of(str(uuid.uuid4()))
        meta = {
            defs.MetaKey.DATA_KIND: DataKind.WEIGHTS,
            defs.MetaKey.CURRENT_ROUND: current_round,
            defs.MetaKey.TOTAL_ROUND: total_rounds,
        }
        message = Message(
            headers={defs.MsgHeader.TASK_ID: task_id, defs.MsgHeader.TASK_NAME: TASK_NAME},
            payload={defs.PayloadKey.DATA: data, defs.PayloadKey.META: meta},
        )
        last_send = 0.0
        while True:
            if self._result_arrived.is_set():
                break  # an earlier send reached the agent after all
            if time.time() - last_send > RESEND_TASK_INTERVAL:
                reply = self.cell.send_request(
                    channel=defs.CHANNEL,
                    topic=defs.TOPIC_GET_TASK,
                    request=message,
                    target=self.agent_fqcn,
                    timeout=SEND_TASK_TIMEOUT,
                )
                last_send = time.time()
                code = reply.get_header(MessageHeaderKey.RETURN_CODE)
                if code == ReturnCode.OK:
                    break
                if code == ReturnCode.INVALID_REQUEST:
                    raise RuntimeError("the agent rejected the task")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the agent did not take the task within {TASK_DEADLINE} s")
            time.sleep(CHECK_INTERVAL)
        while not self._result_arrived.wait(CHECK_INTERVAL):
            if time.monotonic() > deadline:
                raise TimeoutError(f"no result within {TASK_DEADLINE} s")
        if self._result_rc not in (defs.RC.OK, defs.RC.EARLY_TERMINATION):
            raise RuntimeError(f"the agent returned {self._result_rc}")
        assert self._result is not None
        result = self._result[defs.PayloadKey.DATA]
        self._expect_result_of(None)
        return result

    def _expect_result_of(self, task_id: str | None) -> str | None:
        self._task_id, self._result, self._result_rc = task_id, None, None
        self._result_arrived.clear()
        return task_id

    def _receive_result(self, request: Any) -> Any:
        from nvflare.fuel.f3.cellnet.cell import ReturnCode
        from nvflare.fuel.f3.cellnet.utils import make_reply

        defs = self._defs
        task_id = request.get_header(defs.MsgHeader.TASK_ID)
        if self._task_id is None:
            # a result with no task id is what a restarted agent sends: nothing to take
            return make_reply(ReturnCode.OK if not task_id else ReturnCode.INVALID_REQUEST)
        if task_id and task_id != self._task_id:
            return make_reply(ReturnCode.INVALID_REQUEST)
        if self._result_arrived.is_set():
            return make_reply(ReturnCode.OK)  # a duplicate
        payload = request.payload
        valid = (
            isinstance(payload, dict)
            and payload.get(defs.PayloadKey.DATA) is not None
            and payload.get(defs.PayloadKey.META) is not None
        )
        self._result = payload if valid else None
        self._result_rc = (
            request.get_header(defs.MsgHeader.RC, defs.RC.OK)
            if valid
            else defs.RC.EXECUTION_EXCEPTION
        )
        self._result_arrived.set()
        return make_reply(ReturnCode.OK if valid else ReturnCode.INVALID_REQUEST)

    def say_goodbye(self) -> None:
        """Tell the agent the job is over."""
        from nvflare.fuel.f3.cellnet.cell import Message

        self.cell.send_request(
            channel=self._defs.CHANNEL,
            topic=self._defs.TOPIC_BYE,
            target=self.agent_fqcn,
            request=Message(),
            optional=True,
            timeout=ACK_TIMEOUT,
        )


def run_site(scenario: str, tasks: int, mib: float, repeats: int) -> None:
    """The site process: a cell listening on loopback, the exchanger's flow, the figures."""
    import numpy as np
    from nvflare.app_common.decomposers import numpy_decomposers
    from nvflare.fuel.f3.cellnet.cell import Cell
    from nvflare.fuel.f3.cellnet.fqcn import FQCN

    numpy_decomposers.register()
    # A client root cell needs its server root's URL; with the server root in this process the
    # site's cell makes no server connection, and the server's listener (an ephemeral loopback
    # port) is never used.
    server = Cell(fqcn=FQCN.ROOT_SERVER, root_url=_UNUSED_URL, secure=False, credentials={})
    cell = Cell(
        fqcn=SITE_NAME,
        root_url=_UNUSED_URL,
        secure=False,
        credentials={},
        create_internal_listener=True,
        internal_listener_host="127.0.0.1",
    )
    exchanger = _Exchanger(cell)
    agent_seen = threading.Event()
    cell.core_cell.set_cell_connected_cb(
        lambda agent: agent_seen.set() if agent.info.fqcn == exchanger.agent_fqcn else None
    )
    server.start()
    cell.start()
    monitor: threading.Thread | None = None
    try:
        _harness.emit(url=cell.get_internal_listener_url())
        if not agent_seen.wait(TASK_DEADLINE):
            raise TimeoutError(f"the agent did not connect within {TASK_DEADLINE} s")
        monitor = threading.Thread(target=exchanger.monitor, daemon=True)
        monitor.start()
        rounds = WARMUP_TASKS + tasks * repeats
        for n in range(WARMUP_TASKS):
            time.sleep(TURNAROUND)
            exchanger.execute({"x": 1.0}, n, rounds)
        if scenario == "latency":
            task_us = []
            cpu_before = _harness.cpu_seconds()
            for repeat in range(repeats):
                started = time.perf_counter()
                for n in range(tasks):
                    time.sleep(TURNAROUND)
                    result = exchanger.execute(
                        {"x": 1.0}, WARMUP_TASKS + repeat * tasks + n, rounds
                    )
                    assert result == {"x": 1.0}, result
                task_us.append((time.perf_counter() - started) / tasks * 1e6)
            _harness.emit(task_us=task_us, site_cpu_s=_harness.cpu_seconds() - cpu_before)
        else:
            data = _harness.payload(mib)
            seconds, growth = [], []
            for repeat in range(repeats):
                time.sleep(TURNAROUND)
                before = _harness.rss_bytes()
                started = time.perf_counter()
                result = exchanger.execute(data, WARMUP_TASKS + repeat, rounds)
                seconds.append(time.perf_counter() - started)
                growth.append(_harness.peak_rss_bytes() - before)
                assert np.array_equal(result["layer7"][-10:], data["layer7"][-10:])
                del result
            _harness.emit(seconds=seconds, site_peak_growth=max(growth))
        exchanger.say_goodbye()
    finally:
        exchanger.stopping.set()
        if monitor is not None:
            monitor.join(ACK_TIMEOUT + 1)
        cell.stop()
        server.stop()
    _harness.report_usage()


# -- the agent: NVFlare's IPCAgent as a trainer uses it --------------------------------------------


def run_agent(url: str, warmup: int) -> None:
    """The agent process: NVFlare's IPCAgent echoing each task's data until the site says bye."""
    from nvflare.client.ipc import defs
    from nvflare.client.ipc.ipc_agent import IPCAgent

    with tempfile.TemporaryDirectory(prefix="nvflare-agent-") as workspace:
        agent = IPCAgent(
            flare_site_url=url,
            flare_site_name=SITE_NAME,
            agent_id=AGENT_ID,
            workspace_dir=workspace,
            flare_site_heartbeat_timeout=SITE_SILENCE_TIMEOUT,
        )
        agent.start()
        try:
            served = 0
            cpu_before = _harness.cpu_seconds()
            rss_before = _harness.rss_bytes()
            while True:
                try:
                    task = agent.get_task(timeout=TASK_DEADLINE)
                except defs.AgentClosed:
                    break
                if task is None:
                    raise TimeoutError(f"no task and no goodbye within {TASK_DEADLINE} s")
                if not agent.submit_result(defs.TaskResult(meta={}, data=task.data)):
                    raise RuntimeError(f"the site did not take the result of {task}")
                del task
                served += 1
                if served == warmup:
                    cpu_before = _harness.cpu_seconds()
                    rss_before = _harness.rss_bytes()
            cpu_after = _harness.cpu_seconds()
            _harness.emit(
                agent_tasks=served - warmup,
                agent_cpu_s=cpu_after - cpu_before,
                agent_peak_growth=_harness.peak_rss_bytes() - rss_before,
            )
        finally:
            agent.stop()
    _harness.report_usage()


# -- what the runner calls -------------------------------------------------------------------------


def _run(scenario: str, timeout: float, *site_args: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Start the site and the agent, each in its own process; every record of each."""
    with _harness.Child("nvflare_ipc", "site", "--scenario", scenario, *site_args) as site:
        url = site.expect("url", timeout=60)
        with _harness.Child(
            "nvflare_ipc", "agent", "--url", url, "--warmup", str(WARMUP_TASKS)
        ) as agent:
            site_records = site.finish(timeout)
            agent_records = agent.finish(60)
    return site_records, agent_records


def latency(tasks: int, repeats: int) -> dict[str, Any]:
    """Small tasks one after another: µs per task (one figure per repeat), tasks/s, CPU per task."""
    site, agent = _run(
        "latency",
        60 + (WARMUP_TASKS + tasks * repeats) * 5,
        "--tasks",
        str(tasks),
        "--repeats",
        str(repeats),
    )
    task_us = _harness.spread(site["task_us"])
    count = tasks * repeats
    return {
        "task_us": task_us,
        "tasks_per_s": 1e6 / task_us["median"],
        "cpu_ms_per_task": {
            "site": site["site_cpu_s"] / count * 1e3,
            "agent": agent["agent_cpu_s"] / agent["agent_tasks"] * 1e3,
        },
        "site": _harness.usage(site),
        "agent": _harness.usage(agent),
    }


def throughput(mib: float, repeats: int) -> dict[str, Any]:
    """``mib`` MiB of float32 arrays to the agent and back: seconds, GB/s, peak RSS growth."""
    site, agent = _run(
        "throughput",
        120 + mib * repeats * 0.2,
        "--mib",
        str(mib),
        "--repeats",
        str(repeats),
    )
    payload_bytes = sum(array.nbytes for array in _harness.payload(mib).values())
    seconds = _harness.spread(site["seconds"])
    return {
        "seconds": seconds,
        "gbytes_per_s": 2 * payload_bytes / seconds["median"] / 1e9,
        "site_rss_x": site["site_peak_growth"] / payload_bytes,
        "agent_rss_x": agent["agent_peak_growth"] / payload_bytes,
        "site": _harness.usage(site),
        "agent": _harness.usage(agent),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.nvflare_ipc", description=__doc__)
    parser.add_argument("--tasks", type=int, default=20, help="small tasks per repeat")
    parser.add_argument("--mib", type=float, default=64, help="payload size for throughput")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--role", choices=("site", "agent"), help=argparse.SUPPRESS)
    parser.add_argument("--scenario", choices=("latency", "throughput"), help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--warmup", type=int, default=WARMUP_TASKS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.role == "site":
        return run_site(args.scenario, args.tasks, args.mib, args.repeats)
    if args.role == "agent":
        return run_agent(args.url, args.warmup)
    reason = unavailable()
    if reason is not None:
        print(f"NVFlare IPCAgent: skipped, {reason}")
        return None
    started = time.perf_counter()
    small = latency(args.tasks, args.repeats)
    print(
        f"NVFlare IPCAgent, small task round trip, {args.tasks} tasks, median of {args.repeats}: "
        f"{small['task_us']['median'] / 1e3:.1f} ms per task "
        f"({small['task_us']['min'] / 1e3:.1f}-{small['task_us']['max'] / 1e3:.1f}), "
        f"{small['tasks_per_s']:.2f} tasks/s, CPU per task: "
        f"site {small['cpu_ms_per_task']['site']:.1f} ms, "
        f"agent {small['cpu_ms_per_task']['agent']:.1f} ms "
        f"[{time.perf_counter() - started:.0f} s]"
    )
    started = time.perf_counter()
    large = throughput(args.mib, args.repeats)
    print(
        f"NVFlare IPCAgent, {args.mib:g} MiB out and back, median of {args.repeats}: "
        f"{large['seconds']['median']:.2f} s "
        f"({large['seconds']['min']:.2f}-{large['seconds']['max']:.2f}), "
        f"{large['gbytes_per_s']:.2f} GB/s, peak RSS growth / payload: "
        f"site {large['site_rss_x']:.2f}x, agent {large['agent_rss_x']:.2f}x; peak RSS: "
        f"site {large['site']['peak_rss_mib']:.0f} MiB, "
        f"agent {large['agent']['peak_rss_mib']:.0f} MiB "
        f"[{time.perf_counter() - started:.0f} s]"
    )
    return None


if __name__ == "__main__":
    main()
