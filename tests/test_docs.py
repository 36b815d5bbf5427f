"""The documentation's code runs as written, and the reference covers the whole public API.

Conventions of the pages under docs/:

* a code block with a title (```` ```python title="site.py" ````) is a file; the titled blocks of
  a page are written into one folder. On the quickstart they are run as its last ``sh`` block
  says; on the other pages, ``.sh`` files run first (with bash), then each ``.py`` program runs to
  completion (``test_*.py`` files with pytest), and a ``text`` block titled ``output`` right after
  a program is what it prints;
* every other ``python`` block must compile, and what it imports from the library must exist.
"""

from __future__ import annotations

import ast
import dataclasses
import hmac
import importlib
import re
import shutil
import socket
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from msgspec import msgpack

from flare_agent_async import cli
from flare_agent_async.protocol import (
    FrameReader,
    Hello,
    Message,
    Result,
    TaskAssign,
    agent_proof,
    encode_frame,
    site_proof,
)

ROOT = Path(__file__).parent.parent
DOCS = ROOT / "docs"
QUICKSTART = DOCS / "quickstart.md"
# Pages written alongside the library's features; their snippets are tested with those features.
ALL_PAGES = sorted(DOCS.rglob("*.md"))
# Pages whose programs are run elsewhere (benchmarks, reliability, NVFlare jobs); their snippets
# are still compiled and their imports checked.
OTHER_PAGES = {"benchmarks.md", "reliability.md", "nvflare.md", "migrating.md"}
PAGES = [path for path in ALL_PAGES if path.relative_to(DOCS).as_posix() not in OTHER_PAGES]
PUBLIC_MODULES = [
    "flare_agent_async",
    "flare_agent_async.defs",
    "flare_agent_async.exceptions",
    "flare_agent_async.transports",
    "flare_agent_async.tls",
    "flare_agent_async.testing",
    "flare_agent_async.protocol",
    "flare_agent_async.client",
    "flare_agent_async.nvflare",  # with the nvflare extra
    "flare_agent_async.client.lightning",  # with the torch extra
]
OPTIONAL = {"nvflare", "lightning"}
"""Extras whose modules the reference documents, skipped where they are not installed."""
FENCE = re.compile(r"^```(\w*)(.*?)\n(.*?)^```", flags=re.DOTALL | re.MULTILINE)
TITLE = re.compile(r'title="([^"]+)"')


@dataclasses.dataclass
class Block:
    language: str
    title: str | None
    code: str


def blocks(page: Path) -> list[Block]:
    found = []
    for language, info, code in FENCE.findall(page.read_text()):
        title = TITLE.search(info)
        found.append(Block(language, title.group(1) if title else None, code))
    return found


def page_id(page: Path) -> str:
    return page.relative_to(DOCS).as_posix()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


# -- the quickstart, followed as a newcomer would ------------------------------------------------


