"""The ``flare-agent-async`` command: ``demo``, ``site`` and ``agent``."""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import logging
import os
import signal
import ssl
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar, cast

import anyio
import anyio.to_thread
from anyio.abc import TaskStatus

from . import demo as _demo
from ._environment import ENV_SECRET
from .agent import AsyncFlareAgent
from .defs import RC, Task, TaskResult
from .exceptions import FlareAgentError
from .site import FlareSite
from .sync import SyncFlareAgent
from .transports import Progress

Trainer = Callable[[Task], TaskResult | Awaitable[TaskResult]]


class CommandError(Exception):
    """A usage or set-up problem, told in one line with exit status 1."""


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flare-agent-async", description="An async agent runtime for federated learning."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser(
        "demo", help="run a federated training on this machine: a site and its agents"
    )
    demo.add_argument("--agents", type=_positive, default=4, help="agent processes (4)")
    demo.add_argument("--rounds", type=_positive, default=5, help="rounds of FedAvg (5)")
    demo.add_argument("--transport", choices=["tcp", "unix", "tls", "memory"], default="tcp")
    demo.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    demo.add_argument("--sync", action="store_true", help="agents use SyncFlareAgent")
    demo.add_argument("--model-mb", type=float, default=0.0, help="pad the model (MiB)")
    demo.add_argument("--abort-round", type=int, help="in this round the site aborts one task")
    demo.add_argument("--seed", type=int, default=0, help="seed of the synthetic data (0)")
    _output_options(demo)

    site = commands.add_parser(
        "site", help="run the demo's FedAvg job as a site, for agents to join"
    )
    site.add_argument("--listen", required=True, help="URL to listen at, e.g. tcp://0.0.0.0:8002")
    site.add_argument("--agents", required=True, help="agent ids, comma-separated")
    site.add_argument("--rounds", type=_positive, default=5)
    site.add_argument("--site-name", default="site-1")
    site.add_argument("--secret", help="a secret agents must prove (or $FLARE_AGENT_SECRET)")
    site.add_argument("--seed", type=int, default=0)
    site.add_argument("--wait", type=float, default=300.0, help="seconds to wait for the agents")
    site.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    _output_options(site)

    agent = commands.add_parser("agent", help="serve a site's tasks with a trainer function")
    agent.add_argument("trainer", help="module:function taking a Task, returning a TaskResult")
    agent.add_argument("--connect", required=True, help="the site's URL")
    agent.add_argument("--agent-id", required=True)
    agent.add_argument("--site-name", default="site-1")
    agent.add_argument("--secret", help="the site's secret (or $FLARE_AGENT_SECRET)")
    agent.add_argument("--sync", action="store_true", help="use SyncFlareAgent, a blocking loop")
    agent.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    agent.add_argument("--connect-timeout", type=float, default=30.0)
    return parser


def _output_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--json", action="store_true", help="print the results as JSON")
    group.add_argument("--quiet", action="store_true", help="print nothing but errors")


# -- agent ----------------------------------------------------------------------------------------


