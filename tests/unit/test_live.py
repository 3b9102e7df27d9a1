"""The live view without a balancer: rates and drain ETAs from successive snapshots
(l4lb.live), the status page's server-rendered first view (l4lb.statuspage) and the
`l4lb top` screen as state (l4lb.top.TopView), drawn into an 80x24 console."""
from __future__ import annotations

import copy
import json

import jsonschema
import pytest
from rich.console import Console

from l4lb import live, statuspage
from l4lb.top import TopView, sparkline

from ..support import REPO

SCHEMA = json.loads((REPO / "docs" / "status.schema.json").read_text())


def backend(name, pool="main", state="up", active=0, total=0, failed=0, bytes_in=0,
            bytes_out=0, health="unchecked"):
    return {"pool": pool, "name": name, "address": "127.0.0.1:9000", "state": state,
            "admin": live.ADMIN_STATES[state], "health": health, "weight": 1,
            "active": active, "total": total, "failed": failed, "bytes_in": bytes_in,
            "bytes_out": bytes_out, "set_by": None}


def snap(ts, backends, accepted=0, pools=("main",)):
    return {
        "ts": ts,
        "info": {"version": "0", "pid": 1, "uptime_s": 1.0, "cpu_percent": None,
                 "rss_bytes": 1, "open_fds": 1, "conns_active": 0, "conns_total": 0},
        "pools": [{"name": p, "algorithm": "rr", "backends": 1, "queue": 0,
                   "queue_timeouts": 0, "retries": 0} for p in pools],
        "backends": backends,
        "listeners": [{"name": "web", "bind": ["127.0.0.1:0"], "pool": "main", "split": None,
                       "active": 0, "accepted": accepted, "rejected": {}}],
        "workers": [{"worker": 0, "pid": 1, "started": 0.0, "active": 0,
                     "accepted": accepted, "restarts": 0}],
        "drains": [],
    }


def test_first_snapshot_has_no_rates_and_the_next_has_them_per_second():
    t = live.RateTracker()
    first = t.update(snap(100.0, [backend("a", total=10, bytes_in=1000, failed=1)], 10))
    assert first["interval"] is None
    assert first["backends"][0]["rates"] is None and first["workers"][0]["rates"] is None
    second = t.update(snap(102.0, [backend("a", total=30, bytes_in=5000, bytes_out=200,
                                           failed=3)], 30))
    assert second["interval"] == 2.0
    assert second["backends"][0]["rates"] == {"new_s": 10.0, "bytes_in_s": 2000.0,
                                              "bytes_out_s": 100.0, "errors_s": 1.0,
                                              "closes_s": 10.0}
    assert second["listeners"][0]["rates"] == {"accepted_s": 10.0}
    assert second["workers"][0]["rates"] == {"accepted_s": 10.0}
    for s in (first, second):
        jsonschema.validate(s, SCHEMA)


def test_a_shared_trackers_snapshot_right_after_a_sample_reuses_its_rates():
    t = live.RateTracker(live.MIN_RATE_INTERVAL)
    t.update(snap(100.0, [backend("a", total=0)]))
    t.update(snap(101.0, [backend("a", total=5)]))
    quick = t.update(snap(101.0 + live.MIN_RATE_INTERVAL / 2, [backend("a", total=500)]))
    assert quick["backends"][0]["rates"]["new_s"] == 5.0
    later = t.update(snap(102.0, [backend("a", total=505)]))
    assert later["backends"][0]["rates"]["new_s"] == 500.0     # measured from 101.0


def test_a_counter_that_went_back_gives_no_negative_rate_and_a_new_backend_none():
    t = live.RateTracker()
    t.update(snap(100.0, [backend("a", total=50)]))
    s = t.update(snap(101.0, [backend("a", total=3), backend("b", total=9)]))
    assert s["backends"][0]["rates"]["new_s"] == 0.0
    assert s["backends"][1]["rates"] is None


