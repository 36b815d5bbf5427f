"""`flare_agent_async.defs` against NVFlare's ``nvflare.client.defs`` (DESIGN.md section 1).

The reference is the text of NVFlare's API page for that module (``spec/nvflare_client_defs.txt``);
the tests below parse it, so the contract is checked against the reference itself and not only
against a copy of it written here.
"""

from __future__ import annotations

import abc
import ast
import builtins
import inspect
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import flare_agent_async
from flare_agent_async import defs, exceptions
from flare_agent_async.defs import (
    RC,
    AgentClosed,
    CallStateError,
    FlareAgent,
    Task,
    TaskResult,
    agent_site_fqcn,
)

# --------------------------------------------------------------------------------------------------
# The reference text

REFERENCE_ENV = "FLARE_AGENT_ASYNC_DEFS_REFERENCE"
REFERENCE_NAME = "nvflare_client_defs.txt"
_HERE = Path(__file__).resolve().parent


def _find_reference() -> Path | None:
    """The reference file: ``$FLARE_AGENT_ASYNC_DEFS_REFERENCE``, else a ``spec/`` folder nearby."""
    if os.environ.get(REFERENCE_ENV):
        return Path(os.environ[REFERENCE_ENV])
    for candidate in (
        _HERE / "data" / REFERENCE_NAME,  # inside the repository
        _HERE.parent.parent / "shared" / "spec" / REFERENCE_NAME,  # next to it, with DESIGN.md
    ):
        if candidate.is_file():
            return candidate
    return None


_NO_DEFAULT = object()


@dataclass
class RefFunction:
    """A function or method entry of the reference: ``[abstract ]name(params)[source]``."""

    name: str
    params: list[tuple[str, Any]]  # (name, default or _NO_DEFAULT)
    abstract: bool = False


@dataclass
class RefClass:
    """A ``class``/``exception`` entry of the reference, with its bases, constants and methods."""

    name: str
    kind: str  # "class" or "exception"
    params: list[tuple[str, Any]] | None  # the constructor's, when the heading shows them
    bases: list[str] = field(default_factory=list)
    constants: dict[str, Any] = field(default_factory=dict)
    methods: dict[str, RefFunction] = field(default_factory=dict)


@dataclass
class Reference:
    classes: dict[str, RefClass]
    functions: dict[str, RefFunction]

    @property
    def top_level_names(self) -> list[str]:
        return [*self.classes, *self.functions]


_ENTRY_RE = re.compile(
    r"^(?:(?P<prefix>exception|class|abstract) )?(?P<name>[A-Za-z_]\w*)"
    r"(?:\((?P<params>[^)]*)\))?(?: [^\[]+)?\[source\]$"
)
_CONSTANT_RE = re.compile(r"^(?P<name>[A-Za-z_]\w*) = (?P<value>.+)$")
_BASES_RE = re.compile(r"^Bases: (?P<bases>.+)$")
_PARAM_RE = re.compile(r"^(?P<name>\*{0,2}\w+)(?:\s*:\s*[^=]+?)?(?:\s*=\s*(?P<default>.+))?$")


def _parse_params(text: str) -> list[tuple[str, Any]]:
    params = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        match = _PARAM_RE.match(item)
        assert match, f"cannot read parameter {item!r} of the reference"
        default = match["default"]
        params.append(
            (match["name"], _NO_DEFAULT if default is None else ast.literal_eval(default))
        )
    return params


def _is_our_method(class_name: str, function_name: str) -> bool:
    our_class = getattr(defs, class_name, None)
    return our_class is not None and any(function_name in vars(k) for k in our_class.__mro__[:-1])


def parse_reference(text: str) -> Reference:
    """Read the classes, their constants and methods, and the functions of the reference page.

    The text lost Sphinx's indentation, so a function entry below a class looks the same whether
    it is a method of that class or a module-level function. ``abstract`` entries are methods; a
    plain one counts as a method when our class of that name has it, else as a module function
    (then a method missing from our class shows up as a top-level name we fail to export).
    """
    classes: dict[str, RefClass] = {}
    functions: dict[str, RefFunction] = {}
    current: RefClass | None = None
    for raw_line in text.splitlines():
        line = raw_line.strip()
        if entry := _ENTRY_RE.match(line):
            prefix, name = entry["prefix"], entry["name"]
            params = None if entry["params"] is None else _parse_params(entry["params"])
            if prefix in ("class", "exception"):
                current = classes[name] = RefClass(name, prefix, params)
            elif current is not None and (
                prefix == "abstract" or _is_our_method(current.name, name)
            ):
                current.methods[name] = RefFunction(name, params or [], prefix == "abstract")
            else:
                current = None
                functions[name] = RefFunction(name, params or [])
        elif current is not None and (bases := _BASES_RE.match(line)):
            current.bases = [base.strip() for base in bases["bases"].split(",")]
        elif current is not None and not current.methods and (const := _CONSTANT_RE.match(line)):
            try:
                value = ast.literal_eval(const["value"])
            except (ValueError, SyntaxError):
                continue  # prose, not a constant
            current.constants[const["name"]] = value
    return Reference(classes, functions)


