"""Developer sessions: ``nox -s tests lint typecheck`` (``pip install nox`` first)."""

from __future__ import annotations

import nox

nox.options.sessions = ["tests", "lint", "typecheck"]
nox.options.reuse_existing_virtualenvs = True


@nox.session
@nox.parametrize("backend", ["asyncio", "trio"])
def tests(session: nox.Session, backend: str) -> None:
    """The test suite, with async tests on one event loop."""
    session.install("-e", ".[test]")
    session.run("pytest", *session.posargs, env={"FLARE_AGENT_ASYNC_BACKENDS": backend})


@nox.session
def lint(session: nox.Session) -> None:
    """ruff's lints and formatting check."""
    session.install("ruff")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy --strict on the package."""
    session.install("-e", ".[test]", "mypy")
    session.run("mypy", "--strict", "flare_agent_async")


@nox.session
def docs(session: nox.Session) -> None:
    """The documentation site, built into site/; any warning fails the build."""
    session.install("-e", ".[docs]")
    session.run("mkdocs", "build", "--strict", *session.posargs, env={"NO_MKDOCS_2_WARNING": "1"})


@nox.session
def bench(session: nox.Session) -> None:
    """The benchmark suite, NVFlare's agent included: ``nox -s bench -- --quick``; ``--report``
    rewrites docs/benchmarks.md (arguments go to ``python -m benchmarks``)."""
    session.install("-e", ".[bench,nvflare]")
    session.run("python", "-m", "benchmarks", *session.posargs)
