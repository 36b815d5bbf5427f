"""`AgentExecutor`: an NVFlare executor that hosts a `FlareSite` and runs each task on an agent.

NVFlare calls executors from its own threads; the site lives in an event loop on a thread of its
own (an anyio blocking portal). A task crosses into the loop once, and its result comes back
through a future, so a result is handed to NVFlare the moment it arrives. NVFlare's abort signal is
a plain flag with no way to be notified, so it is the one thing checked on a timer while a task
runs (``abort_check_interval``); a triggered signal cancels the task, which aborts it at the agent.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import shlex
import signal
import ssl
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from typing import Any, TypeVar, cast

import anyio
import anyio.abc
import anyio.from_thread
import numpy as np
from nvflare.apis.analytix import ANALYTIC_EVENT_TYPE, AnalyticsDataType, LogWriterName
from nvflare.apis.event_type import EventType
from nvflare.apis.executor import Executor
from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_constant import ReturnCode as FlareRC
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable, make_reply
from nvflare.apis.signal import Signal
from nvflare.apis.utils.analytix_utils import create_analytic_dxo, send_analytic_dxo
from nvflare.apis.utils.task_utils import materialize_lazy_download_refs

from .._environment import (
    CLIENT_SETTINGS,
    ENV_AGENT_ID,
    ENV_CLIENT_CONFIG,
    ENV_JOB_ID,
    ENV_SITE_NAME,
    ENV_URL,
)
from .._processes import processes_with
from .._validate import as_secret
from ..defs import RC, TaskResult
from ..exceptions import SiteError, TaskAborted
from ..site import Coming, FlareSite, HeldResult, LogRecord
from ..tls import server_context
from ._arrive import TASK_ROUTE, download_arrays_to, lazy_arrays, only_executors_of
from ._convert import BadShareable, result_to_shareable, shareable_to_task
from ._relay import consumed_in_client, relay

__all__ = ["AgentExecutor"]

T = TypeVar("T")

PASS_THROUGH_MIN_BYTES = 4 * 2**20
"""A task whose arrays are smaller than this has the next task come whole into the client job:
handing small arrays on one by one costs a round trip to the server and saves nothing."""

_ENV_LAUNCH = "FLARE_AGENT_LAUNCH"
"""Marks the launched trainer and all it starts, to find what it leaves behind."""

JOB_META_KEY_AGENT_ID = "agent_id"
"""The job meta key NVFlare's IPCExchanger reads the agent id from; the executor reads it too."""


class _Aborted(Exception):
    """NVFlare's abort signal fired while a task was running."""


class _Cancel:
    """Cancels a call in the site's loop, even one whose task has not started yet."""

    def __init__(self) -> None:
        self.scope: anyio.CancelScope | None = None
        self.requested = False

    def __call__(self) -> None:
        self.requested = True
        if self.scope is not None:
            self.scope.cancel()


class _TrainerExited(Exception):
    """The launched trainer exited before its agent connected."""


class _DownloadFailed(Exception):
    """The task's arrays could not be downloaded from the server."""


_Entry = tuple[str, Any] | Exception
"""An array of a task, by key, on its way from the download to the site; or why it failed."""
_Coming = tuple[list[str], anyio.abc.ObjectReceiveStream[_Entry]]


async def _entries(
    receive: anyio.abc.ObjectReceiveStream[_Entry],
) -> AsyncIterator[tuple[str, Any]]:
    """The entries from ``receive``; a failure in it is raised."""
    async with receive:
        async for entry in receive:
            if isinstance(entry, Exception):
                raise entry
            yield entry