def test_a_drain_shows_remaining_falling_to_zero_with_an_eta_from_the_close_rate():
    t = live.RateTracker()
    s = t.update(snap(100.0, [backend("a", state="draining", active=10, total=10)]))
    assert s["drains"] == [{"pool": "main", "backend": "a", "set_by": None, "remaining": 10,
                            "closes_s": None, "eta_s": None, "drained": False}]
    s = t.update(snap(101.0, [backend("a", state="draining", active=8, total=10)]))
    assert s["drains"][0]["closes_s"] == 2.0 and s["drains"][0]["eta_s"] == 4.0
    # a quiet second halves the smoothed rate instead of making the ETA unknown
    s = t.update(snap(102.0, [backend("a", state="draining", active=8, total=10)]))
    assert s["drains"][0]["closes_s"] == 1.0 and s["drains"][0]["eta_s"] == 8.0
    s = t.update(snap(103.0, [backend("a", state="draining", active=0, total=10)]))
    assert s["drains"][0] == {"pool": "main", "backend": "a", "set_by": None,
                              "remaining": 0, "closes_s": 4.5, "eta_s": 0.0, "drained": True}
    assert live.format_eta(s["drains"][0]) == "done"
    jsonschema.validate(s, SCHEMA)
    s = t.update(snap(104.0, [backend("a", state="up", active=0, total=10)]))
    assert s["drains"] == []


@pytest.mark.parametrize("value, text", [
    (None, "-"), (0, "0"), (7, "7"), (2.5, "2.5"), (3.0, "3"), (12345, "12.3k"),
    (2_500_000, "2.5M"), (3e9, "3.0G")])
def test_counts_are_written_short(value, text):
    assert live.format_count(value) == text


@pytest.mark.parametrize("value, text", [
    (None, "-"), (0, "0B"), (1023, "1023B"), (1536, "1.5K"), (5 << 20, "5.0M"), (3 << 30, "3.0G")])
def test_bytes_are_written_in_binary_units(value, text):
    assert live.format_bytes(value) == text


@pytest.mark.parametrize("eta, text", [(None, "?"), (4.0, "4s"), (200.0, "3m20s"), (7200.0, "2.0h")])
def test_an_eta_reads_as_a_duration(eta, text):
    assert live.format_eta({"drained": False, "eta_s": eta}) == text


def test_sparkline_scales_to_its_maximum_and_keeps_the_last_points():
    assert sparkline([0, 1, 2, 4, 8], 5) == "▁▂▃▅█"
    assert sparkline(range(100), 3) == "███" and sparkline([9, 0, 5, 10], 3) == "▁▅█"
    assert sparkline([], 5) == "" and sparkline([0, 0], 2) == "▁▁"


# --- the status page's first view ------------------------------------------------------

def test_status_page_renders_every_backend_row_with_its_figures_and_escapes_text():
    t = live.RateTracker()
    t.update(snap(100.0, [backend("a", total=1), backend("b-2", total=4)]))
    s = t.update(snap(101.0, [backend("a", active=3, total=11),
                              backend("b-2", state="draining", active=2, total=4)]))
    s["info"]["version"] = "<script>alert(1)</script>"
    page = statuspage.render_page(s).decode()
    assert page.startswith("<!DOCTYPE html>")
    assert "<script>alert(1)</script>" not in page and "&lt;script&gt;alert(1)" in page
    assert 'id="backend:main/a"' in page and 'id="backend:main/b-2"' in page
    row = page.split('id="backend:main/a"', 1)[1].split("</tr>", 1)[0]
    assert '<td class="c-active num">3</td>' in row
    assert '<td class="c-total num">11</td>' in row
    assert '<td class="c-new num">10</td>' in row
    assert 'id="drain:main/b-2"' in page
    assert "http://" not in page and "https://" not in page       # nothing from elsewhere


# --- l4lb top as state ---------------------------------------------------------------------

