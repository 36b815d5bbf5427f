"""SyncFlareAgent's own rules: threads, signals, KeyboardInterrupt, a caller with its own event
loop, nothing left behind. (The behaviour table runs through it in test_behaviour.py.)"""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from conftest import site_thread

from flare_agent_async import (
    AgentClosed,
    CallStateError,
    FlareAgent,
    SyncFlareAgent,
    Task,
    TaskResult,
)
from flare_agent_async._portal import PortalRunner
from flare_agent_async.protocol import ResultAck
from flare_agent_async.testing import FaultyConnector
from flare_agent_async.transports import connector_for

OK = TaskResult({}, {"ok": True})


def run_script(script: str, hang: str) -> subprocess.CompletedProcess[str]:
    """Run a Python script from the repository root, for 10 s at most; ``hang`` says what it
    means if it does not end."""
    try:
        return subprocess.run(
            [sys.executable, "-c", script],
            capture_output=True,
            text=True,
            timeout=10,
            cwd=str(Path(__file__).parent.parent),
        )
    except subprocess.TimeoutExpired:
        pytest.fail(hang)


def make(url: str, **options: Any) -> SyncFlareAgent:
    return SyncFlareAgent(url, agent_id="a1", site_name="site-1", **options)


def agent_thread(agent_id: str = "a1") -> threading.Thread | None:
    """The event loop thread of the started agent ``agent_id``, if it runs."""
    threads = [t for t in threading.enumerate() if t.name == f"flare-agent-{agent_id}"]
    assert len(threads) <= 1, threads
    return threads[0] if threads else None


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_a_synchronous_training_loop(backend: str) -> None:
    with site_thread() as site:
        results: list[Future[TaskResult]] = []
        with make(site.url, backend=backend) as agent:
            assert isinstance(agent, FlareAgent) and agent.connected
            for n in range(3):
                results.append(site.run_task_soon("a1", {"n": n}))
                task = agent.get_task(timeout=10)
                assert task is not None and task.data == {"n": n}
                assert agent.submit_result(TaskResult({}, {"n": n + 1}))
        assert [future.result(10).data for future in results] == [{"n": 1}, {"n": 2}, {"n": 3}]


def test_tasks_ends_when_the_site_says_goodbye() -> None:
    seen: list[int] = []
    with site_thread() as site:
        agent = make(site.url)
        agent.start()

        def trainer() -> None:
            for task in agent.tasks():
                seen.append(task.data)
                agent.submit_result(OK)

        thread = threading.Thread(target=trainer)
        thread.start()
        for n in range(3):
            site.run_task_soon("a1", n).result(10)
    thread.join(10)  # leaving the site said goodbye: tasks() ended
    assert not thread.is_alive() and seen == [0, 1, 2]
    agent.stop()


def test_get_task_times_out_on_time_and_keeps_a_later_task() -> None:
    with site_thread() as site, make(site.url) as agent:
        started = time.monotonic()
        assert agent.get_task(timeout=0.05) is None
        assert 0.05 <= time.monotonic() - started < 2  # the timeout, not a polling period
        future = site.run_task_soon("a1", 1)
        task = agent.get_task(timeout=10)
        assert task is not None and task.data == 1
        agent.submit_result(OK)
        assert future.result(10).data == {"ok": True}


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_get_task_timing_out_as_its_task_arrives_loses_no_task(backend: str) -> None:
    """The wait is given up in the agent's loop, where tasks are taken: a task is either
    returned or left for the next call, never taken for a call that already returned None."""
    timed_out = 0
    with site_thread() as site, make(site.url, backend=backend) as agent:
        for n in range(40):
            sent: list[Future[TaskResult]] = []
            later = threading.Timer(
                n % 5 / 1000, lambda n=n, sent=sent: sent.append(site.run_task_soon("a1", n))
            )
            later.start()
            for _ in range(100_000):  # bounded: each try waits at least 100 µs
                task = agent.get_task(timeout=0.0001)
                if task is not None:
                    break
                timed_out += 1
            else:
                pytest.fail(f"task {n} never came")
            assert task.data == n
            assert agent.submit_result(OK)
            later.join()
            assert sent[0].result(10).data == {"ok": True}
    assert timed_out, "no call timed out while a task was on its way: the race was not run"


def test_stop_from_another_thread_wakes_a_blocked_get_task_at_once() -> None:
    with site_thread() as site:
        agent = make(site.url)
        agent.start()
        timer = threading.Timer(0.05, agent.stop)
        timer.start()
        started = time.monotonic()
        with pytest.raises(AgentClosed):
            agent.get_task()
        assert time.monotonic() - started < 5
        timer.join()
        agent.stop()  # idempotent


