"""The shared backend table (ext/l4lb/shared.pxi): one memfd that several processes map,
whose limits are exact across them and whose counters sum; a dead worker's share comes
back with retire_row, even when it died holding a per-source mutex."""
import json
import os
import signal
import time

import pytest

from l4lb import _native
from l4lb._native import LeastConn

pytestmark = pytest.mark.timeout(120)


def small_table(rows=3, **kw):
    caps = dict(backends=8, listeners=4, pools=4, sources=1024)
    caps.update(kw)
    return _native.SharedTable(rows=rows, **caps)


def attached_target(table, index, slot=0, name="a"):
    t = _native.Target("p", name, "127.0.0.1", 9, slot)
    t.attach(table, index)
    return t


def fork_children(count, body):
    """Fork `count` children running body(k, go_fd) -> dict (sent back as JSON); returns
    (pids, read ends, the go pipe's write end). Children always leave with os._exit."""
    pids, outs = [], []
    go_r, go_w = os.pipe()
    for k in range(count):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:                                 # the child
            code = 1
            try:
                os.close(r)
                result = body(k, go_r)
                os.write(w, json.dumps(result).encode())
                code = 0
            finally:
                os._exit(code)
        os.close(w)
        pids.append(pid)
        outs.append(r)
    os.close(go_r)
    return pids, outs, go_w


def collect(pids, outs, timeout=60.0):
    results = []
    deadline = time.monotonic() + timeout
    for pid, r in zip(pids, outs):
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                raise AssertionError(f"child {pid} did not finish")
            time.sleep(0.01)
        data = b""
        while chunk := os.read(r, 65536):
            data += chunk
        os.close(r)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
        results.append(json.loads(data))
    return results


def test_children_never_hold_more_than_max_connections_of_one_backend_together():
    table = small_table(rows=3)
    index = table.alloc_backend()
    fd = table.fd
    limit, rounds = 100, 3000

    def child(k, go_fd):
        mine = _native.SharedTable(fd=fd)
        mine.set_row(k)
        t = attached_target(mine, index)
        os.read(go_fd, 1)                                # the barrier
        held = taken = refused = seen = 0
        for i in range(rounds):
            # Each child wants 60 at once: together they ask for 180 of the 100.
            if held < 60 and t.try_acquire(limit):
                held += 1
                taken += 1
                seen = max(seen, t.active)
            elif held:
                t.release()
                held -= 1
            else:
                refused += 1
        while held:
            t.release()
            held -= 1
        t.total = taken                                  # this row's counter
        return {"taken": taken, "seen": seen}

    pids, outs, go = fork_children(3, child)
    os.write(go, b"xxx")
    os.close(go)
    results = collect(pids, outs)
    t = attached_target(table, index)
    assert max(r["seen"] for r in results) <= limit
    assert t.active == 0
    assert t.total == sum(r["taken"] for r in results)   # the rows sum exactly


def test_a_killed_worker_is_retired_and_its_share_of_every_active_count_comes_back():
    table = small_table(rows=2)
    b = table.alloc_backend()
    lst_index = table.alloc_listener()
    pool_index = table.alloc_pool()
    limits = _native.SharedSourceLimits(table, lst_index, max_connections=5)
    fd = table.fd
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            mine = _native.SharedTable(fd=fd)
            mine.set_row(1)
            t = attached_target(mine, b)
            pool = _native.PoolRuntime("p", LeastConn())
            pool.attach(mine, pool_index)
            pool.retried = 4
            for _ in range(30):
                t.try_acquire(0)
            t.total = 30
            theirs = _native.SharedSourceLimits(mine, lst_index, max_connections=5)
            for _ in range(5):
                assert theirs.admit(7, 1000.0) is None
            mine._lock_all_stripes()                  # dies holding every stripe
            os.write(ready_w, b"x")
            time.sleep(60)
        finally:
            os._exit(1)
    os.close(ready_w)
    assert os.read(ready_r, 1) == b"x"
    os.close(ready_r)
    t = attached_target(table, b)
    assert t.active == 30
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    table.retire_row(1)                                  # locks the dead owner's stripes
    assert t.active == 0
    assert t.total == 30                                 # moved to the retired row
    pool = _native.PoolRuntime("p", LeastConn())
    pool.attach(table, pool_index)
    assert pool.retried == 4
    assert len(limits) == 0                              # rate 0: released entries go
    for _ in range(5):
        assert limits.admit(7, 1001.0) is None
    assert limits.admit(7, 1001.0) == "per_source_max_connections"


def test_a_worker_killed_inside_a_loop_of_admits_leaves_no_deadlock():
    table = small_table(rows=2)
    lst_index = table.alloc_listener()
    limits = _native.SharedSourceLimits(table, lst_index, max_connections=3, rate=1000.0)
    fd = table.fd
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            mine = _native.SharedTable(fd=fd)
            mine.set_row(0)
            theirs = _native.SharedSourceLimits(mine, lst_index, max_connections=3,
                                                rate=1000.0)
            os.write(ready_w, b"x")
            now = 1000.0
            while True:
                for key in range(64):
                    now += 0.001
                    if theirs.admit(key, now) is None:
                        theirs.release(key)
        finally:
            os._exit(1)
    os.close(ready_w)
    assert os.read(ready_r, 1) == b"x"
    os.close(ready_r)
    time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    table.retire_row(0)
    # Every stripe can be taken again, and the limits count from what is left.
    for key in range(64):
        assert limits.admit(key, 5000.0) is None
        limits.release(key)
    assert limits.prune(1e9) <= 64
    assert len(limits) == 0


