"""The ``nvflare-ipc://host:port`` transport: our agents, served by a stock NVFlare IPCExchanger.

NVFlare's IPCExchanger talks to its agent over NVFlare's cell network, on channel ``flare_agent``:
it pushes each task to the agent (topic ``get_task``), sends heartbeats, aborts and a goodbye, and
the agent sends results back (topic ``submit_result``). This transport speaks that with NVFlare's
own `Cell`, and turns it into the messages our agent protocol expects, so `AsyncFlareAgent` (and
`SyncFlareAgent`) keep every guarantee of their own on top: an aborted task that was never fetched
does not wedge the agent, and ``get_task`` wakes the moment a task arrives.

The cell calls back on NVFlare's threads; each callback hands its message to the agent's event
loop at once (`anyio.from_thread.run_sync` with the loop's token), nothing polls. The site is
not asked for a hello: the transport answers the agent's hello itself, names its cell as NVFlare's
IPCAgent does (``<site>.-<agent id>``), and takes the exchanger's heartbeats as the site's sign of
life. Results are resent every ``resend_interval`` seconds until the exchanger answers; if it does
not for ``heartbeat_timeout`` seconds, the connection counts as broken and the agent reconnects.

Options ride on the URL's query: ``nvflare-ipc://127.0.0.1:8002?heartbeat_timeout=60``
(``heartbeat_timeout``, ``submit_timeout``, ``resend_interval``, in seconds).
"""

from __future__ import annotations

import concurrent.futures
import functools
import math
import threading
import time
import urllib.parse
from collections.abc import Callable

import anyio
import anyio.from_thread
import anyio.lowlevel
import anyio.to_thread
from anyio.abc import ObjectStream
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from nvflare.app_common.decomposers import numpy_decomposers
from nvflare.client.ipc import defs as ipc
from nvflare.fuel.f3.cellnet.cell import Cell
from nvflare.fuel.f3.cellnet.cell import Message as CellMessage
from nvflare.fuel.f3.cellnet.core_cell import CoreCell
from nvflare.fuel.f3.cellnet.defs import MessageHeaderKey
from nvflare.fuel.f3.cellnet.defs import ReturnCode as CellRC
from nvflare.fuel.f3.cellnet.utils import make_reply
from nvflare.fuel.f3.streaming.byte_streamer import ByteStreamer

from ..exceptions import TransportError
from ..protocol import (
    PROTOCOL_VERSION,
    Abort,
    Bye,
    Heartbeat,
    Hello,
    Message,
    Result,
    ResultAck,
    TaskAssign,
    Welcome,
)
from ..transports import Connector, MessageListener, MessageStream, Scheme, TransportOptions

__all__ = ["IPC_SCHEME", "SCHEME", "IPCConnector"]

SCHEME = "nvflare-ipc"

_decomposers_lock = threading.Lock()
_decomposers_registered = False


def _register_numpy() -> None:
    """NVFlare's serializer needs its numpy decomposers to carry arrays (once per process)."""
    global _decomposers_registered
    with _decomposers_lock:
        if not _decomposers_registered:
            numpy_decomposers.register()
            _decomposers_registered = True


def _seconds(query: dict[str, list[str]], name: str, default: float) -> float:
    values = query.pop(name, None)
    if not values:
        return default
    try:
        value = float(values[-1])
    except ValueError:
        raise ValueError(f"{name} must be a number of seconds, got {values[-1]!r}") from None
    if not 0 < value < math.inf:
        raise ValueError(f"{name} must be positive, got {value}")
    return value


class IPCConnector(Connector):
    """Connects an agent to an NVFlare ``IPCExchanger`` through the cell at ``nvflare-ipc://host:port``.

    ``host:port`` is the NVFlare cell the agent's cell attaches to: the client's parent cell in a
    deployment, the server's root cell in the simulator.

    :raises ValueError: the URL is malformed or has an unknown or bad option.
    """

    def __init__(self, url: str) -> None:
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme != SCHEME or not parsed.hostname or parsed.port is None:
            raise ValueError(f"{url!r} is not an {SCHEME}://host:port URL")
        query = urllib.parse.parse_qs(parsed.query)
        self.heartbeat_timeout = _seconds(query, "heartbeat_timeout", 60.0)
        self.submit_timeout = _seconds(query, "submit_timeout", 30.0)
        self.resend_interval = _seconds(query, "resend_interval", 2.0)
        if query:
            raise ValueError(f"unknown {SCHEME} options in {url!r}: {', '.join(sorted(query))}")
        self.url = url
        host = f"[{parsed.hostname}]" if ":" in parsed.hostname else parsed.hostname
        self.parent_url = f"tcp://{host}:{parsed.port}"

    async def connect(self) -> MessageStream:
        """A new stream; its cell starts when the agent says hello."""
        _register_numpy()
        return _CellStream(self, anyio.lowlevel.current_token())


