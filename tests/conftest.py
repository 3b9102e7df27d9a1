import pytest

from .support import L4LB, Backend


@pytest.fixture
def backends():
    """backends(handler, name=...) starts a Backend; all are closed after the test."""
    started = []

    def start(handler, name="b", **kw):
        b = Backend(handler, name=name, **kw)
        started.append(b)
        return b

    yield start
    for b in started:
        b.close()


@pytest.fixture
def l4lb(tmp_path):
    """l4lb(config_text) runs `l4lb run -c` on it and waits until it listens."""
    started = []

    def start(config, wait=True, **kw):
        proc = L4LB(tmp_path, config, **kw)
        started.append(proc)
        return proc.wait_ready() if wait else proc

    yield start
    for p in started:
        p.stop()
    for p in started:
        # A debug build (L4LB_DEBUG=1) raises AssertionError on a relay state transition
        # outside its table; the loop logs it and goes on, so look for it here.
        bad = [line for line in p.raw if "is not in RELAY_NEXT" in line]
        assert not bad, "relay state transition outside the table:\n" + "".join(bad[:5])
