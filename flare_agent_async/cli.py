"""The ``flare-agent-async`` command."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

import anyio

from ._demo import run_demo


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
        "demo", help="run a small federated training on this machine (a site and its agents)"
    )
    demo.add_argument("--agents", type=_positive, default=4, help="number of agents (4)")
    demo.add_argument("--rounds", type=_positive, default=5, help="rounds of FedAvg (5)")
    demo.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    demo.add_argument("--seed", type=int, default=0, help="seed of the synthetic data (0)")
    demo.add_argument("--json", action="store_true", help="print the results as JSON")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args = _parser().parse_args(argv)
    as_json = args.json

    def on_round(number: int, loss: float, seconds: float) -> None:
        if not as_json:
            rounds = f"{number + 1}/{args.rounds}"
            print(f"round {rounds}: held-out loss {loss:.4f} ({seconds * 1e3:.1f} ms)")

    async def demo() -> None:
        if not as_json:
            print(f"federated run: {args.agents} agents, {args.rounds} rounds, {args.backend}")
        report = await run_demo(
            agents=args.agents, rounds=args.rounds, seed=args.seed, on_round=on_round
        )
        if as_json:
            json.dump(
                {
                    "losses": report.losses,
                    "round_seconds": report.round_seconds,
                    "weights": report.weights,
                },
                sys.stdout,
            )
            print()
        else:
            w, b = report.weights["w"], report.weights["b"]
            print(f"global model: y = {w:.3f} x + {b:.3f} (the data follows y = 3x + 2)")

    anyio.run(demo, backend=args.backend)
    return 0


if __name__ == "__main__":
    sys.exit(main())