def load_trainer(spec: str) -> Trainer:
    """The function named ``module:function``.

    :raises CommandError: the module or the function cannot be found.
    """
    module_name, sep, function_name = spec.partition(":")
    if not sep or not module_name or not function_name:
        raise CommandError(f"trainer must be module:function, got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise CommandError(f"cannot import {module_name!r}: {exc}") from exc
    trainer = getattr(module, function_name, None)
    if not callable(trainer):
        raise CommandError(f"{module_name!r} has no function {function_name!r}")
    return trainer  # type: ignore[no-any-return]


def _failure(exc: BaseException) -> TaskResult:
    """The result of a trainer that raised: the site learns what happened."""
    return TaskResult({"error": f"{type(exc).__name__}: {exc}"}, None, RC.EXECUTION_EXCEPTION)


T = TypeVar("T")


def _interruptible(main: Callable[[], Awaitable[T]]) -> Callable[[], Awaitable[T]]:
    """``main`` run so that Ctrl-C (or SIGTERM) cancels it cleanly, then raises KeyboardInterrupt.

    The signal is received by a task rather than raised into whatever code runs at that moment,
    so the site still says goodbye and task groups unwind in order.
    """

    async def run() -> T:
        interrupted = False
        result: T | None = None
        async with anyio.create_task_group() as group:

            async def watch(*, task_status: TaskStatus[None]) -> None:
                nonlocal interrupted
                with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                    task_status.started()
                    async for _ in signals:
                        interrupted = True
                        group.cancel_scope.cancel()
                        return

            await group.start(watch)  # the signals are ours before the job begins
            result = await main()
            group.cancel_scope.cancel()
        if interrupted:
            raise KeyboardInterrupt
        return cast(T, result)

    return run


def _checked(result: object) -> TaskResult:
    if isinstance(result, TaskResult):
        return result
    return _failure(TypeError(f"the trainer returned {type(result).__name__}, not a TaskResult"))


_log = logging.getLogger("flare_agent_async.cli")


async def serve_async(agent: AsyncFlareAgent, trainer: Trainer) -> int:
    """Serve tasks until the site says goodbye; a trainer error fails only its task."""
    served = 0
    async for task in agent.tasks():
        try:
            result: object = trainer(task)
            if inspect.isawaitable(result):
                result = await result
            outcome = _checked(result)
        except Exception as exc:
            _log.exception("trainer failed on %s", task)
            outcome = _failure(exc)
        await agent.submit_result(outcome)
        served += 1
    return served


def serve_sync(agent: SyncFlareAgent, trainer: Trainer) -> int:
    """`serve_async` for a blocking loop: the trainer must be a plain function."""
    served = 0
    for task in agent.tasks():
        try:
            result: object = trainer(task)
            if inspect.isawaitable(result):
                raise TypeError("an async trainer needs an async agent: drop --sync")
            outcome = _checked(result)
        except Exception as exc:
            _log.exception("trainer failed on %s", task)
            outcome = _failure(exc)
        agent.submit_result(outcome)
        served += 1
    return served


def run_agent(args: argparse.Namespace) -> int:
    trainer = load_trainer(args.trainer)
    options: dict[str, Any] = {
        "agent_id": args.agent_id,
        "site_name": args.site_name,
        "secret": args.secret or os.environ.get(ENV_SECRET),
        "connect_timeout": args.connect_timeout,
    }
    if args.sync:
        with SyncFlareAgent(args.connect, backend=args.backend, **options) as agent:
            served = serve_sync(agent, trainer)
    else:

        async def main() -> int:
            async with AsyncFlareAgent(args.connect, **options) as agent:
                return await serve_async(agent, trainer)

        served = anyio.run(_interruptible(main), backend=args.backend)
    print(f"agent {args.agent_id}: served {served} task(s); the site said goodbye", file=sys.stderr)
    return 0


# -- site and demo --------------------------------------------------------------------------------


class Display:
    """What a person watches: rich progress while the job runs, a table at the end."""

    def __init__(self, rounds: int, agent_ids: list[str], *, quiet: bool, as_json: bool) -> None:
        self.quiet = quiet or as_json
        self.as_json = as_json
        self._states = dict.fromkeys(agent_ids, "waiting")
        self._live: Any = None
        self._progress: Any = None
        self._rounds = rounds
        self._round_task: Any = None

    def __enter__(self) -> Display:
        if not self.quiet:
            from rich.live import Live
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            self._progress = Progress(
                TextColumn("[bold]FedAvg"),
                BarColumn(),
                TextColumn("round {task.completed}/{task.total}"),
                TextColumn("{task.description}"),
                TimeElapsedColumn(),
            )
            self._round_task = self._progress.add_task("", total=self._rounds)
            # Live calls __rich__ on every refresh: events only change the state shown.
            self._live = Live(self, refresh_per_second=8, transient=True)
            self._live.__enter__()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._live is not None:
            self._live.__exit__(*exc_info)

    def __rich__(self) -> Any:
        from rich.console import Group
        from rich.table import Table

        agents = Table.grid(padding=(0, 2))
        for agent_id, state in self._states.items():
            agents.add_row(f"  {agent_id}", state)
        return Group(self._progress, agents)

    def event(self, kind: str, details: dict[str, Any]) -> None:
        if self.quiet:
            return
        agent = details.get("agent")
        if kind == "sent" and agent:
            self._states[agent] = "[yellow]training"
        elif kind == "done" and agent:
            accuracy = details["meta"].get("local_accuracy", 0.0)
            self._states[agent] = f"[green]done[/] local accuracy {accuracy:.3f}"
        elif kind == "aborted" and agent:
            self._states[agent] = "[red]aborted by the site"
        elif kind == "failed" and agent:
            self._states[agent] = f"[red]failed[/] {details['meta'].get('error', '')}"
        elif kind == "aggregated":
            self._progress.update(
                self._round_task,
                completed=details["round"],
                description=f"held-out accuracy {details['accuracy']:.3f}",
            )

    def progress(self, agent_id: str, progress: Progress) -> None:
        """Bytes moving to or from an agent, for large models."""
        if self.quiet or agent_id not in self._states:
            return
        moving = "sending to" if progress.direction == "send" else "receiving from"
        done, total = _human_bytes(progress.done), _human_bytes(progress.total)
        self._states[agent_id] = f"[cyan]{moving} the agent[/] {done} / {total}"

    def summary(self, history: list[_demo.Round], header: str) -> None:
        if self.as_json:
            json.dump(
                {
                    "rounds": [
                        {
                            "round": r.number,
                            "accuracy": r.accuracy,
                            "loss": r.loss,
                            "seconds": r.seconds,
                            "results": r.results,
                            "aborted": r.aborted,
                            "bytes_moved": r.bytes_moved,
                            "task_seconds": sorted(r.task_seconds),
                        }
                        for r in history
                    ],
                    "accuracy_first": history[0].accuracy,
                    "accuracy_last": history[-1].accuracy,
                },
                sys.stdout,
            )
            print()
            return
        if self.quiet:
            return
        from rich.console import Console
        from rich.table import Table

        table = Table(title=header)
        for column in (
            "round",
            "held-out accuracy",
            "loss",
            "results",
            "time",
            "moved",
            "task round trip",
        ):
            table.add_column(column, justify="right")
        for r in history:
            trip = sorted(r.task_seconds)[len(r.task_seconds) // 2] if r.task_seconds else 0.0
            table.add_row(
                str(r.number),
                f"{r.accuracy:.3f}",
                f"{r.loss:.3f}",
                f"{r.results}" + (f" ({len(r.aborted)} aborted)" if r.aborted else ""),
                f"{r.seconds * 1e3:.0f} ms",
                _human_bytes(r.bytes_moved),
                f"{trip * 1e3:.1f} ms",
            )
        Console().print(table)


def _human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} GiB"


def _tls_contexts() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A throwaway CA's certificate for the site, and trust in it for the agents."""
    try:
        import trustme
    except ImportError as exc:
        raise CommandError(
            "--transport tls makes throwaway certificates with trustme: pip install trustme"
        ) from exc

    authority = trustme.CA()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("127.0.0.1").configure_cert(server)
    client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    authority.configure_trust(client)
    return server, client


def run_demo(args: argparse.Namespace) -> int:
    agent_ids = [f"agent-{n}" for n in range(args.agents)]
    display = Display(args.rounds, agent_ids, quiet=args.quiet, as_json=args.json)
    server_context = client_context = None
    if args.transport == "tls":
        server_context, client_context = _tls_contexts()

    async def main() -> list[_demo.Round]:
        with tempfile.TemporaryDirectory(prefix="flare-demo-", dir="/tmp") as folder:
            return await _run_demo_in(folder)

    async def _run_demo_in(folder: str) -> list[_demo.Round]:
        url = {
            "tcp": "tcp://127.0.0.1:0",
            "tls": "tls://127.0.0.1:0",
            "unix": f"unix://{folder}/site.sock",
            "memory": "memory://",
        }[args.transport]
        # Agents run in the outer group: leaving the site says goodbye, then they end.
        async with (
            anyio.create_task_group() as group,
            FlareSite("site-1", on_progress=display.progress) as site,
        ):
            bound = await site.listen(url, ssl_context=server_context)
            for agent_id in agent_ids:
                if args.transport == "memory" or args.transport == "tls":
                    group.start_soon(_agent_in_process, bound, agent_id, args, client_context)
                else:
                    group.start_soon(_agent_process, bound, agent_id, args)
            for agent_id in agent_ids:
                await site.wait_for_agent(agent_id, timeout=60)
            with display:
                history, _ = await _demo.run_fedavg(
                    site,
                    agent_ids,
                    rounds=args.rounds,
                    seed=args.seed,
                    model_mb=args.model_mb,
                    abort_round=args.abort_round,
                    on_event=display.event,
                )
        return history

    history = anyio.run(_interruptible(main), backend=args.backend)
    mode = "sync" if args.sync else "async"
    display.summary(
        history,
        f"FedAvg, {args.agents} {mode} agents over {args.transport} ({args.backend})",
    )
    return 0


async def _agent_in_process(
    url: str, agent_id: str, args: argparse.Namespace, context: ssl.SSLContext | None
) -> None:
    """An agent in the demo's own process: for memory:// (one event loop) and tls (whose test
    certificates live in this process)."""
    options: dict[str, Any] = {"agent_id": agent_id, "site_name": "site-1", "ssl_context": context}
    if args.sync:
        if args.transport == "memory":
            raise CommandError("--sync needs a network transport: memory:// lives in one loop")

        def blocking_loop() -> None:  # in a worker thread: this loop serves the site
            with SyncFlareAgent(url, backend=args.backend, **options) as agent:
                serve_sync(agent, _demo.train)

        await anyio.to_thread.run_sync(blocking_loop)
        return
    async with AsyncFlareAgent(url, **options) as agent:
        await serve_async(agent, _demo.train)


async def _agent_process(url: str, agent_id: str, args: argparse.Namespace) -> None:
    """An agent in a process of its own, as ``flare-agent-async agent`` runs it."""
    command = [
        *(sys.executable, "-m", "flare_agent_async", "agent", "flare_agent_async.demo:train"),
        *("--connect", url, "--agent-id", agent_id, "--backend", args.backend),
    ]
    if args.sync:
        command.append("--sync")
    process = await anyio.open_process(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    async with process:
        assert process.stderr is not None
        errors = b"".join([chunk async for chunk in process.stderr])  # read as it comes
        await process.wait()
    if process.returncode:
        tail = errors.decode(errors="replace")[-2000:]
        raise CommandError(f"{agent_id} exited with status {process.returncode}:\n{tail}")


def run_site(args: argparse.Namespace) -> int:
    agent_ids = [agent_id for agent_id in args.agents.split(",") if agent_id]
    display = Display(args.rounds, agent_ids, quiet=args.quiet, as_json=args.json)
    secret = args.secret or os.environ.get(ENV_SECRET)

    async def main() -> list[_demo.Round]:
        async with FlareSite(args.site_name, secret=secret) as site:
            url = await site.listen(args.listen)
            if not display.quiet:
                print(
                    f"site {args.site_name} listening at {url}; waiting for {len(agent_ids)} agents"
                )
            try:
                with anyio.fail_after(args.wait):
                    for agent_id in agent_ids:
                        await site.wait_for_agent(agent_id)
            except TimeoutError:
                raise CommandError(f"not every agent connected within {args.wait:g} s") from None
            with display:
                history, _ = await _demo.run_fedavg(
                    site, agent_ids, rounds=args.rounds, seed=args.seed, on_event=display.event
                )
            return history

    history = anyio.run(_interruptible(main), backend=args.backend)
    display.summary(history, f"FedAvg at {args.site_name}, {len(agent_ids)} agents")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    command = {"agent": run_agent, "site": run_site, "demo": run_demo}[args.command]
    try:
        return command(args)
    except BaseException as exc:  # errors from task groups come in exception groups
        if _find(exc, (KeyboardInterrupt,)) is not None:
            return 130
        error = _find(exc, (CommandError, FlareAgentError, ValueError, OSError))
        if error is None:
            raise
        print(f"flare-agent-async {args.command}: error: {error}", file=sys.stderr)
        return 1


def _find(exc: BaseException, kinds: tuple[type[BaseException], ...]) -> BaseException | None:
    """The first exception of ``kinds`` in ``exc``, looking inside exception groups."""
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _find(inner, kinds)
            if found is not None:
                return found
        return None
    return exc if isinstance(exc, kinds) else None


if __name__ == "__main__":
    sys.exit(main())