def test_the_quickstart_runs_as_written(tmp_path: Path) -> None:
    page = blocks(QUICKSTART)
    files = {block.title: block.code for block in page if block.title}
    assert set(files) == {"model.py", "site.py", "trainer.py", "sync_trainer.py"}
    commands = [line.split() for line in page_commands(page) if line.startswith("python ")]
    assert [command[1] for command in commands] == ["site.py", "trainer.py", "sync_trainer.py"]
    (printed,) = [block.code for block in page if block.language == "text"]

    url = f"tcp://127.0.0.1:{free_port()}"  # the page's port may be taken on this machine
    for name, code in files.items():
        (tmp_path / name).write_text(code.replace("tcp://127.0.0.1:8002", url))
    processes = [
        subprocess.Popen(
            [sys.executable, *command[1:]],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for command in commands
    ]
    try:
        outputs = [process.communicate(timeout=60) for process in processes]
    finally:
        for process in processes:
            process.kill()
            process.wait()
    for process, (_, err) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, err[-2000:]
    site_output = outputs[0][0]
    assert site_output == printed.replace("tcp://127.0.0.1:8002", url)
    assert outputs[1][0] == "agent-1: the site said goodbye\n"
    assert outputs[2][0] == "agent-2: the site said goodbye\n"


def page_commands(page: list[Block]) -> list[str]:
    """The lines of the last ``sh`` block: the commands that run the quickstart's job."""
    (*_, last) = [block for block in page if block.language == "sh"]
    return [line.strip() for line in last.code.splitlines() if line.strip()]


# -- the programs of the other pages --------------------------------------------------------------

PROGRAM_PAGES = [
    page for page in PAGES if page != QUICKSTART and any(block.title for block in blocks(page))
]


@pytest.mark.parametrize("page", PROGRAM_PAGES, ids=page_id)
def test_the_programs_of_a_page_run_as_written(page: Path, tmp_path: Path) -> None:
    found = blocks(page)
    test_files = []
    for block in found:
        if block.title and block.title != "output":
            (tmp_path / block.title).write_text(block.code)
            if block.title.startswith("test_") and block.title.endswith(".py"):
                test_files.append(block.title)
    for index, block in enumerate(found):
        if block.title is None or block.title == "output" or block.title in test_files:
            continue
        if block.title.endswith(".sh"):
            if shutil.which("openssl") is None and "openssl" in block.code:
                pytest.skip("openssl is not installed")
            command = ["bash", "-euo", "pipefail", block.title]
        elif block.title.endswith(".py"):
            command = [sys.executable, block.title]
        else:
            continue  # a file the programs read
        done = run(command, tmp_path)
        following = found[index + 1] if index + 1 < len(found) else None
        if following is not None and following.title == "output":
            assert done.stdout == following.code, f"{block.title} printed:\n{done.stdout}"
    if test_files:  # all in one run of pytest: it is slow to start
        run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *test_files], tmp_path)


def run(command: list[str], folder: Path) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(command, cwd=folder, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{command}:\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
    return done


# -- every other snippet --------------------------------------------------------------------------


SNIPPET_PAGES = [
    page for page in ALL_PAGES if any(block.language == "python" for block in blocks(page))
]


@pytest.mark.parametrize("page", SNIPPET_PAGES, ids=page_id)
def test_python_snippets_compile_and_import_what_exists(page: Path) -> None:
    for block in blocks(page):
        if block.language != "python":
            continue
        tree = compile(
            block.code,
            f"{page.name} snippet",
            "exec",
            ast.PyCF_ONLY_AST | ast.PyCF_ALLOW_TOP_LEVEL_AWAIT,
        )
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                "flare_agent_async"
            ):
                try:
                    module = importlib.import_module(node.module or "")
                except ModuleNotFoundError as exc:
                    if (exc.name or "").split(".")[0] in OPTIONAL:
                        continue  # an optional extra that is not installed
                    raise
                for alias in node.names:
                    assert hasattr(module, alias.name), f"{page.name}: {ast.unparse(node)}"


# -- the reference ------------------------------------------------------------------------------


def documented_objects() -> list[object]:
    """What the reference pages render: whole modules (their ``__all__``) and single names."""
    objects: list[object] = []
    directive = re.compile(r"^::: ([\w.]+)\n((?:    .*\n)*)", flags=re.MULTILINE)
    for page in (DOCS / "reference").glob("*.md"):
        for target, options in directive.findall(page.read_text()):
            try:
                module = importlib.import_module(target)
            except ModuleNotFoundError as exc:
                if (exc.name or "").split(".")[0] in OPTIONAL:
                    continue  # an optional extra that is not installed
                module_name, _, name = target.rpartition(".")
                objects.append(getattr(importlib.import_module(module_name), name))
            else:
                if "members: false" not in options:
                    objects.extend(getattr(module, name) for name in module.__all__)
    return objects


@pytest.mark.parametrize("module_name", PUBLIC_MODULES)
def test_every_public_name_is_in_the_reference(module_name: str) -> None:
    if module_name == "flare_agent_async.nvflare":
        pytest.importorskip("nvflare", reason="needs NVFlare: pip install -e '.[test]'")
    if module_name == "flare_agent_async.client.lightning":
        pytest.importorskip("lightning", reason="needs lightning: pip install -e '.[torch]'")
    documented = documented_objects()
    module = importlib.import_module(module_name)
    missing = [
        name
        for name in module.__all__
        if not any(getattr(module, name) is obj for obj in documented)
    ]
    assert not missing, f"not in docs/reference: {module_name}.{missing}"