def test_retire_row_keeps_totals_and_zeroes_the_row():
    table = small_table(rows=2)
    b = table.alloc_backend()
    worker = _native.SharedTable(fd=table.fd)
    worker.set_row(0)
    t = attached_target(worker, b)
    assert t.try_acquire(0)
    t.total, t.bytes_in, t.failed = 5, 100, 2
    assert table.row_figures(0) == {"active": 0, "accepted": 0}
    reader = attached_target(table, b)
    assert (reader.active, reader.total, reader.bytes_in, reader.failed) == (1, 5, 100, 2)
    table.retire_row(0)
    assert (reader.active, reader.total, reader.bytes_in, reader.failed) == (0, 5, 100, 2)
    assert t.total == 5                                 # the worker's view: same sums
    with pytest.raises(ValueError, match="no worker row"):
        table.retire_row(2)                             # the retired row itself


def test_leastconn_in_a_following_worker_orders_by_every_worker_s_connections():
    master = small_table(rows=2)
    indexes = [master.alloc_backend() for _ in range(3)]
    hubs, pools = [], []
    for row in range(2):
        table = _native.SharedTable(fd=master.fd)
        table.set_row(row)
        hub = _native.Hub(None)
        hub.attach(table)
        hub.follow = True
        algo = LeastConn()
        pool = _native.PoolRuntime("p", algo)
        for slot, index in enumerate(indexes):
            algo.add(f"b{slot}", 1)
            algo.set_up(slot, True)
            pool.add_target(attached_target(table, index, slot, f"b{slot}"))
        hub.register_pool(pool)
        hubs.append(hub)
        pools.append(pool)
    assert hubs[1].next_id == (1 << 40) | 1              # ids unique across workers
    a, b = pools
    for _ in range(3):                                   # worker 0 loads b0 and b1
        a.targets[0].try_acquire(0)
    a.targets[1].try_acquire(0)
    hubs[1].resync(b)
    assert [b.algo.active_count(i) for i in range(3)] == [3, 1, 0]
    assert b.algo.pick() == 2
    # The master publishes b2 down: the epoch moves and the follower resyncs.
    master_targets = [attached_target(master, i, s) for s, i in enumerate(indexes)]
    epoch = master.epoch
    for slot, t in enumerate(master_targets):
        t.publish(slot != 2, 1, 0)
    assert master.epoch == epoch + 3
    hubs[1].resync(b)
    assert not b.algo.is_eligible(2)
    assert b.algo.pick() == 1
    assert master_targets[0].published == (True, 1, 0)


def test_a_full_table_and_a_bad_row_are_refused_with_their_reason():
    table = small_table(rows=1, backends=2)
    table.alloc_backend()
    table.alloc_backend()
    with pytest.raises(IndexError, match="shared table full: 2 backends"):
        table.alloc_backend()
    with pytest.raises(ValueError, match="no row 1"):
        table.set_row(1)
    t = _native.Target("p", "a", "127.0.0.1", 9, 0)
    with pytest.raises(ValueError, match="not allocated"):
        t.attach(small_table(), 0)


def test_attaching_to_what_is_no_table_names_what_is_wrong(tmp_path):
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    with pytest.raises(ValueError, match="not an open descriptor"):
        _native.SharedTable(fd=r)
    small = tmp_path / "small"
    small.write_bytes(b"\0" * 16)
    with open(small, "rb") as f:
        with pytest.raises(ValueError, match="too small"):
            _native.SharedTable(fd=f.fileno())
    zeros = tmp_path / "zeros"
    zeros.write_bytes(b"\0" * 8192)
    with open(zeros, "r+b") as f:
        with pytest.raises(ValueError, match="bad magic"):
            _native.SharedTable(fd=f.fileno())
    table = small_table()
    image = bytearray(os.pread(table.fd, os.fstat(table.fd).st_size, 0))
    image[8] = 99                                       # the layout version
    fd = os.memfd_create("not-this-version")
    try:
        os.write(fd, image)
        with pytest.raises(ValueError, match="layout version 99"):
            _native.SharedTable(fd=fd)
        os.pwrite(fd, bytes([_native.SHARED_VERSION]), 8)
        os.ftruncate(fd, len(image) - 64)
        with pytest.raises(ValueError, match="capacities need"):
            _native.SharedTable(fd=fd)
    finally:
        os.close(fd)


def test_a_table_attached_by_fd_reads_the_capacities_from_its_header():
    table = small_table(rows=4, backends=3, listeners=2, pools=1, sources=100)
    other = _native.SharedTable(fd=table.fd)
    assert other.rows == 4 and other.row == -1 and other.fd != table.fd
    assert other.capacities == {"backends": 3, "listeners": 2, "pools": 1, "sources": 128}


def test_listener_and_hub_counters_sum_over_rows_and_reject_words_have_slots():
    table = small_table(rows=2)
    index = table.alloc_listener()
    rts = []
    for row in range(2):
        mine = _native.SharedTable(fd=table.fd)
        mine.set_row(row)
        hub = _native.Hub(None)
        hub.attach(mine)
        rt = _native.ListenerRuntime("l", hub)
        rt.attach(mine, index)
        rts.append(rt)
    rts[0].count_rejected("denied")
    rts[1].count_rejected("denied")
    rts[1].count_rejected("some_new_word")              # no slot: a per-process dict
    assert rts[0].rejected == {"denied": 2}
    assert rts[1].rejected == {"denied": 2, "some_new_word": 1}
    assert set(_native.REJECT_WORDS) >= {"global_max_connections", "per_source_rate"}