REFERENCE_PATH = _find_reference()


@pytest.fixture(scope="module")
def reference() -> Reference:
    if REFERENCE_PATH is None or not REFERENCE_PATH.is_file():
        pytest.skip(f"reference {REFERENCE_NAME} not found (set ${REFERENCE_ENV} to its path)")
    return parse_reference(REFERENCE_PATH.read_text(encoding="utf-8"))


# DESIGN.md section 1, written out: pins what the parser must find in the reference.
DESIGN_CONSTANTS = {
    "RC": {
        "OK": "OK",
        "BAD_TASK_DATA": "BAD_TASK_DATA",
        "EXECUTION_EXCEPTION": "EXECUTION_EXCEPTION",
    },
    "MsgHeader": {"TASK_ID": "task_id", "TASK_NAME": "task_name", "RC": "rc"},
    "PayloadKey": {"DATA": "data", "META": "meta"},
    "MetaKey": {
        "CURRENT_ROUND": "current_round",
        "TOTAL_ROUND": "total_round",
        "DATA_KIND": "data_kind",
        "NUM_STEPS_CURRENT_ROUND": "NUM_STEPS_CURRENT_ROUND",
        "PROCESSED_ALGORITHM": "PROCESSED_ALGORITHM",
        "PROCESSED_KEYS": "PROCESSED_KEYS",
        "INITIAL_METRICS": "initial_metrics",
        "FILTER_HISTORY": "filter_history",
    },
}
DESIGN_TOP_LEVEL = {
    "AgentClosed",
    "CallStateError",
    "FlareAgent",
    "MetaKey",
    "MsgHeader",
    "PayloadKey",
    "RC",
    "Task",
    "TaskResult",
    "agent_site_fqcn",
}
CONSTANT_CLASSES = ["RC", "MsgHeader", "PayloadKey", "MetaKey"]


def _our_params(obj: Any) -> list[tuple[str, Any]]:
    params = inspect.signature(obj).parameters.values()
    return [
        (p.name, _NO_DEFAULT if p.default is inspect.Parameter.empty else p.default)
        for p in params
        if p.name != "self"
    ]


# --------------------------------------------------------------------------------------------------
# Names and values, from the reference


def test_reference_parser_reads_the_whole_contract(reference: Reference) -> None:
    assert {name: ref.constants for name, ref in reference.classes.items() if ref.constants} == (
        DESIGN_CONSTANTS
    )
    assert set(reference.top_level_names) == DESIGN_TOP_LEVEL
    flare_agent = reference.classes["FlareAgent"]
    assert set(flare_agent.methods) == {"get_task", "start", "stop", "submit_result"}
    assert {m.name for m in flare_agent.methods.values() if m.abstract} == {
        "get_task",
        "start",
        "stop",
    }


def test_constants_match_reference(reference: Reference) -> None:
    mismatches = []
    for class_name, ref in reference.classes.items():
        our_class = getattr(defs, class_name, None)
        for name, value in ref.constants.items():
            ours = getattr(our_class, name, "<missing>")
            if type(ours) is not type(value) or ours != value:
                mismatches.append(f"{class_name}.{name}: reference {value!r}, ours {ours!r}")
    assert mismatches == []


@pytest.mark.parametrize("class_name", CONSTANT_CLASSES)
def test_constant_classes_have_nothing_beyond_reference(
    reference: Reference, class_name: str
) -> None:
    public = {name for name in vars(getattr(defs, class_name)) if not name.startswith("_")}
    assert public == set(reference.classes[class_name].constants)


@pytest.mark.parametrize(
    ("class_name", "name", "value"),
    [(c, n, v) for c, constants in DESIGN_CONSTANTS.items() for n, v in constants.items()],
)
def test_constant_matches_design(class_name: str, name: str, value: str) -> None:
    assert getattr(getattr(defs, class_name), name) == value


