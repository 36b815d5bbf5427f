"""The wire messages: one msgspec tagged union, the same on every transport.

A message is a frozen `msgspec.Struct`; its ``kind`` tag names it on the wire. New fields are added
with defaults, so a newer peer still reads an older one's messages (msgspec's schema evolution);
tasks and results leave out fields at their defaults, so an older peer reads what it knows;
anything that changes meaning bumps `PROTOCOL_VERSION`, which the hello checks.
"""

from __future__ import annotations

from typing import Any

import msgspec

__all__ = [
    "PROTOCOL_VERSION",
    "Abort",
    "Bye",
    "Challenge",
    "Heartbeat",
    "Hello",
    "Log",
    "Message",
    "Part",
    "PartAck",
    "PartRequest",
    "Proof",
    "Reject",
    "Result",
    "ResultAck",
    "TaskAck",
    "TaskAssign",
    "Welcome",
]

PROTOCOL_VERSION = 2
"""2: a task's entries may come after it (`TaskAssign.coming`, `Part` from the site)."""


class _Base(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind"):
    pass


class Hello(_Base, tag="hello", frozen=True, kw_only=True):
    """Agent to site, first on every connection: who the agent is and which site and job it wants.

    ``instance_id`` is new for every agent object: the same id on a later connection is a reconnect
    (the agent still has its tasks), a new one is a restarted agent (its tasks must be sent again).
    """

    protocol_version: int
    agent_id: str
    site_name: str
    job_id: str | None = None
    instance_id: str
    nonce: bytes = b""
    """Fresh random bytes per connection, for the site's proof when a secret is shared."""


class Challenge(_Base, tag="challenge", frozen=True, kw_only=True):
    """Site to agent, when the site shares a secret with the agent: prove you know it."""

    nonce: bytes


class Proof(_Base, tag="proof", frozen=True, kw_only=True):
    """Agent to site: an HMAC over the hello and both nonces, keyed by the shared secret."""

    mac: bytes


class Welcome(_Base, tag="welcome", frozen=True, kw_only=True):
    """Site to agent: the hello is accepted; the site's liveness settings, in seconds."""

    protocol_version: int
    site_name: str
    heartbeat_interval: float
    heartbeat_timeout: float
    proof: bytes = b""
    """With a shared secret: the site's HMAC, so the agent knows it reached the right site."""


class Reject(_Base, tag="reject", frozen=True, kw_only=True):
    """Site to agent: the hello is refused, with the reason; the site closes the connection."""

    reason: str


class TaskAssign(_Base, tag="task", frozen=True, kw_only=True, omit_defaults=True):
    """Site to agent: a task to run."""

    task_id: str
    task_name: str
    meta: dict[str, Any]
    data: Any = None
    hold_arrays: bool = False
    """The site fetches the result's arrays one at a time, as it needs them (`PartRequest`): the
    agent's `Result` holds back the numpy arrays at the top of its data, until acknowledged."""
    coming: list[str] = []
    """Keys of the data's entries that follow the task, each in a `Part` from the site (None in
    their place here), acknowledged by a `PartAck`; the agent has the task, and acknowledges it,
    once all have come."""


class TaskAck(_Base, tag="task_ack", frozen=True, kw_only=True):
    """Agent to site: the task arrived (it is not sent again after a reconnect)."""

    task_id: str


class Result(_Base, tag="result", frozen=True, kw_only=True, omit_defaults=True):
    """Agent to site: the result of a task; resent after a reconnect until acknowledged."""

    task_id: str
    return_code: str
    meta: dict[str, Any]
    data: Any = None
    held: list[str] = []
    """The keys of the data's entries the agent holds back (None in their place), for the site
    to fetch with `PartRequest` (when the task said ``hold_arrays``)."""
    held_nbytes: list[int] = []
    """The size in bytes of each held-back array, in ``held``'s order (empty from an agent that
    does not say): what the site will fetch, known before it asks."""


class PartRequest(_Base, tag="part_request", frozen=True, kw_only=True):
    """Site to agent: send one held-back entry of a result's data."""

    task_id: str
    key: str


class Part(_Base, tag="part", frozen=True, kw_only=True):
    """Either way, one entry of a task's or result's data: agent to site, a held-back entry of a
    result (or why it cannot be sent); site to agent, an entry of a task that said it was
    `coming <TaskAssign.coming>` (or, if it failed to decode, why not)."""

    task_id: str
    key: str
    value: Any = None
    error: str = ""


class PartAck(_Base, tag="part_ack", frozen=True, kw_only=True):
    """Agent to site: a coming entry of a task arrived; the site need not keep it to send it
    again (unless it keeps task data for a restarted agent)."""

    task_id: str
    key: str


class ResultAck(_Base, tag="result_ack", frozen=True, kw_only=True):
    """Site to agent: the result was kept (``accepted``) or refused, and why."""

    task_id: str
    accepted: bool
    reason: str = ""


class Abort(_Base, tag="abort", frozen=True, kw_only=True):
    """Site to agent: the site no longer wants this task's result."""

    task_id: str


class Heartbeat(_Base, tag="heartbeat", frozen=True, kw_only=True):
    """Keeps an idle connection alive: the agent sends one when idle, the site answers each."""


class Log(_Base, tag="log", frozen=True, kw_only=True):
    """Agent to site: a metric or other log record of the current task."""

    key: str
    value: Any
    step: int | None = None
    task_id: str | None = None
    data_type: str | None = None
    """What the value is, for a tracking system (NVFlare's ``AnalyticsDataType``: ``SCALAR``)."""
    options: dict[str, Any] | None = None
    """More for the receiver of the record (which writer's syntax, a step, ...)."""


class Bye(_Base, tag="bye", frozen=True, kw_only=True):
    """Either way: the sender is leaving for good; the reason is for the logs."""

    reason: str = ""


Message = (
    Hello
    | Challenge
    | Proof
    | Welcome
    | Reject
    | TaskAssign
    | TaskAck
    | Result
    | PartRequest
    | Part
    | PartAck
    | ResultAck
    | Abort
    | Heartbeat
    | Log
    | Bye
)
"""Any wire message."""
