"""persist.StateWriter: writes run in the executor, one at a time; changes made while one
runs share the next; every caller learns whether the write carrying its change worked."""
import asyncio
import threading

from l4lb.persist import StateWriter
from l4lb.state import RuntimeState


class Log:
    def __init__(self):
        self.errors = []

    def error(self, event, **fields):
        self.errors.append((event, fields))


def run_burst(n, fail=False):
    state = RuntimeState()
    written = []
    log = Log()
    release = threading.Event()

    def write(path, snapshot):
        release.wait(5)                      # the first write is slow: the rest pile up
        if fail:
            raise IsADirectoryError(21, "Is a directory")
        written.append(dict(snapshot.backends))

    async def main():
        writer = StateWriter(asyncio.get_running_loop(), "x.toml", lambda: state, log, write)
        futs = []
        for i in range(n):
            state.record_weight("p/b", i)
            futs.append(writer.save())
            if i == 0:
                await asyncio.sleep(0)       # one loop turn: the first write starts
        release.set()
        results = await asyncio.gather(*futs)
        await writer.flush()
        return results, writer.writes

    results, writes = asyncio.run(main())
    return results, writes, written, log


def test_a_burst_costs_two_writes_and_the_last_state_is_written_last():
    results, writes, written, log = run_burst(200)
    assert results == [None] * 200 and log.errors == []
    assert writes == 2
    assert written[-1] == {"p/b": {"weight": 199}}


def test_a_failed_write_is_reported_to_every_change_it_carried_and_logged():
    results, writes, _, log = run_burst(3, fail=True)
    assert all("not saved" in r and "Is a directory" in r for r in results)
    assert [e for e, _ in log.errors] == ["state_file_not_saved"] * writes
