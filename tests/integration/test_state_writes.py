"""The runtime state file: written off the event loop, coalesced in bursts, and a change
that could not be written says so in its reply (issue 20 item 12)."""
import asyncio
import json
import tomllib

import pytest

from l4lb.balancer import Balancer
from l4lb.config import parse_config
from l4lb.control.server import ControlServer

from ..support import ask, name_handler, simple_config

BACKENDS = 10
COMMANDS_PER_BACKEND = 20



def test_a_burst_of_weight_commands_is_written_in_far_fewer_writes(tmp_path):
    """200 `weight` commands, pipelined 20 per control connection on 10 connections:
    every reply is ok, the writes are far fewer than the commands (counted at the
    writer, no clock involved), and the file holds each backend's last weight."""
    text = simple_config([(f"b{i}", f"127.0.0.1:{9000 + i}") for i in range(BACKENDS)],
                         access=False)
    config = parse_config(text, tmp_path / "l4lb.toml")
    config.control.socket = tmp_path / "l4lb.sock"

    async def main():
        balancer = Balancer(config, asyncio.get_running_loop())
        control = ControlServer(balancer, config.control.socket, 0o600)
        await control.start()
        try:
            async def pipeline(i):
                reader, writer = await asyncio.open_unix_connection(str(config.control.socket))
                writer.write(b"".join(f"weight main/b{i} {w}\n".encode()
                                      for w in range(1, COMMANDS_PER_BACKEND + 1)))
                await writer.drain()
                replies = [json.loads(await reader.readline())
                           for _ in range(COMMANDS_PER_BACKEND)]
                writer.close()
                return replies

            replies = await asyncio.wait_for(
                asyncio.gather(*(pipeline(i) for i in range(BACKENDS))), 60)
            await balancer.state_writer.flush()
            return replies, balancer.state_writer.writes
        finally:
            control.close()

    replies, writes = asyncio.run(main())
    assert all(r["ok"] and "warning" not in r for per in replies for r in per)
    assert 1 <= writes <= BACKENDS * COMMANDS_PER_BACKEND // 4
    saved = tomllib.loads((tmp_path / "l4lb.state.toml").read_text())
    assert {ref: entry["weight"] for ref, entry in saved["backends"].items()} == {
        f"main/b{i}": COMMANDS_PER_BACKEND for i in range(BACKENDS)}


@pytest.mark.timeout(60)
def test_change_that_cannot_be_saved_replies_ok_with_a_warning(backends, l4lb, tmp_path):
    a = backends(name_handler, name="a")
    (tmp_path / "l4lb.state.toml").mkdir()             # the path is a directory
    lb = l4lb(simple_config([("a", a.address)]))
    reply = ask(lb, "disable main/a")
    assert reply["ok"] is True and reply["state"] == "maint"
    assert "not saved" in reply["warning"] and "restart" in reply["warning"]
    assert lb.wait_event("state_file_not_saved")
    reply = ask(lb, "weight main/a 3")
    assert reply["ok"] is True and "warning" in reply
    assert "warning" not in ask(lb, "show backends")   # reads never warn
