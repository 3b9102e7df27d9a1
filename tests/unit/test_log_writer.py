"""LogWriter on a real pipe: never waits, keeps a bounded queue, drops whole lines,
counts them and reports them once when the reader has caught up."""
import asyncio
import json
import os

import structlog

from l4lb import log


def drain(fd: int) -> bytes:
    out = bytearray()
    while True:
        try:
            data = os.read(fd, 1 << 20)
        except BlockingIOError:
            return bytes(out)
        if not data:
            return bytes(out)
        out += data


def test_a_full_pipe_drops_whole_lines_and_the_drop_is_reported_once_drained(monkeypatch):
    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)
    writer = log.LogWriter(write_fd, queue_max=4096)
    monkeypatch.setattr(log, "_writer", writer)
    structlog.configure(processors=[structlog.processors.JSONRenderer()],
                        logger_factory=lambda *a: log._WriterLogger(writer))
    try:
        assert writer.nonblocking
        line = "x" * 100
        for _ in range(2000):              # 200 KiB into a 64 KiB pipe: never blocks
            writer.write_line(line)
        assert writer.queued <= 4096 + 101
        assert log.dropped_lines() == writer.dropped > 0
        dropped = writer.dropped

        async def catch_up():
            # The loop's add_writer callback flushes once the reader has made room.
            data = bytearray()
            for _ in range(200):
                data += drain(read_fd)
                if b"log_lines_dropped" in data:
                    return bytes(data)
                await asyncio.sleep(0.01)
            return bytes(data)

        # A line written while a loop runs arms the flush.
        async def main():
            writer.write_line(line)
            return await catch_up()

        data = asyncio.run(main())
        lines = data.split(b"\n")
        assert lines[-1] == b""
        body, report = lines[:-2], json.loads(lines[-2])
        assert all(x == line.encode() for x in body)     # no torn or merged line
        assert writer.dropped >= dropped
        assert report == {"event": "log_lines_dropped", "count": writer.dropped,
                          "total": writer.dropped}
        assert len(body) + writer.dropped == 2001        # every line written or counted
        assert writer.unreported == 0 and writer.queued == 0
    finally:
        os.close(read_fd)
        os.close(write_fd)
        structlog.reset_defaults()


def test_a_terminal_or_file_stays_blocking(tmp_path):
    with open(tmp_path / "log", "wb") as f:
        writer = log.LogWriter(f.fileno())
        assert not writer.nonblocking
        writer.write_line("hello")
    assert (tmp_path / "log").read_bytes() == b"hello\n"