class AgentExecutor(Executor):  # type: ignore[misc]
    """Runs NVFlare tasks on an agent (`AsyncFlareAgent` or `SyncFlareAgent`) through a `FlareSite`.

    At ``START_RUN`` it starts a site named after the NVFlare client, listening at
    ``listen_url``; the bound URL goes to the log and to ``url_file`` in the job's run directory,
    so a launcher can find it. Each task's DXO data and meta (with ``current_round`` and
    ``total_round`` from the task's headers, as NVFlare's IPCExchanger does) go to the agent; its
    result comes back as a DXO of the data kind in its meta (default ``WEIGHTS``), other return
    codes as they are. NVFlare's abort signal aborts the task at the agent; ``END_RUN`` says
    goodbye to the agent.

    With ``launch``, the executor starts the trainer itself, after the site listens, and stops it
    at the end of the run (it has ``launch_stop_timeout`` seconds to leave after the goodbye; then
    its process group is terminated, and killed if need be, and so is what it started outside
    that group, torchrun's ranks say, found by ``FLARE_AGENT_LAUNCH`` in their environment).
    The command may use ``{url}``, ``{site_name}``, ``{agent_id}``, ``{job_id}``, ``{app_dir}``
    and ``{python}`` (the Python that runs the client job, where NVFlare and this library are
    installed); it runs in the app's directory with the same values in the environment
    (``FLARE_AGENT_URL``,
    ``FLARE_AGENT_SITE_NAME``, ``FLARE_AGENT_ID``, ``FLARE_AGENT_JOB_ID``), and ``client_config``
    in ``FLARE_AGENT_CLIENT_CONFIG``.

    Every argument is JSON-friendly, for a job's config.

    :param agent_id: the agent to run tasks on; None: the job meta's ``agent_id`` (as for
        NVFlare's IPCExchanger), else ``"trainer"``.
    :param listen_url: where agents connect (``tcp://``, ``tls://``, ``unix://``); port 0 picks
        a free port.
    :param url_file: the file, in the job's run directory, the bound URL is written to; None: none.
    :param launch: the trainer's command line, or None to start the trainer some other way.
    :param launch_stop_timeout: how long the launched trainer has to exit after the goodbye.
    :param agent_connect_timeout: how long a task waits for the agent to connect before it fails.
    :param task_timeout: how long a task may run before it is aborted; None: no limit.
    :param heartbeat_interval: the site's heartbeat interval for its agents, in seconds.
    :param heartbeat_timeout: the silence after which an agent's connection is dropped.
    :param reconnect_timeout: how long a task waits for a disconnected agent to come back.
    :param secret_env: the name of an environment variable holding a secret the agent must prove
        it knows (the launched trainer inherits it); None: no secret.
    :param tls_certfile: with ``tls://``, the site's certificate chain (PEM).
    :param tls_keyfile: its private key (PEM), if not in ``tls_certfile``.
    :param tls_client_ca: for mutual TLS, the CA that agents' certificates must be signed by.
    :param abort_check_interval: how often a running task looks at NVFlare's abort signal.
    :param backend: the event loop of the site: ``"asyncio"`` or ``"trio"``.
    :param client_config: settings for a launched Client API trainer (``train_task_name``,
        ``eval_task_name``, ``submit_model_task_name``, ``transfer_type``), where its own
        arguments leave them unset.
    :param relay_results: the server downloads the result's arrays (the numpy arrays at the top
        of its data) from the trainer one at a time, through the client job, which holds none
        but the one on its way; the trainer's ``submit_result`` returns once the server has
        them. Results that something in the client job reads first (a result filter) come
        whole. False: every result comes to the client job whole, and NVFlare sends it from
        there.
    :param relay_tasks: the task's arrays (the numpy arrays at the top of its data) come from
        the server one at a time and go on to the trainer as each arrives, so that the two
        transfers overlap and the client job never holds the downloaded bytes of more than one
        array. Only in a job whose every executor is an `AgentExecutor` (it changes what the
        job's executors get); a task data filter still gets the task whole. False: NVFlare
        brings each task whole into the client job first.
    """

    def __init__(
        self,
        agent_id: str | None = None,
        listen_url: str = "tcp://127.0.0.1:0",
        url_file: str | None = "flare_agent_async.url",
        launch: str | None = None,
        launch_stop_timeout: float = 10.0,
        agent_connect_timeout: float = 60.0,
        task_timeout: float | None = None,
        heartbeat_interval: float = 5.0,
        heartbeat_timeout: float = 30.0,
        reconnect_timeout: float = 60.0,
        secret_env: str | None = None,
        tls_certfile: str | None = None,
        tls_keyfile: str | None = None,
        tls_client_ca: str | None = None,
        abort_check_interval: float = 0.1,
        backend: str = "asyncio",
        client_config: dict[str, str] | None = None,
        relay_results: bool = True,
        relay_tasks: bool = True,
    ) -> None:
        super().__init__()
        if agent_id is not None and (not isinstance(agent_id, str) or not agent_id):
            raise ValueError(f"agent_id must be a non-empty str or None, got {agent_id!r}")
        if not isinstance(listen_url, str) or "://" not in listen_url:
            raise ValueError(
                f"listen_url must be a URL such as tcp://127.0.0.1:0, got {listen_url!r}"
            )
        if listen_url.startswith("tls://") and not tls_certfile:
            raise ValueError("a tls:// listen_url needs tls_certfile (and tls_keyfile)")
        if launch is not None and (not isinstance(launch, str) or not launch.strip()):
            raise ValueError(f"launch must be a command line or None, got {launch!r}")
        for name, value in (
            ("launch_stop_timeout", launch_stop_timeout),
            ("agent_connect_timeout", agent_connect_timeout),
            ("abort_check_interval", abort_check_interval),
        ):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
        if task_timeout is not None and not task_timeout > 0:
            raise ValueError(f"task_timeout must be positive or None, got {task_timeout!r}")
        if backend not in ("asyncio", "trio"):
            raise ValueError(f"backend must be 'asyncio' or 'trio', got {backend!r}")
        if client_config is not None:
            unknown = sorted(set(client_config) - set(CLIENT_SETTINGS))
            if unknown:
                raise ValueError(f"client_config has unknown settings: {', '.join(unknown)}")
            if not all(isinstance(value, str) for value in client_config.values()):
                raise ValueError(f"client_config values must be strings, got {client_config!r}")
        self.agent_id = agent_id
        self.listen_url = listen_url
        self.url_file = url_file
        self.launch = launch
        self.launch_stop_timeout = float(launch_stop_timeout)
        self.client_config = client_config
        self.agent_connect_timeout = float(agent_connect_timeout)
        self.task_timeout = task_timeout
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_timeout = heartbeat_timeout
        self.reconnect_timeout = reconnect_timeout
        self.secret_env = secret_env
        self.tls_certfile = tls_certfile
        self.tls_keyfile = tls_keyfile
        self.tls_client_ca = tls_client_ca
        self.abort_check_interval = float(abort_check_interval)
        self.backend = backend
        self.relay_results = bool(relay_results)
        self.relay_tasks = bool(relay_tasks)
        self.url: str | None = None
        """The URL the site listens at, once the run started."""
        self._portal_cm: contextlib.AbstractContextManager[anyio.from_thread.BlockingPortal] | None
        self._portal_cm = None
        self._portal: anyio.from_thread.BlockingPortal | None = None
        self._engine: Any = None  # NVFlare's engine, for the analytics events of log records
        self._cell: Any = None  # the client job's cell, which serves relayed results
        self._relayed: Callable[[], None] | None = None  # abandons the last relayed result
        self._passes_tasks = False  # this executor made the cell pass tasks through
        self._host_future: concurrent.futures.Future[None] | None = None
        self._site: FlareSite | None = None
        self._sent_result: dict[str, Any] | None = None  # the arrays of the result NVFlare sends
        self._stop: anyio.Event | None = None
        self._trainer_exit: anyio.Event | None = None
        self._launch_mark: str | None = None
        self.trainer_returncode: int | None = None
        """The launched trainer's exit code once it exited (negative: the signal that ended it)."""

    # -- NVFlare events -------------------------------------------------------------------------

    def handle_event(self, event_type: str, fl_ctx: FLContext) -> None:
        """Start the site at ``START_RUN``; say goodbye and stop it at ``END_RUN``; let go of a
        result's arrays once NVFlare has sent it (``AFTER_SEND_TASK_RESULT``)."""
        if event_type == EventType.AFTER_SEND_TASK_RESULT:
            # The server has the result (NVFlare fires this once the send is over, retries
            # included): the client job need not hold it while the next task comes in.
            if self._sent_result is not None:
                self._sent_result.clear()
                self._sent_result = None
        elif event_type == EventType.START_RUN:
            try:
                self._start(fl_ctx)
            except Exception as exc:
                self._shutdown()
                self.system_panic(f"the agent site could not start: {exc}", fl_ctx)
        elif event_type == EventType.END_RUN:
            self._shutdown()

    def _start(self, fl_ctx: FLContext) -> None:
        engine = self._engine = fl_ctx.get_engine()
        self._cell = getattr(engine, "get_cell", lambda: None)()
        topics = getattr(self._cell, "decode_pass_through_topics", None)
        if (
            self.relay_tasks
            and isinstance(topics, set)
            and TASK_ROUTE not in topics
            and only_executors_of(AgentExecutor, fl_ctx)
        ):
            topics.add(TASK_ROUTE)
            self._passes_tasks = True
        job_id = str(fl_ctx.get_job_id())
        site_name = str(fl_ctx.get_identity_name())
        if self.agent_id is None:
            meta = fl_ctx.get_prop(FLContextKey.JOB_META)
            from_meta = meta.get(JOB_META_KEY_AGENT_ID) if isinstance(meta, dict) else None
            self.agent_id = from_meta if isinstance(from_meta, str) and from_meta else "trainer"
        workspace = engine.get_workspace()
        run_dir = str(workspace.get_run_dir(job_id))
        app_dir = str(workspace.get_app_dir(job_id))
        ssl_context = None
        if self.tls_certfile:
            ssl_context = server_context(
                self.tls_certfile, self.tls_keyfile, client_ca=self.tls_client_ca
            )
        secret = None
        if self.secret_env:
            secret = as_secret(os.environ.get(self.secret_env) or None)
            if secret is None:
                raise ValueError(f"the environment variable {self.secret_env} holds no secret")
        self._portal_cm = anyio.from_thread.start_blocking_portal(self.backend)
        self._portal = self._portal_cm.__enter__()
        self._host_future, url = self._portal.start_task(
            self._host, secret, ssl_context, site_name, job_id, app_dir
        )
        self.url = url
        if self.url_file:
            path = os.path.join(run_dir, self.url_file)
            with open(path + ".partial", "w") as file:
                file.write(url + "\n")
            os.replace(path + ".partial", path)
        self.log_info(
            fl_ctx, f"agent site {site_name!r} waits for agent {self.agent_id!r} at {url}"
        )
        if self._passes_tasks:
            self.log_info(fl_ctx, "tasks' arrays go on to the agent as they come from the server")

    def _forward_log(self, record: LogRecord) -> None:
        """Fire an agent's log record as NVFlare's analytics event (``analytix_log_stats``), as
        NVFlare's Client API executor does: ``ConvertToFedEvent`` takes it to the server's
        TensorBoard, MLflow or W&B receivers. A record without a data type is a ``SCALAR`` when its
        value is a number; others are not for NVFlare's tracking and stay at the site."""
        engine = self._engine
        kind = record.data_type
        if (
            kind is None
            and isinstance(record.value, int | float)
            and not isinstance(record.value, bool)
        ):
            kind = AnalyticsDataType.SCALAR.value
        if engine is None or kind is None:
            return
        options = dict(record.options)
        writer = options.pop("writer", None) or LogWriterName.TORCH_TB.value
        if record.step is not None:
            options.setdefault("global_step", record.step)
        try:
            dxo = create_analytic_dxo(
                tag=record.key,
                value=record.value,
                data_type=AnalyticsDataType(kind),
                writer=LogWriterName(writer),
                **options,
            )
        except (TypeError, ValueError) as exc:
            self.logger.warning(
                f"log record {record.key!r} of agent {record.agent_id!r} is not NVFlare "
                f"analytics data: {exc}"
            )
            return
        with engine.new_context() as fl_ctx:
            send_analytic_dxo(self, dxo=dxo, fl_ctx=fl_ctx, event_type=ANALYTIC_EVENT_TYPE)

    async def _host(
        self,
        secret: bytes | None,
        ssl_context: ssl.SSLContext | None,
        site_name: str,
        job_id: str,
        app_dir: str,
        *,
        task_status: anyio.abc.TaskStatus[str],
    ) -> None:
        """Run the site (and the launched trainer) until `_shutdown`."""
        # Made here, in the site's own event loop: NVFlare may fire START_RUN from a thread
        # that belongs to another event loop.
        site = FlareSite(
            site_name,
            job_id,  # a trainer that names its job (the Client API does) must name this one
            on_log=self._forward_log,
            heartbeat_interval=self.heartbeat_interval,
            heartbeat_timeout=self.heartbeat_timeout,
            reconnect_timeout=self.reconnect_timeout,
            # A launched trainer is never started again, so nothing would resend a task: its
            # arrays leave the client job as soon as the trainer has them.
            keep_task_data=self.launch is None,
            secret=secret,
        )
        self._stop = anyio.Event()
        async with anyio.create_task_group() as group:
            async with site:
                url = await site.listen(self.listen_url, ssl_context=ssl_context)
                process = None
                if self.launch:
                    process = await self._launch(url, site_name, job_id, app_dir)
                    group.start_soon(self._watch_trainer, process)
                self._site = site
                task_status.started(url)
                await self._stop.wait()
            if process is not None:
                await self._stop_trainer(process)
                with anyio.CancelScope(shield=True):
                    await process.aclose()
            group.cancel_scope.cancel()

    async def _launch(
        self, url: str, site_name: str, job_id: str, app_dir: str
    ) -> anyio.abc.Process:
        assert self.launch is not None and self.agent_id is not None
        values = {
            "url": url,
            "site_name": site_name,
            "agent_id": self.agent_id,
            "job_id": job_id,
            "app_dir": app_dir,
            "python": sys.executable,
        }
        command = [part.format(**values) for part in shlex.split(self.launch)]
        env = dict(os.environ)
        env.update(
            {
                ENV_URL: url,
                ENV_SITE_NAME: site_name,
                ENV_AGENT_ID: self.agent_id,
                ENV_JOB_ID: job_id,
            }
        )
        if self.client_config:
            env[ENV_CLIENT_CONFIG] = json.dumps(self.client_config)
        env[_ENV_LAUNCH] = self._launch_mark = uuid.uuid4().hex
        self._trainer_exit = anyio.Event()
        self.logger.info(f"launching the trainer: {command}")
        return await anyio.open_process(
            command, cwd=app_dir, env=env, stdout=None, stderr=None, start_new_session=True
        )

    async def _watch_trainer(self, process: anyio.abc.Process) -> None:
        self.trainer_returncode = await process.wait()
        assert self._trainer_exit is not None
        self._trainer_exit.set()
        if self._stop is not None and not self._stop.is_set():
            code = self.trainer_returncode
            self.logger.warning(f"the trainer exited with code {code} during the run")

    async def _stop_trainer(self, process: anyio.abc.Process) -> None:
        """Give the trainer time to leave after the goodbye; then terminate its process group;
        then whatever it started in sessions of its own (torchrun's ranks, say)."""
        with anyio.CancelScope(shield=True):
            await self._end_group(process)
            if self._launch_mark is not None:
                self._reap_strays(self._launch_mark)

    async def _end_group(self, process: anyio.abc.Process) -> None:
        with anyio.move_on_after(self.launch_stop_timeout):
            await process.wait()
            return
        for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            self.logger.warning(f"the trainer did not exit; sending it {sig.name}")
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, sig)
            with anyio.move_on_after(grace):
                await process.wait()
                return

    def _reap_strays(self, mark: str) -> None:
        """Kill every process the launched trainer left behind outside its process group, found
        by the mark in its environment (where ``/proc`` shows environments: Linux)."""
        strays = processes_with(f"{_ENV_LAUNCH}={mark}".encode())
        for pid, command in strays.items():
            self.logger.warning(f"killing process {pid} the trainer left behind: {command}")
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)

    def _abandon_relayed(self) -> None:
        """Settle the last relayed result, if the server has not: NVFlare may drop a reply after
        `execute` (an abort, a task the server no longer wants), and then nothing downloads it.
        A download that completed stays completed."""
        abandon, self._relayed = self._relayed, None
        if abandon is not None:
            abandon()

    def _shutdown(self) -> None:
        self._abandon_relayed()
        if self._passes_tasks:
            self._passes_tasks = False
            self._cell.decode_pass_through_topics.discard(TASK_ROUTE)
        portal, self._portal = self._portal, None
        if portal is None:
            return
        stop = self._stop
        try:
            if stop is not None:
                portal.call(stop.set)
            if self._host_future is not None:
                self._host_future.result()
        except Exception as exc:
            self.logger.error(f"the agent site ended with an error: {exc!r}")
        finally:
            assert self._portal_cm is not None
            self._portal_cm.__exit__(None, None, None)
            self._portal_cm = None
            self._site = None

    # -- tasks ----------------------------------------------------------------------------------

    def execute(
        self, task_name: str, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal
    ) -> Shareable:
        """Run one NVFlare task on the agent and return its result (or an error return code)."""
        if self._portal is None or self._site is None:
            self.log_error(fl_ctx, "the agent site is not running (it failed at START_RUN)")
            return make_reply(FlareRC.EXECUTION_EXCEPTION)
        # A new task: the server is done with the last result, downloaded or not. (Until this,
        # the trainer waits in submit_result, so it cannot have started on this task.)
        self._abandon_relayed()
        try:
            task = shareable_to_task(shareable)
        except BadShareable as exc:
            self.log_error(fl_ctx, f"task {task_name!r}: {exc}")
            return make_reply(FlareRC.BAD_TASK_DATA)
        refs = lazy_arrays(task.data)
        if not refs and isinstance(task.data, dict):  # here whole: its arrays' size is known
            arrays = (value for value in task.data.values() if isinstance(value, np.ndarray))
            self._pass_next_through(sum(array.nbytes for array in arrays))
        if refs is None:  # passed through, but not as arrays the site can hand on one by one
            try:
                task.data = materialize_lazy_download_refs(task.data, self._cell, abort_signal)
            except Exception as exc:
                if abort_signal.triggered:
                    return make_reply(FlareRC.TASK_ABORTED)
                self.log_error(fl_ctx, f"task {task_name!r}: its data cannot be downloaded: {exc}")
                return make_reply(FlareRC.EXECUTION_EXCEPTION)
            refs = {}
        coming: _Coming | None = None
        feed: Callable[[], None] | None = None
        if refs:
            assert isinstance(task.data, dict)
            task.data.update(dict.fromkeys(refs))  # the entries follow the task
            send, receive = anyio.create_memory_object_stream[_Entry](0)
            coming = (list(refs), receive)
            feed = partial(self._download, refs, abort_signal, send)
        # From here the site alone holds the task's arrays, until the trainer has them (or until
        # the result, with keep_task_data): NVFlare's task lets go of them now, and they are
        # handed down in a box the site empties, so that no frame on the way keeps them alive.
        # A shallow copy: the arrays themselves are not copied.
        data = [dict(task.data) if isinstance(task.data, dict) else task.data]
        if isinstance(task.data, dict):
            task.data.clear()
        started = time.monotonic()
        hold = (
            self.relay_results
            and self._cell is not None
            and not consumed_in_client(task_name, fl_ctx)
        )
        try:
            result = self._call(
                abort_signal,
                self._run_task,
                task_name,
                task.task_id,
                data,
                task.meta,
                hold,
                coming,
                feed=feed,
            )
        except (_Aborted, TaskAborted):
            self.log_info(fl_ctx, f"task {task_name!r} {task.task_id} aborted")
            return make_reply(FlareRC.TASK_ABORTED)
        except TypeError as exc:
            self.log_error(fl_ctx, f"task {task_name!r} cannot be sent to the agent: {exc}")
            return make_reply(FlareRC.BAD_TASK_DATA)
        except (SiteError, TimeoutError, _TrainerExited, _DownloadFailed) as exc:
            self.log_error(fl_ctx, f"task {task_name!r} {task.task_id} failed: {exc}")
            return make_reply(FlareRC.EXECUTION_EXCEPTION)
        elapsed_ms = (time.monotonic() - started) * 1000
        self.log_info(
            fl_ctx,
            f"task {task_name!r} {task.task_id}: {result.return_code} from agent "
            f"{self.agent_id!r} in {elapsed_ms:.1f} ms",
        )
        if isinstance(result, HeldResult) and result.held:
            self.log_info(
                fl_ctx,
                f"task {task_name!r} {task.task_id}: the server downloads the result's "
                f"{len(result.held)} arrays from the agent, one at a time",
            )
            return self._relay(result, task.app_defined)
        if isinstance(result.data, dict):
            self._sent_result = result.data  # the reply's DXO holds this very dict
        return result_to_shareable(result, task.app_defined)

    def _relay(self, result: HeldResult, app_defined: bool) -> Shareable:
        """The reply for a result whose agent holds back its arrays: the server downloads them
        through this job's cell (the `_relay` module), or, if the reply carries no data, none."""
        assert self._portal is not None
        if result.return_code not in (RC.OK, FlareRC.EARLY_TERMINATION):
            self._portal.call(result.release)  # the reply is the return code alone
            return result_to_shareable(result, app_defined)
        try:
            relayed, self._relayed = relay(result, self._cell, self._portal)
        except Exception as exc:
            self._portal.call(result.release, False, f"the client job could not relay it: {exc!r}")
            self.logger.error(f"the result of task {result.task_id} cannot be relayed: {exc!r}")
            return make_reply(FlareRC.EXECUTION_EXCEPTION)
        shareable = result_to_shareable(relayed, app_defined)
        if shareable.get_return_code() != result.return_code:
            self._abandon_relayed()  # it could not be made into a DXO: nothing will download it
        return shareable

    def _pass_next_through(self, size: int) -> None:
        """Have the cell pass the next task through if this one's arrays (``size`` bytes) are
        large: a job's tasks are alike from round to round. Small ones come whole."""
        if self._passes_tasks:
            topics = self._cell.decode_pass_through_topics
            if size >= PASS_THROUGH_MIN_BYTES:
                topics.add(TASK_ROUTE)
            else:
                topics.discard(TASK_ROUTE)

    def _download(
        self, refs: dict[str, Any], abort_signal: Signal, send: anyio.abc.ObjectSendStream[_Entry]
    ) -> None:
        """Download the task's arrays from the server into ``send``, one at a time; each send
        waits until the site has taken the array. A failure goes down ``send`` last, for the
        site's `run_task` to raise: `_Aborted` if NVFlare aborted the task, else
        `_DownloadFailed`."""
        portal = self._portal
        assert portal is not None
        size = 0

        def give(key: str, array: Any) -> None:
            nonlocal size
            size += array.nbytes
            portal.call(send.send, (key, array))  # raises once the site stopped taking them

        try:
            problem = download_arrays_to(refs, self._cell, abort_signal, give)
        except Exception as exc:
            problem = repr(exc)
        if problem is None:
            self._pass_next_through(size)
        # The site may have stopped taking entries (the task ended), or its loop be gone.
        with contextlib.suppress(anyio.BrokenResourceError, RuntimeError):
            if problem is not None:
                failure = _Aborted() if abort_signal.triggered else _DownloadFailed(problem)
                portal.call(send.send, failure)
            portal.call(send.aclose)

    def _call(
        self,
        abort_signal: Signal,
        function: Callable[..., Awaitable[T]],
        *args: Any,
        feed: Callable[[], None] | None = None,
    ) -> T:
        """Run ``function`` in the site's loop; cancel it if NVFlare's abort signal fires.

        ``feed`` runs in this thread first, while ``function`` runs (downloading what it sends,
        say). On abort it returns only once the cancellation has run its course (the abort is
        queued for the agent), so the agent hears of it before it hears of the next task.
        """
        assert self._portal is not None
        cancel = _Cancel()
        future = self._portal.start_task_soon(self._cancellable, cancel, function, *args)
        if feed is not None:
            feed()
        while True:
            try:
                results = future.result(timeout=self.abort_check_interval)
            except concurrent.futures.TimeoutError:
                if abort_signal.triggered:
                    self._portal.call(cancel)
                    try:
                        late = future.result()
                    except Exception as exc:  # it failed as it was cancelled: still an abort
                        raise _Aborted from exc
                    if late and isinstance(late[0], HeldResult):  # it came as NVFlare aborted
                        self._portal.call(late[0].release, False, "NVFlare aborted the task")
                    raise _Aborted from None
                continue
            if not results:
                raise _Aborted
            return cast(T, results[0])

    @staticmethod
    async def _cancellable(
        cancel: _Cancel, function: Callable[..., Awaitable[T]], *args: Any
    ) -> list[T]:
        with anyio.CancelScope() as cancel.scope:
            if cancel.requested:
                cancel.scope.cancel()
            return [await function(*args)]
        return []

    async def _run_task(
        self,
        task_name: str,
        task_id: str,
        data: list[Any],
        meta: dict[str, Any],
        hold: bool,
        coming: _Coming | None,
    ) -> TaskResult:
        """Run the task on the agent; ``data`` is a box holding the task's data, emptied when it
        is handed to the site; with ``hold``, the agent holds back the result's arrays; entries
        ``coming`` follow the task."""
        site = self._site
        agent_id = self.agent_id
        assert site is not None and agent_id is not None

        async def run() -> TaskResult:
            if agent_id not in site.agents:
                try:
                    await site.wait_for_agent(agent_id, timeout=self.agent_connect_timeout)
                except TimeoutError as exc:
                    raise TimeoutError(
                        f"agent {agent_id!r} did not connect within {self.agent_connect_timeout} s"
                    ) from exc
            try:
                return await site.run_task(
                    agent_id,
                    task_name,
                    data.pop(),
                    meta,
                    task_id=task_id,
                    timeout=self.task_timeout,
                    hold_arrays=hold,
                    coming=None if coming is None else Coming(coming[0], _entries(coming[1])),
                )
            except TimeoutError as exc:
                raise TimeoutError(f"no result within task_timeout={self.task_timeout} s") from exc

        try:
            return await self._unless_trainer_exits(run)
        finally:
            if coming is not None:  # the download stops, if the site did not take them all
                with anyio.CancelScope(shield=True):
                    await coming[1].aclose()

    async def _unless_trainer_exits(self, work: Callable[[], Awaitable[T]]) -> T:
        """Run ``work``; if the launched trainer exits first, cancel it and fail at once."""
        trainer_exit = self._trainer_exit
        if trainer_exit is None:
            return await work()
        results: list[T] = []
        errors: list[Exception] = []
        async with anyio.create_task_group() as group:

            async def run() -> None:
                try:
                    results.append(await work())
                except Exception as exc:
                    errors.append(exc)
                group.cancel_scope.cancel()

            group.start_soon(run)
            await trainer_exit.wait()
            errors.append(_TrainerExited(f"the trainer exited with code {self.trainer_returncode}"))
            group.cancel_scope.cancel()
        if results:
            return results[0]
        raise errors[0]