def frames(n_backends=3, pools=("main",)):
    t = live.RateTracker()
    out = []
    for i in range(3):
        rows = [backend(f"app{k}", pool=pools[k % len(pools)], active=k, total=10 * i + k)
                for k in range(n_backends)]
        out.append(t.update(snap(100.0 + i, rows, pools=pools)))
    return out


def draw(view, width=80, height=24) -> list[str]:
    console = Console(width=width, height=height, record=True, file=open("/dev/null", "w"),
                      color_system=None)
    console.print(view.render(width, height))
    return console.export_text().splitlines()


def test_top_draws_a_row_per_pool_and_backend_in_80x24():
    view = TopView()
    for f in frames():
        view.add_frame(f)
    lines = draw(view)
    assert len(lines) <= 24 and max(map(len, lines)) <= 80
    text = "\n".join(lines)
    assert "main (rr)" in text
    for name in ("app0", "app1", "app2"):
        assert any(name in line for line in lines), name
    assert any(line.startswith(">") and "app0" in line for line in lines)   # selected
    assert "worker 0" in text and "new/s 10" in text


def test_top_scrolls_to_keep_the_selection_on_a_small_screen():
    view = TopView()
    for f in frames(n_backends=40):
        view.add_frame(f)
    for _ in range(35):
        view.key("j")
    assert view.selected == ("main", view.rows()[35]["name"])
    lines = draw(view)
    assert len(lines) <= 24
    assert any(line.startswith(">") and f" {view.selected[1]} " in line for line in lines)


def test_top_filters_by_state_and_pool_and_sorts():
    view = TopView()
    f = frames(n_backends=4, pools=("blue", "green"))[-1]
    f["backends"][1]["state"] = "draining"
    f["backends"][2]["health"] = "failing"
    view.add_frame(f)
    assert view.filters() == ["all", "down", "draining", "pool blue", "pool green"]
    seen = {}
    for _ in range(5):
        view.key("f")
        seen[view.filter] = [b["name"] for b in view.rows()]
    assert seen == {"down": ["app2"], "draining": ["app1"], "pool blue": ["app0", "app2"],
                    "pool green": ["app1", "app3"], "all": ["app0", "app2", "app1", "app3"]}
    view.key("s")
    assert view.sort == "active"
    assert [b["name"] for b in view.rows()] == ["app2", "app0", "app3", "app1"]


def test_top_acts_on_the_selected_backend_only_after_a_yes():
    view = TopView()
    view.add_frame(frames()[-1])
    view.key("j")
    assert view.key("d") is None
    assert "drain main/app1? [y/N]" in draw(view)[-1]
    assert view.key("y") == "drain main/app1"
    assert view.key("e") is None and view.key("n") is None and view.message == "cancelled"
    assert view.key("m") is None and view.key("y") == "disable main/app1"
    for k in ("w", "1", "2", "\r"):
        assert view.key(k) is None
    assert view.key("y") == "weight main/app1 12"
    assert view.key("q") == "quit"


def test_top_keeps_its_selection_across_frames_and_when_the_backend_goes():
    view = TopView()
    fs = frames()
    view.add_frame(fs[0])
    view.key("j")
    view.add_frame(fs[1])
    assert view.selected == ("main", "app1")
    gone = copy.deepcopy(fs[2])
    gone["backends"] = [b for b in gone["backends"] if b["name"] != "app1"]
    view.add_frame(gone)
    assert view.selected == ("main", "app0")


def test_top_draws_the_drain_pane_with_remaining_and_eta():
    view = TopView()
    t = live.RateTracker()
    view.add_frame(t.update(snap(100.0, [backend("a", state="draining", active=10, total=10)])))
    view.add_frame(t.update(snap(101.0, [backend("a", state="draining", active=6, total=10)])))
    text = "\n".join(draw(view))
    assert "DRAINS" in text
    assert "main/a  remaining 6  closing 4/s  ETA 2s" in text
