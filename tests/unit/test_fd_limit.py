"""The descriptor arithmetic behind `show info`'s warnings and the `fd_limit_low` log line."""
import resource

from l4lb.process import (FD_HEADROOM, fd_limit_report, fd_limit_warnings, fds_needed,
                          max_pipes)


def test_each_connection_needs_two_descriptors_and_each_pipe_two_plus_headroom():
    assert fds_needed(10000) == 20000 + 2 * 2500 + FD_HEADROOM   # 2 per connection and per pipe
    assert fds_needed(0) == 0          # unlimited connections: no figure to compare


def test_warning_only_below_the_needed_figure():
    need = fds_needed(10000)
    assert fd_limit_warnings(10000, need) == []
    assert fd_limit_warnings(10000, need + 1) == []
    [warning] = fd_limit_warnings(10000, need - 1)
    assert str(need - 1) in warning and str(need) in warning and "LimitNOFILE" in warning
    assert fd_limit_warnings(0, 64) == []
    assert fd_limit_warnings(10, resource.RLIM_INFINITY) == []


def test_report_reads_the_current_limits():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    report = fd_limit_report(1)
    assert report["fd_limit"]["hard"] in (hard, None)
    assert report["fds_needed"] == 2 + 2 + FD_HEADROOM   # one connection, one pipe
    assert report["warnings"] == fd_limit_warnings(1, soft)


def test_the_relay_adds_two_descriptors_per_pipe_for_a_quarter_of_the_connections():
    assert (max_pipes(100), max_pipes(4), max_pipes(1), max_pipes(0)) == (25, 1, 1, 0)
    assert fds_needed(100) == 200 + 50 + FD_HEADROOM
    [warning] = fd_limit_warnings(100, soft=300)
    assert "2 per pipe for up to 25 pipes" in warning and "beyond 80 connections" in warning