@pytest.mark.parametrize("module", [defs, flare_agent_async], ids=["defs", "package"])
def test_reference_names_are_importable(reference: Reference, module: Any) -> None:
    missing = [name for name in reference.top_level_names if not hasattr(module, name)]
    assert missing == []
    assert set(reference.top_level_names) <= set(module.__all__)


def test_package_root_reexports_defs(reference: Reference) -> None:
    for name in reference.top_level_names:
        assert getattr(flare_agent_async, name) is getattr(defs, name), name


def test_bases_match_reference(reference: Reference) -> None:
    for name, ref in reference.classes.items():
        ours = getattr(defs, name)
        for base_name in ref.bases:
            base = getattr(builtins, base_name, None) or getattr(abc, base_name)
            assert issubclass(ours, base), f"{name} should derive from {base_name}"
        if ref.kind == "exception":
            assert issubclass(ours, BaseException), name


def test_signatures_match_reference(reference: Reference) -> None:
    for name, ref_class in reference.classes.items():
        if ref_class.params is not None:
            assert _our_params(getattr(defs, name)) == ref_class.params, name
        for method in ref_class.methods.values():
            assert _our_params(getattr(getattr(defs, name), method.name)) == method.params, (
                f"{name}.{method.name}"
            )
    for name, function in reference.functions.items():
        assert _our_params(getattr(defs, name)) == function.params, name


def test_abstract_methods_match_reference(reference: Reference) -> None:
    for name, ref in reference.classes.items():
        expected = {m.name for m in ref.methods.values() if m.abstract}
        assert set(getattr(getattr(defs, name), "__abstractmethods__", ())) == expected, name


# --------------------------------------------------------------------------------------------------
# Task


@pytest.mark.parametrize(
    ("task_name", "task_id", "expected"),
    [
        ("train", "t1", "'train t1'"),
        ("validate", "4f1c-9a", "'validate 4f1c-9a'"),
        ("", "", "' '"),
    ],
)
def test_task_str(task_name: str, task_id: str, expected: str) -> None:
    assert str(Task(task_name, task_id, {}, None)) == expected


def test_task_attributes() -> None:
    meta = {"current_round": 2}
    data = {"w": [1.0, 2.0]}
    task = Task("train", "t1", meta, data)
    assert task.task_name == "train"
    assert task.task_id == "t1"
    assert task.meta is meta
    assert task.data is data


def test_task_keyword_arguments() -> None:
    task = Task(task_name="train", task_id="t1", meta={}, data=3)
    assert (task.task_name, task.task_id, task.meta, task.data) == ("train", "t1", {}, 3)


# --------------------------------------------------------------------------------------------------
# TaskResult


def test_task_result_attributes_and_default_return_code() -> None:
    meta = {"current_round": 1}
    data = {"w": [1.0]}
    result = TaskResult(meta, data)
    assert result.meta is meta
    assert result.data is data
    assert result.return_code == "OK"
    assert result.return_code == RC.OK


def test_task_result_keeps_return_code() -> None:
    result = TaskResult({}, {}, return_code=RC.EXECUTION_EXCEPTION)
    assert result.return_code == "EXECUTION_EXCEPTION"


@pytest.mark.parametrize("empty", [None, {}, [], "", (), 0], ids=repr)
def test_task_result_empty_meta_becomes_dict(empty: Any) -> None:
    result = TaskResult(empty, {"w": 1})
    assert result.meta == {}
    assert type(result.meta) is dict


@pytest.mark.parametrize("empty", [None, {}, [], "", (), b"", 0], ids=repr)
def test_task_result_empty_data_becomes_dict(empty: Any) -> None:
    result = TaskResult({}, empty)
    assert result.data == {}
    assert type(result.data) is dict


@pytest.mark.parametrize("data", [{"w": 1}, [0], "x", 0.5, b"\x00"], ids=repr)
def test_task_result_keeps_non_empty_data(data: Any) -> None:
    assert TaskResult({}, data).data is data


@pytest.mark.parametrize("meta", [["a", 1], [("k", "v")], "meta", 1, ("k",)], ids=repr)
def test_task_result_meta_not_dict(meta: Any) -> None:
    with pytest.raises(TypeError, match="meta"):
        TaskResult(meta, {})


@pytest.mark.parametrize("return_code", [None, 0, 1, b"OK", ["OK"]], ids=repr)
def test_task_result_return_code_not_str(return_code: Any) -> None:
    with pytest.raises(TypeError, match="return_code"):
        TaskResult({}, {}, return_code)


