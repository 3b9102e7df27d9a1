import pytest

from .support import L4LB, Backend, with_splice


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


RELAYS = ("splice", "stream")


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "each_relay: run each test of the module that uses the l4lb fixture "
        "once per relay: the raw-socket relay (`splice = true`, the default) and the "
        "uvloop stream relay (`splice = false`), set on the listener `web`")


def pytest_generate_tests(metafunc):
    if "l4lb" in metafunc.fixturenames and metafunc.definition.get_closest_marker("each_relay"):
        metafunc.parametrize("relay", RELAYS, indirect=True)


@pytest.fixture
def relay(request):
    """The relay an `each_relay` test runs against; None elsewhere (the config decides)."""
    return getattr(request, "param", None)


@pytest.fixture
def l4lb(tmp_path, relay):
    """l4lb(config_text) runs `l4lb run -c` on it and waits until it listens."""
    started = []

    def start(config, wait=True, **kw):
        if relay is not None:
            config = with_splice(config, relay == "splice")
        proc = L4LB(tmp_path, config, **kw)
        started.append(proc)
        return proc.wait_ready() if wait else proc

    yield start
    for p in started:
        p.stop()