def test_every_command_line_option_is_in_the_cli_page() -> None:
    page = (DOCS / "cli.md").read_text()
    parser = cli._parser()
    (commands,) = [
        action for action in parser._actions if action.__class__.__name__ == "_SubParsersAction"
    ]
    for name, subparser in commands.choices.items():
        assert f"flare-agent-async {name}" in page, f"the {name} command is not in docs/cli.md"
        for action in subparser._actions:
            for option in action.option_strings:
                if option not in ("-h", "--help"):
                    assert f"`{option}" in page, f"{name} {option} is not in docs/cli.md"


def test_every_page_is_in_the_site_navigation() -> None:
    navigation = set(re.findall(r"([\w/]+\.md)", (ROOT / "mkdocs.yml").read_text()))
    pages = {path.relative_to(DOCS).as_posix() for path in DOCS.rglob("*.md")}
    assert pages == navigation


# -- the wire protocol page is enough to speak the protocol -------------------------------------


def read_frames(data: bytes) -> list[Message]:
    reader, messages, offset = FrameReader(), [], 0
    while offset < len(data):
        into = reader.buffer_for_read()
        count = min(len(into), len(data) - offset)
        into[:count] = data[offset : offset + count]
        reader.bytes_read(count)
        offset += count
        while (message := reader.next_message()) is not None:
            messages.append(message)
    return messages


def test_a_task_framed_by_the_protocol_page_is_read_by_the_library() -> None:
    weights = np.arange(6, dtype="<f4").reshape(2, 3)
    big = bytes(range(256)) * 300  # over 64 KiB: out of band
    array = msgpack.Ext(1, msgpack.encode(["<f4", [2, 3], 0, False]))
    payload = {
        "w": array,
        "blob": msgpack.Ext(2, msgpack.encode(1)),
        "pair": msgpack.Ext(3, msgpack.encode([1, "a"])),
    }
    message = {
        "kind": "task",
        "task_id": "t1",
        "task_name": "train",
        "meta": {"current_round": 2},
        "data": payload,
    }
    buffers = [weights.tobytes(), big]
    header = msgpack.encode([[len(b) for b in buffers], message])
    frame = (
        struct.pack("<2sBBII", b"FA", 1, 0, len(header), len(buffers)) + header + b"".join(buffers)
    )

    (task,) = read_frames(frame)
    assert isinstance(task, TaskAssign) and task.meta == {"current_round": 2}
    assert np.array_equal(task.data["w"], weights) and task.data["w"].dtype == np.float32
    assert task.data["blob"] == big and task.data["pair"] == (1, "a")


def test_the_library_frames_a_result_as_the_protocol_page_says() -> None:
    result = Result(task_id="t1", return_code="OK", meta={}, data={"w": np.ones(3, dtype=">i8")})
    frame = b"".join(encode_frame(result))
    magic, version, reserved, header_bytes, count = struct.unpack_from("<2sBBII", frame)
    assert (magic, version, reserved, count) == (b"FA", 1, 0, 1)
    lengths, message = msgpack.decode(
        frame[12 : 12 + header_bytes], ext_hook=lambda c, d: (c, bytes(d))
    )
    assert lengths == [24] and len(frame) == 12 + header_bytes + 24
    assert message["kind"] == "result" and message["return_code"] == "OK"
    code, data = message["data"]["w"]
    assert code == 1 and msgpack.decode(data) == [">i8", [3], 0, False]


def test_the_proofs_are_computed_as_the_protocol_page_says() -> None:
    hello = Hello(
        protocol_version=1, agent_id="a1", site_name="s", instance_id="i", nonce=b"n" * 16
    )
    site_nonce, secret = b"m" * 16, b"secret"
    fields = msgpack.encode(["a1", "s", None, "i", b"n" * 16, site_nonce])
    assert (
        agent_proof(secret, hello, site_nonce)
        == hmac.new(secret, b"agent\0" + fields, "sha256").digest()
    )
    assert (
        site_proof(secret, hello, site_nonce)
        == hmac.new(secret, b"site\0" + fields, "sha256").digest()
    )