@pytest.mark.parametrize(
    "array",
    [np.zeros(1), np.zeros(0), np.ones((2, 3)), np.zeros((0, 4), dtype=np.float32)],
    ids=["zeros(1)", "zeros(0)", "ones(2,3)", "zeros(0,4)"],
)
def test_task_result_keeps_numpy_data(array: np.ndarray) -> None:
    result = TaskResult({}, array)
    assert result.data is array


# --------------------------------------------------------------------------------------------------
# Exceptions


@pytest.mark.parametrize("exc", [AgentClosed, CallStateError], ids=lambda e: e.__name__)
def test_contract_exceptions_are_in_the_tree(exc: type[Exception]) -> None:
    assert issubclass(exc, Exception)
    assert issubclass(exc, exceptions.FlareAgentError)
    assert exc is getattr(exceptions, exc.__name__)
    assert exc is getattr(flare_agent_async, exc.__name__)
    with pytest.raises(exceptions.FlareAgentError):
        raise exc("closed")


# --------------------------------------------------------------------------------------------------
# FlareAgent


class _MinimalAgent(FlareAgent):
    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def get_task(self, timeout: float | None = None) -> Task | None:
        return None


def test_flare_agent_is_abc_with_three_abstract_methods() -> None:
    assert issubclass(FlareAgent, abc.ABC)
    assert FlareAgent.__abstractmethods__ == frozenset({"start", "stop", "get_task"})


def test_flare_agent_submit_result_is_plain_method() -> None:
    assert callable(FlareAgent.submit_result)
    assert not getattr(FlareAgent.submit_result, "__isabstractmethod__", False)
    assert "submit_result" not in FlareAgent.__abstractmethods__


def test_flare_agent_cannot_be_instantiated() -> None:
    with pytest.raises(TypeError, match="abstract"):
        FlareAgent()  # type: ignore[abstract]


def test_flare_agent_minimal_subclass() -> None:
    agent = _MinimalAgent()
    assert isinstance(agent, FlareAgent)
    agent.start()
    assert agent.get_task() is None
    agent.stop()


def test_flare_agent_get_task_timeout_defaults_to_none() -> None:
    timeout = inspect.signature(FlareAgent.get_task).parameters["timeout"]
    assert timeout.default is None


# --------------------------------------------------------------------------------------------------
# agent_site_fqcn


@pytest.mark.parametrize(
    ("args", "kwargs", "expected"),
    [
        (("site-1", "a1"), {}, "site-1--a1"),
        (("site-1", "a1", None), {}, "site-1--a1"),
        (("site-1", "a1", ""), {}, "site-1--a1"),
        (("site-1", "a1", "job9"), {}, "site-1.job9.a1"),
        (("site-1", "a1"), {"job_id": "job9"}, "site-1.job9.a1"),
        ((), {"site_name": "s", "agent_id": "a", "job_id": None}, "s--a"),
    ],
    ids=["no-job", "job-None", "job-empty", "job", "job-keyword", "all-keywords"],
)
def test_agent_site_fqcn(args: tuple[Any, ...], kwargs: dict[str, Any], expected: str) -> None:
    assert agent_site_fqcn(*args, **kwargs) == expected


# --------------------------------------------------------------------------------------------------
# Task abort (beyond the reference)


def test_new_task_is_not_aborted() -> None:
    assert Task("train", "t1", {}, None).aborted is False


def test_set_aborted_runs_callbacks_once() -> None:
    task = Task("train", "t1", {}, None)
    calls: list[str] = []
    task.add_abort_callback(lambda: calls.append("first"))
    task.add_abort_callback(lambda: calls.append("second"))
    assert calls == []
    task.set_aborted()
    assert task.aborted is True
    assert calls == ["first", "second"]
    task.set_aborted()
    assert task.aborted is True
    assert calls == ["first", "second"]


def test_abort_callback_added_after_abort_runs_immediately() -> None:
    task = Task("train", "t1", {}, None)
    task.set_aborted()
    calls: list[int] = []
    remove = task.add_abort_callback(lambda: calls.append(1))
    assert calls == [1]
    remove()
    task.set_aborted()
    assert calls == [1]


def test_removed_abort_callback_does_not_run() -> None:
    task = Task("train", "t1", {}, None)
    calls: list[str] = []
    remove = task.add_abort_callback(lambda: calls.append("removed"))
    task.add_abort_callback(lambda: calls.append("kept"))
    remove()
    remove()  # a second removal is harmless
    task.set_aborted()
    assert calls == ["kept"]
