"""A reload that finds the config file empty (a non-atomic writer caught mid-copy) is
refused and every listener keeps serving (issue 20 item 4)."""
import signal

from ..support import ask, hello, name_handler, simple_config


def test_a_reload_of_an_empty_config_file_is_refused_and_the_listener_keeps_serving(backends, l4lb):
    a = backends(name_handler, name="a")
    lb = l4lb(simple_config([("a", a.address)]))
    lb.path.write_bytes(b"")
    reply = ask(lb, "reload")
    assert reply["ok"] is False and "at least one [listeners.NAME]" in reply["error"]
    lb.proc.send_signal(signal.SIGHUP)
    assert lb.wait_event("config_rejected")
    assert hello(lb.port()) == "a"
    assert [row["name"] for row in ask(lb, "show listeners")["listeners"]] == ["web"]