def test_stop_from_a_signal_handler_wakes_a_blocked_get_task() -> None:
    with site_thread() as site:
        agent = make(site.url)
        agent.start()
        previous = signal.signal(signal.SIGUSR1, lambda *_: agent.stop())
        try:
            threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGUSR1)).start()
            with pytest.raises(AgentClosed):
                agent.get_task(timeout=10)
        finally:
            signal.signal(signal.SIGUSR1, previous)
        assert agent_thread() is None


def test_two_threads_calling_get_task_get_one_task_and_one_call_state_error() -> None:
    with site_thread() as site, make(site.url) as agent:
        outcomes: list[object] = []
        barrier = threading.Barrier(2)

        def fetch() -> None:
            barrier.wait()
            try:
                outcomes.append(agent.get_task(timeout=10))
            except CallStateError as exc:
                outcomes.append(exc)

        threads = [threading.Thread(target=fetch) for _ in range(2)]
        for thread in threads:
            thread.start()
        future = site.run_task_soon("a1", 1)
        for thread in threads:
            thread.join(10)
        tasks = [outcome for outcome in outcomes if isinstance(outcome, Task)]
        errors = [outcome for outcome in outcomes if isinstance(outcome, CallStateError)]
        assert (len(tasks), len(errors)) == (1, 1)
        agent.submit_result(OK)
        future.result(10)


