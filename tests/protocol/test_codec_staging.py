"""The frame reader's staging buffer: small for an idle connection, larger for a busy one."""

from __future__ import annotations

from flare_agent_async.protocol import FrameReader, Heartbeat, encode_frame


def frames(count: int) -> bytes:
    return b"".join(bytes(part) for _ in range(count) for part in encode_frame(Heartbeat()))


def test_an_idle_connection_reads_into_a_small_buffer() -> None:
    """Thousands of connected agents each hold one: it must not cost 64 KiB apiece."""
    reader = FrameReader()
    assert len(reader.buffer_for_read()) <= 8 * 1024


def test_reads_that_fill_the_buffer_grow_it_to_64_kib_and_lose_nothing() -> None:
    reader = FrameReader()
    blob = memoryview(frames(20_000))
    offered, got, offset = [], 0, 0
    for _ in range(10_000):  # bounded: far more reads than needed
        if offset == len(blob):
            break
        view = reader.buffer_for_read()
        offered.append(len(view))
        count = min(len(view), len(blob) - offset)
        view[:count] = blob[offset : offset + count]
        del view
        offset += count
        reader.bytes_read(count)
        while (message := reader.next_message()) is not None:
            assert isinstance(message, Heartbeat)
            got += 1
    assert got == 20_000
    assert offered[0] <= 8 * 1024
    assert 32 * 1024 < max(offered) <= 64 * 1024  # doubled while reads filled it, to 64 KiB
