"""`show info`'s process figures and its warning about a too-low descriptor limit."""
from __future__ import annotations

import resource

from l4lb.control.client import call
from l4lb.process import FD_HEADROOM

from ..support import echo_handler, simple_config


def limit_fds(n: int):
    """preexec_fn: both RLIMIT_NOFILE limits at `n`, so `l4lb run` cannot raise them."""
    def apply():
        resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))
    return apply


def test_show_info_warns_when_the_fd_limit_is_below_what_max_connections_needs(
        l4lb, backends, tmp_path):
    b1 = backends(echo_handler, "b1")
    lb = l4lb(simple_config([("b1", b1.address)], global_extra="max_connections = 5000"),
              preexec_fn=limit_fds(1024))
    info = call(tmp_path / "l4lb.sock", "show info")
    assert info["ok"]
    assert info["fd_limit"] == {"soft": 1024, "hard": 1024}
    # splice = true (the default): 2 per connection, 2 per pipe for max_connections / 4.
    assert info["fds_needed"] == 2 * 5000 + 2 * 1250 + FD_HEADROOM
    [warning] = info["warnings"]
    assert "1024" in warning and "max_connections" in warning
    # The same fact is logged once at start.
    low = lb.wait_event("fd_limit_low")
    assert low["soft"] == 1024 and low["hard"] == 1024
    assert info["cpu_seconds"] >= 0 and info["open_fds"] > 0 and info["rss_bytes"] > 0


def test_show_info_has_no_warning_when_the_fd_limit_is_enough(l4lb, backends, tmp_path):
    b1 = backends(echo_handler, "b1")
    lb = l4lb(simple_config([("b1", b1.address)], global_extra="max_connections = 200"),
              preexec_fn=limit_fds(1024))
    info = call(tmp_path / "l4lb.sock", "show info")
    assert info["warnings"] == [] and info["fds_needed"] == 2 * 200 + 2 * 50 + FD_HEADROOM
    assert not lb.events_named("fd_limit_low")


def test_run_raises_the_soft_fd_limit_to_the_hard_limit(l4lb, backends, tmp_path):
    b1 = backends(echo_handler, "b1")

    def soft_below_hard():
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))

    lb = l4lb(simple_config([("b1", b1.address)]), preexec_fn=soft_below_hard)
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    logged = lb.wait_event("fd_limit")
    assert logged["soft"] == logged["hard"] == hard
    assert call(tmp_path / "l4lb.sock", "show info")["fd_limit"]["soft"] == hard
