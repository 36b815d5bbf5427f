"""The processes of this machine that carry a mark in their environment, for reaping what a
launched trainer left behind. Linux shows environments in ``/proc``; elsewhere none are found."""

from __future__ import annotations

import os

__all__ = ["processes_with"]


def processes_with(entry: bytes) -> dict[int, str]:
    """Live processes whose environment holds ``entry`` (``NAME=value``): pid -> command line.
    Empty where ``/proc`` does not show environments."""
    found: dict[int, str] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return found
    for name in entries:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as file:
                environment = file.read().split(b"\0")
            with open(f"/proc/{name}/cmdline", "rb") as file:
                command = file.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if entry in environment and command:  # a zombie has no command line left
            found[int(name)] = command
    return found
