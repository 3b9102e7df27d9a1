"""Out of file descriptors, the control socket and the metrics endpoint still answer with
figures (issue 20 item 11): they are what an operator needs most at that moment."""
import socket
import urllib.request

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ..support import ask, name_handler, simple_config


def scrape(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        assert resp.status == 200
        text = resp.read().decode()
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples
            if not s.labels}


@pytest.mark.timeout(90)
def test_show_info_and_a_scrape_answer_with_figures_when_descriptors_run_out(backends, l4lb):
    """The worker (the data path) runs out of descriptors, and the master, which answers
    the control socket and /metrics, has none to spare either (its limit is what it holds,
    its reserve included): both still answer, with figures."""
    b1 = backends(name_handler, name="b1", backlog=512)
    lb = l4lb(simple_config([("b1", b1.address)], access=False, global_extra="workers = 1")
              + '\n[metrics]\nlisten = "127.0.0.1:0"\n')
    metrics_port = lb.wait_event("metrics_started")["port"]
    assert ask(lb, "show info")["ok"] and scrape(metrics_port)["process_open_fds"] > 0
    worker, master = lb.worker_ps, lb.ps
    _, hard = worker.rlimit(psutil.RLIMIT_NOFILE)
    limit = worker.num_fds() + 40
    worker.rlimit(psutil.RLIMIT_NOFILE, (limit, hard))
    master_limit = master.num_fds()
    master.rlimit(psutil.RLIMIT_NOFILE, (master_limit, hard))
    clients = []
    try:
        # Idle clients until the worker has no descriptor left (each relayed one takes
        # two); the kernel keeps queueing the rest in the listen backlog.
        for _ in range(60):
            s = socket.create_connection(("127.0.0.1", lb.port()), timeout=10)
            s.sendall(b"hi\n")
            clients.append(s)
        lb.wait_event("fd_exhausted", timeout=20)
        assert worker.num_fds() >= limit - 2
        for _ in range(3):                               # again and again, not just once
            info = ask(lb, "show info")
            assert info["ok"], info
            assert info["open_fds"] >= limit - 8 and info["rss_bytes"] > 0   # all processes
            assert info["fd_limit"]["soft"] == master_limit
            figures = scrape(metrics_port)
            assert figures["process_open_fds"] >= master_limit - 8        # the master's own
            assert figures["process_max_fds"] == master_limit
            assert figures["process_resident_memory_bytes"] > 0
        assert not lb.events_named("metrics_scrape_failed")
        assert not lb.events_named("control_command_failed")
    finally:
        master.rlimit(psutil.RLIMIT_NOFILE, (hard, hard))
        worker.rlimit(psutil.RLIMIT_NOFILE, (hard, hard))
        for s in clients:
            s.close()
    assert ask(lb, "show info")["ok"]                    # and it recovers
