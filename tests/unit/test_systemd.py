"""conf/l4lb.service: systemd-analyze accepts it, and it says what the README promises."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from l4lb.config import GlobalConfig

from ..support import REPO

UNIT = REPO / "conf" / "l4lb.service"
INSTALLED_PATH = "/usr/local/bin/l4lb"


def unit_settings() -> dict[str, list[str]]:
    """{key: [values in order]} of the [Service] section (keys may repeat)."""
    settings: dict[str, list[str]] = {}
    section = None
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line
        elif section == "[Service]":
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


def l4lb_executable(tmp_path: Path) -> str:
    """The installed `l4lb` script, or a wrapper that runs this checkout's l4lb."""
    found = shutil.which("l4lb") or shutil.which("l4lb", path=str(Path(sys.executable).parent))
    if found:
        return found
    wrapper = tmp_path / "l4lb"
    wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} -m l4lb "$@"\n')
    wrapper.chmod(0o755)
    return str(wrapper)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze is not installed (.ci/run installs it)")
def test_systemd_analyze_verify_accepts_the_unit(tmp_path):
    # verify checks that every Exec*= binary exists: point them at a real l4lb.
    unit = tmp_path / "l4lb.service"
    unit.write_text(UNIT.read_text().replace(INSTALLED_PATH, l4lb_executable(tmp_path)))
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                            text=True, timeout=60)
    # verify exits 0 on keys it ignores ("Unknown key", "Failed to parse"): any complaint
    # about this unit counts. Lines about the machine's other units do not.
    complaints = [line for line in (result.stdout + result.stderr).splitlines()
                  if "l4lb.service" in line]
    assert result.returncode == 0 and not complaints, result.stdout + result.stderr


def test_systemd_analyze_verify_catches_a_broken_copy(tmp_path):
    """The check above is meaningful: a typo in a key is reported."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (.ci/run installs it)")
    unit = tmp_path / "l4lb.service"
    unit.write_text(UNIT.read_text().replace(INSTALLED_PATH, l4lb_executable(tmp_path))
                    .replace("ProtectHome=", "ProtectHomer="))
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                            text=True, timeout=60)
    assert "ProtectHomer" in result.stdout + result.stderr


def test_unit_runs_checks_reloads_and_stops_gracefully():
    s = unit_settings()
    # l4lb speaks sd_notify (l4lb.sdnotify): started = serving; only the master speaks.
    assert s["Type"] == ["notify"] and s["NotifyAccess"] == ["main"]
    assert s["ExecStartPre"] == [f"{INSTALLED_PATH} check -c /etc/l4lb/l4lb.toml"]
    assert s["ExecStart"] == [f"{INSTALLED_PATH} run -c /etc/l4lb/l4lb.toml"]
    assert s["ExecReload"][-1] == "/bin/kill -HUP $MAINPID"
    assert s["KillSignal"] == ["SIGTERM"]
    # systemd must not SIGKILL a balancer that is still draining.
    assert float(s["TimeoutStopSec"][0]) > GlobalConfig().shutdown_timeout + 5
    assert int(s["LimitNOFILE"][0]) >= 2 * GlobalConfig().max_connections + 100


def test_unit_hardening_still_lets_it_bind_and_keep_its_state():
    s = unit_settings()
    assert s["CapabilityBoundingSet"] == ["CAP_NET_BIND_SERVICE"]
    assert s["AmbientCapabilities"] == ["CAP_NET_BIND_SERVICE"]
    assert set(s["RestrictAddressFamilies"][0].split()) == {"AF_INET", "AF_INET6", "AF_UNIX"}
    assert s["ProtectSystem"] == ["strict"] and s["NoNewPrivileges"] == ["yes"]
    # ProtectSystem=strict leaves only StateDirectory writable: the socket and the state
    # file beside it (l4lb.state.state_path_for) go there, as the README's config says.
    assert s["StateDirectory"] == ["l4lb"]
    assert 'control.socket = "/var/lib/l4lb/l4lb.sock"' in UNIT.read_text()


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze is not installed (.ci/run installs it)")
def test_systemd_analyze_verify_accepts_the_socket_unit_with_the_service(tmp_path):
    unit = tmp_path / "l4lb.service"
    unit.write_text(UNIT.read_text().replace(INSTALLED_PATH, l4lb_executable(tmp_path)))
    sock = tmp_path / "l4lb.socket"
    sock.write_text((REPO / "conf" / "l4lb.socket").read_text())
    result = subprocess.run(["systemd-analyze", "verify", str(sock), str(unit)],
                            capture_output=True, text=True, timeout=60)
    complaints = [line for line in (result.stdout + result.stderr).splitlines()
                  if "l4lb.s" in line]
    assert result.returncode == 0 and not complaints, result.stdout + result.stderr
