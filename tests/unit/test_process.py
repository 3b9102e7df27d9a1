"""l4lb.process: the descriptor reserve and a reading that answers out of descriptors."""
import errno
import os

import pytest

from l4lb import process
from l4lb.process import FdReserve, ProcessProbe


def out_of_fds():
    return OSError(errno.EMFILE, "Too many open files")


def test_the_reserve_gives_a_descriptor_back_per_retry_and_refills():
    reserve = FdReserve(3)
    assert len(reserve.fds) == 3
    failures = [2]

    def opener():
        if failures[0]:
            failures[0] -= 1
            raise out_of_fds()
        return "opened"

    assert reserve.call(opener) == "opened"
    assert len(reserve.fds) == 1 and reserve.released == 2
    reserve.refill()
    assert len(reserve.fds) == 3
    reserve.close()


def test_the_reserve_lets_other_errors_through_and_raises_once_spent():
    reserve = FdReserve(2)

    def refused():
        raise ConnectionRefusedError(errno.ECONNREFUSED, "refused")

    with pytest.raises(ConnectionRefusedError):
        reserve.call(refused)
    assert len(reserve.fds) == 2                     # not spent on what it cannot cure

    def never():
        raise out_of_fds()

    with pytest.raises(OSError) as info:
        reserve.call(never)
    assert info.value.errno == errno.EMFILE and reserve.fds == []
    reserve.close()


def test_a_reading_out_of_descriptors_answers_with_the_last_good_figures(monkeypatch):
    reserve = FdReserve(1)
    probe = ProcessProbe(reserve)
    good = probe.read()
    assert not good.stale and good.open_fds > 0 and good.rss_bytes > 0

    def no_descriptor(cpu_percent):
        raise out_of_fds()

    monkeypatch.setattr(probe, "_read", no_descriptor)
    stale = probe.read(cpu_percent=True)
    assert stale.stale and stale.rss_bytes == good.rss_bytes
    # Counted while the one reserved descriptor was lent out (the count needs none).
    assert process.count_open_fds() - 1 <= stale.open_fds <= process.count_open_fds()
    reserve.close()


def test_counting_open_descriptors_opens_none():
    before = os.stat("/proc/self/fd").st_size
    assert process.count_open_fds() == before > 0