class _CellStream(ObjectStream[Message]):
    """One agent connection over a cell: our protocol messages one side, cell requests the other."""

    def __init__(self, connector: IPCConnector, token: anyio.lowlevel.EventLoopToken) -> None:
        self._connector = connector
        self._token = token
        inbox: tuple[MemoryObjectSendStream[Message], MemoryObjectReceiveStream[Message]]
        inbox = anyio.create_memory_object_stream[Message](math.inf)
        self._to_agent, self._inbox = inbox
        self._cell: Cell | None = None
        self._fqcn = ""
        self._peer: str | None = None
        self._task_names: dict[str, str] = {}
        self._closed = False

    # -- the agent's side -----------------------------------------------------------------------

    async def receive(self) -> Message:
        return await self._inbox.receive()

    async def send(self, item: Message) -> None:
        if self._closed:
            raise anyio.ClosedResourceError
        if isinstance(item, Hello):
            await self._start_cell(item)
        elif isinstance(item, Result):
            await self._submit(item)
        # Heartbeats, task acks, log records and the goodbye have no counterpart in
        # IPCExchanger's protocol: the exchanger heartbeats the agent, not the other way.

    async def send_eof(self) -> None:
        """Nothing to do: the agent's goodbye has no counterpart in IPCExchanger's protocol."""

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._to_agent.close()
        self._inbox.close()
        cell, self._cell = self._cell, None
        if cell is not None:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self._stop_cell, cell)

    def _stop_cell(self, cell: Cell) -> None:
        # The cell stops only once the site has acknowledged its replies (the answer to the
        # goodbye above all), or after a bound: a cell that leaves earlier makes NVFlare log
        # errors about acknowledgements it cannot route.
        self._wait_for_sent(cell, timeout=2.0)
        cell.stop()
        # NVFlare keeps every cell ever made by name; forget this one so a reconnect may reuse it.
        CoreCell.ALL_CELLS.pop(self._fqcn, None)

    @staticmethod
    def _wait_for_sent(cell: Cell, timeout: float) -> None:
        """Wait (up to ``timeout`` seconds) until the peer acknowledged what this cell sent."""
        deadline = time.monotonic() + timeout
        for _ in range(100):
            pending = [
                future
                for task in list(getattr(ByteStreamer, "tx_task_map", {}).values())
                if getattr(task, "cell", None) is cell.core_cell
                and (future := getattr(task, "stream_future", None)) is not None
                and not future.done()
            ]
            remaining = deadline - time.monotonic()
            if not pending or remaining <= 0:
                return
            try:
                # Waits without raising what the stream failed with: the sender reports that.
                pending[0].exception(timeout=remaining)
            except TimeoutError:
                return

    async def _start_cell(self, hello: Hello) -> None:
        if self._cell is not None:
            raise anyio.BrokenResourceError("the agent said hello twice on one connection")
        self._fqcn = ipc.agent_site_fqcn(hello.site_name, hello.agent_id)
        try:
            cell = Cell(
                fqcn=self._fqcn,
                root_url="",
                parent_url=self._connector.parent_url,
                secure=False,
                credentials={},
                create_internal_listener=False,
            )
        except ValueError as exc:
            raise TransportError(
                f"cannot make the NVFlare cell {self._fqcn!r} for {self._connector.url}: {exc}"
            ) from exc
        for topic, callback in (
            (ipc.TOPIC_GET_TASK, self._on_task),
            (ipc.TOPIC_HEARTBEAT, self._on_heartbeat),
            (ipc.TOPIC_ABORT, self._on_abort),
            (ipc.TOPIC_BYE, self._on_bye),
        ):
            cell.register_request_cb(channel=ipc.CHANNEL, topic=topic, cb=callback)
        self._cell = cell
        # Welcomed before the cell starts: whatever the exchanger sends comes after it.
        timeout = self._connector.heartbeat_timeout
        self._to_agent.send_nowait(
            Welcome(
                protocol_version=PROTOCOL_VERSION,
                site_name=hello.site_name,
                heartbeat_interval=timeout / 2,
                heartbeat_timeout=timeout,
            )
        )
        await anyio.to_thread.run_sync(cell.start)

    async def _submit(self, result: Result) -> None:
        cell, peer = self._cell, self._peer
        if cell is None or peer is None:
            raise anyio.BrokenResourceError("a result before any task arrived")
        request = CellMessage(
            headers={
                ipc.MsgHeader.TASK_NAME: self._task_names.get(result.task_id, ""),
                ipc.MsgHeader.TASK_ID: result.task_id,
                ipc.MsgHeader.RC: result.return_code,
            },
            payload={ipc.PayloadKey.META: result.meta, ipc.PayloadKey.DATA: result.data},
        )
        send = functools.partial(
            cell.send_request,
            channel=ipc.CHANNEL,
            topic=ipc.TOPIC_SUBMIT_RESULT,
            target=peer,
            request=request,
            timeout=self._connector.submit_timeout,
        )
        with anyio.move_on_after(self._connector.heartbeat_timeout):
            while True:
                reply = await anyio.to_thread.run_sync(send, abandon_on_cancel=True)
                rc = reply.get_header(MessageHeaderKey.RETURN_CODE) if reply else None
                if rc == CellRC.OK:
                    self._answer(ResultAck(task_id=result.task_id, accepted=True))
                    return
                if rc == CellRC.INVALID_REQUEST:
                    reason = "the NVFlare site refused the result"
                    self._answer(ResultAck(task_id=result.task_id, accepted=False, reason=reason))
                    return
                # The exchanger is busy or the route is down: try again, as IPCAgent does.
                await anyio.sleep(self._connector.resend_interval)
        raise anyio.BrokenResourceError(
            f"the NVFlare site took no result for {self._connector.heartbeat_timeout} s"
        )

    def _answer(self, message: Message) -> None:
        self._task_names.pop(getattr(message, "task_id", ""), None)
        self._to_agent.send_nowait(message)

    # -- the exchanger's side (NVFlare's threads) -----------------------------------------------

    def _deliver(self, request: CellMessage, message: Message) -> CellMessage:
        """Hand a message to the agent's loop; the reply tells the exchanger whether it arrived."""
        self._peer = request.get_header(MessageHeaderKey.ORIGIN) or self._peer
        try:
            anyio.from_thread.run_sync(self._put, message, token=self._token)
        except (anyio.ClosedResourceError, anyio.BrokenResourceError, RuntimeError):
            return make_reply(CellRC.SERVICE_UNAVAILABLE)
        return make_reply(CellRC.OK)

    def _put(self, message: Message) -> None:
        if isinstance(message, TaskAssign):
            self._task_names[message.task_id] = message.task_name
        self._to_agent.send_nowait(message)

    def _on_task(self, request: CellMessage) -> CellMessage:
        payload = request.payload
        task_id = request.get_header(ipc.MsgHeader.TASK_ID)
        task_name = request.get_header(ipc.MsgHeader.TASK_NAME)
        meta = payload.get(ipc.PayloadKey.META) if isinstance(payload, dict) else None
        if (
            not isinstance(task_id, str)
            or not isinstance(task_name, str)
            or not isinstance(meta, dict)
        ):
            return make_reply(CellRC.INVALID_REQUEST)
        data = payload.get(ipc.PayloadKey.DATA)
        return self._deliver(
            request, TaskAssign(task_id=task_id, task_name=task_name, meta=meta, data=data)
        )

    def _on_heartbeat(self, request: CellMessage) -> CellMessage:
        return self._deliver(request, Heartbeat())

    def _on_abort(self, request: CellMessage) -> CellMessage:
        task_id = request.get_header(ipc.MsgHeader.TASK_ID)
        if not isinstance(task_id, str):
            return make_reply(CellRC.INVALID_REQUEST)
        return self._deliver(request, Abort(task_id=task_id))

    def _on_bye(self, request: CellMessage) -> concurrent.futures.Future[CellMessage]:
        # The goodbye reaches the agent only once the answer is on its way (see `_ReplyFirst`),
        # so the cell cannot stop before the answer is sent.
        bye = Bye(reason="the NVFlare site ended the job")
        return _ReplyFirst(make_reply(CellRC.OK), lambda: self._deliver(request, bye))


class _ReplyFirst(concurrent.futures.Future[CellMessage]):
    """A request callback's answer that runs ``then`` right after NVFlare's cell sent it.

    NVFlare's cell sends the reply of a callback that returns a future from the future's done
    callback; this one is resolved already, so the reply goes out as the callback is added.
    """

    def __init__(self, reply: CellMessage, then: Callable[[], object]) -> None:
        super().__init__()
        self.set_result(reply)
        self._then = then

    def add_done_callback(
        self, fn: Callable[[concurrent.futures.Future[CellMessage]], object]
    ) -> None:
        super().add_done_callback(fn)
        self._then()


async def _nothing_listens(url: str, options: TransportOptions) -> MessageListener:
    raise ValueError(f"{url!r}: agents connect to nvflare-ipc:// URLs; an NVFlare job is the site")


IPC_SCHEME = Scheme(lambda url, _: IPCConnector(url), _nothing_listens, frozenset())
"""The ``nvflare-ipc://`` scheme; `flare_agent_async.transports` loads it by name when used."""