@contextmanager
def python_ctrl_c() -> Iterator[None]:
    """Python's own Ctrl-C handler, even where the suite was started with SIGINT ignored (as a
    shell's background job is): otherwise an interrupt sent by a test never comes."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def test_keyboard_interrupt_while_blocked_loses_nothing_and_the_agent_still_stops() -> None:
    with python_ctrl_c(), site_thread() as site:
        agent = make(site.url)
        agent.start()
        main = threading.main_thread().ident
        assert main == threading.get_ident()
        threading.Timer(0.05, signal.pthread_kill, (main, signal.SIGINT)).start()
        with pytest.raises(KeyboardInterrupt):
            agent.get_task()
        future = site.run_task_soon("a1", 5)  # arrives after the interrupted call
        task = agent.get_task(timeout=10)
        assert task is not None and task.data == 5
        assert agent.submit_result(OK)
        future.result(10)
        agent.stop()


def test_aborts_reach_a_synchronous_trainer() -> None:
    with site_thread() as site, make(site.url) as agent:
        future = site.run_task_soon("a1", 1, task_id="t1")
        task = agent.get_task(timeout=10)
        assert task is not None and not task.aborted
        aborted = threading.Event()
        task.add_abort_callback(aborted.set)
        site.portal.call(site.site.abort_task, "a1", "t1")
        assert aborted.wait(10) and task.aborted  # checked between batches, say
        assert agent.submit_result(OK) is False
        with pytest.raises(Exception, match="aborted"):
            future.result(10)


def test_it_works_from_a_thread_that_runs_its_own_asyncio_loop() -> None:
    with site_thread() as site:

        async def notebook_cell() -> Any:
            with make(site.url) as agent:  # blocking calls inside a running loop: its own loop
                future = site.run_task_soon("a1", 3)
                task = agent.get_task(timeout=10)
                agent.submit_result(OK)
                future.result(10)
                return task.data if task else None

        assert asyncio.run(notebook_cell()) == 3


def test_errors_cross_into_the_callers_thread_with_their_messages() -> None:
    agent = make("tcp://127.0.0.1:1")
    with pytest.raises(CallStateError, match="not started"):
        agent.get_task()
    with pytest.raises(ValueError, match="backend must be one of asyncio, trio, uvloop"):
        make("tcp://127.0.0.1:1", backend="curio")
    with site_thread() as site, make(site.url) as started:
        with pytest.raises(TypeError, match="timeout must be"):
            started.get_task("soon")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="timeout must > 0"):
            started.get_task(-1)
        with pytest.raises(CallStateError, match="without a fetched task"):
            started.submit_result(OK)
        with pytest.raises(CallStateError, match="already started"):
            started.start()


def _threads_and_fds() -> tuple[int, int]:
    return threading.active_count(), len(os.listdir("/proc/self/fd"))


def _assert_back_to(before: tuple[int, int]) -> None:
    """The site closes its end of a connection in its own thread, a moment after it lets the
    agent go: poll, bounded, until the counts are back."""
    deadline = time.monotonic() + 10
    while (now := _threads_and_fds()) != before:
        assert time.monotonic() < deadline, f"threads and descriptors stayed {now}, were {before}"
        time.sleep(0.01)


def test_stop_leaves_no_thread_or_file_descriptor_behind() -> None:
    with site_thread() as site:
        before = _threads_and_fds()
        for _ in range(3):
            with make(site.url) as agent:
                assert agent.get_task(timeout=0.01) is None
            site.wait_until_no_agent()
        _assert_back_to(before)


def test_a_started_agent_that_is_collected_stops() -> None:
    with site_thread() as site:
        before = _threads_and_fds()
        agent = make(site.url)
        agent.start()
        site.wait_for_agent("a1")
        thread = agent_thread()
        assert thread is not None
        del agent
        gc.collect()
        thread.join(10)
        assert not thread.is_alive()
        site.wait_until_no_agent()
        _assert_back_to(before)


def test_interpreter_exit_stops_a_started_agent_and_says_goodbye() -> None:
    script = (
        "import sys\n"
        "from flare_agent_async import SyncFlareAgent\n"
        "agent = SyncFlareAgent(sys.argv[1], agent_id='a1', site_name='site-1')\n"
        "agent.start()\n"
        "print('started', flush=True)\n"  # and exit without stop()
    )
    with site_thread() as site:
        done = subprocess.run(
            [sys.executable, "-c", script, site.url], capture_output=True, text=True, timeout=30
        )
        assert done.returncode == 0 and done.stdout == "started\n", done.stderr
        with pytest.raises(Exception, match="said goodbye"):
            site.portal.call(lambda: site.site.run_task("a1", "train", 1))


def test_stop_from_an_abort_callback_does_not_deadlock() -> None:
    with site_thread() as site:
        agent = make(site.url)
        agent.start()
        future = site.run_task_soon("a1", 1, task_id="t1")
        task = agent.get_task(timeout=10)
        assert task is not None
        task.add_abort_callback(agent.stop)  # runs in the agent's own thread
        site.portal.call(site.site.abort_task, "a1", "t1")
        thread = agent_thread()
        assert thread is not None
        thread.join(10)
        assert not thread.is_alive(), "the agent did not stop"
        with pytest.raises(AgentClosed):
            agent.get_task(timeout=1)
        with pytest.raises(Exception, match="aborted"):
            future.result(10)
        agent.stop()


def test_a_blocking_call_from_an_abort_callback_is_refused() -> None:
    with site_thread() as site, make(site.url) as agent:
        future = site.run_task_soon("a1", 1, task_id="t1")
        task = agent.get_task(timeout=10)
        assert task is not None
        refused: list[BaseException] = []
        called = threading.Event()

        def callback() -> None:
            try:
                agent.get_task(timeout=1)
            except CallStateError as exc:
                refused.append(exc)
            called.set()

        task.add_abort_callback(callback)
        site.portal.call(site.site.abort_task, "a1", "t1")
        assert called.wait(10)
        assert len(refused) == 1 and "must not block" in str(refused[0])
        with pytest.raises(Exception, match="aborted"):
            future.result(10)


# -- races found in review, kept fixed ------------------------------------------------------


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_calls_racing_with_stop_all_end(backend: str) -> None:
    """Threads that keep calling get_task while another thread stops the agent: every call
    returns or raises AgentClosed, none waits forever, whichever side of the stop it lands on."""
    with site_thread() as site:
        for _ in range(5):
            agent = make(site.url, backend=backend)
            agent.start()
            outcomes: list[BaseException] = []
            calling = threading.Barrier(4)

            def caller(
                agent: SyncFlareAgent, outcomes: list[BaseException], calling: threading.Barrier
            ) -> None:
                calling.wait(10)
                try:
                    for _ in range(10_000):  # bounded: the stop ends it long before
                        agent.get_task(timeout=0.001)
                except BaseException as exc:
                    outcomes.append(exc)

            threads = [
                threading.Thread(target=caller, args=(agent, outcomes, calling), daemon=True)
                for _ in range(3)
            ]
            for thread in threads:
                thread.start()
            calling.wait(10)
            agent.stop()
            for thread in threads:
                thread.join(10)
            assert not any(t.is_alive() for t in threads), "a call racing with stop() hangs"
            assert len(outcomes) == 3 and all(isinstance(e, AgentClosed) for e in outcomes), (
                outcomes
            )
            assert agent_thread() is None


class Nothing:
    """An async context manager that holds nothing: a bare loop for `PortalRunner`."""

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, *exc_info: object) -> None:
        return None


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_a_call_the_loop_never_answers_ends_when_the_loop_stops(backend: str) -> None:
    """A blocking call whose answer the loop gives later (submit_result's verdict): when the loop
    ends without giving it, the call raises AgentClosed instead of waiting forever."""
    runner = PortalRunner(Nothing(), backend, name="flare-agent-test")
    runner.start()
    ran = threading.Event()
    outcome: Future[object] = Future()

    def call() -> None:
        try:
            outcome.set_result(runner.call_settled(lambda settle: ran.set()))
        except BaseException as exc:
            outcome.set_exception(exc)

    threading.Thread(target=call, daemon=True).start()
    assert ran.wait(10), "the call never reached the loop"
    runner.close()
    with pytest.raises(AgentClosed, match="stopped"):
        outcome.result(10)
    with pytest.raises(AgentClosed):
        runner.call_sync(lambda: None)


def test_an_interrupted_start_stops_the_connect() -> None:
    """KeyboardInterrupt while start() waits for the connection: start() joins the thread, but
    the thread connects later and then waits for `_stop` forever -> start() never returns."""
    script = """
import os, signal, socket, sys, threading, time
import anyio.from_thread
from flare_agent_async import FlareSite, SyncFlareAgent
probe = socket.socket(); probe.bind(("127.0.0.1", 0)); port = probe.getsockname()[1]; probe.close()
url = f"tcp://127.0.0.1:{port}"
agent = SyncFlareAgent(url, agent_id="a1", site_name="site-1", connect_timeout=60)
main = threading.main_thread().ident
signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with SIGINT ignored
threading.Timer(0.3, signal.pthread_kill, (main, signal.SIGINT)).start()
def site():
    with anyio.from_thread.start_blocking_portal() as portal:
        s = FlareSite("site-1")
        with portal.wrap_async_context_manager(s):
            portal.call(s.listen, url)
            time.sleep(30)
threading.Thread(target=site, daemon=True).start()  # the site comes up a moment later
t0 = time.monotonic()
try:
    agent.start()
except KeyboardInterrupt:
    print(f"interrupted after {time.monotonic() - t0:.1f}s", flush=True)
os._exit(0)
"""
    script = script.replace(
        "threading.Thread(target=site, daemon=True).start()", "threading.Timer(1.0, site).start()"
    )
    done = run_script(
        script, "start() interrupted by Ctrl-C never returned (joins a thread that waits forever)"
    )
    assert "interrupted" in done.stdout, done.stderr


def test_stop_from_a_signal_handler_during_stop() -> None:
    """stop() from a signal handler while the main thread is inside stop(), waiting up to
    close_timeout for a result's acknowledgement: no self-deadlock."""
    script = """
import os, signal, sys, threading, time
sys.path.insert(0, "tests")
from test_sync import OK, make, site_thread
from flare_agent_async._portal import PortalRunner
from flare_agent_async.protocol import ResultAck
from flare_agent_async.testing import FaultyConnector
from flare_agent_async.transports import connector_for
with site_thread() as site:
    faulty = FaultyConnector(connector_for(site.url))
    faulty.drop_on_receive(lambda message: isinstance(message, ResultAck))
    agent = make(faulty, close_timeout=0.5)
    agent.start()
    site.run_task_soon("a1", 1)
    assert agent.get_task(timeout=10) is not None
    threading.Thread(target=agent.submit_result, args=(OK,), daemon=True).start()
    signal.signal(signal.SIGTERM, lambda *_: agent.stop())
    threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGTERM)).start()
    agent.stop()  # waits for the acknowledgement that never comes, up to close_timeout
    print("stopped", flush=True)
    os._exit(0)
"""
    done = run_script(script, "stop() from a signal handler during stop() deadlocked")
    assert "stopped" in done.stdout, done.stderr


def test_stop_after_a_stop_from_an_abort_callback_joins_the_thread() -> None:
    with site_thread() as site:
        faulty = FaultyConnector(connector_for(site.url))
        # The goodbye is never read by the site: the stop that the callback starts waits for
        # nothing, but the result below is never acknowledged, so it lasts close_timeout.
        faulty.drop_on_receive(lambda message: isinstance(message, ResultAck))
        agent = make(faulty, close_timeout=0.5)
        agent.start()
        first = site.run_task_soon("a1", 0, task_id="t0")
        assert agent.get_task(timeout=10) is not None
        submitted = threading.Thread(target=agent.submit_result, args=(OK,), daemon=True)
        submitted.start()  # unacknowledged: the stop waits for it, up to close_timeout
        assert first.result(10).data == {"ok": True}  # the site has it: t0 is answered
        future = site.run_task_soon("a1", 1, task_id="t1")
        task = agent.get_task(timeout=10)
        assert task is not None
        fired = threading.Event()
        task.add_abort_callback(lambda: (agent.stop(), fired.set()))
        site.portal.call(site.site.abort_task, "a1", "t1")
        assert fired.wait(10)
        agent.stop()
        assert agent_thread() is None, "stop() returned before the thread ended"
        submitted.join(10)
        with pytest.raises(Exception, match="aborted"):
            future.result(10)
