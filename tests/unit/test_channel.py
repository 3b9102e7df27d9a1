"""The master <-> worker channel (l4lb.channel): messages in order, descriptors with the
message that carries them, requests matched to replies, and a peer that sends garbage or
goes away ends the channel without hurting the loop."""
import asyncio
import os
import socket

import pytest

from l4lb.channel import Channel, ChannelClosed
from l4lb.workers import describe_status


def pair(loop, on_a=None, on_b=None, closed_a=None):
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    got_a, got_b = [], []
    ca = Channel(a, loop, on_a or (lambda m, f: got_a.append((m, f))), closed_a)
    cb = Channel(b, loop, on_b or (lambda m, f: got_b.append((m, f))))
    return ca, cb, got_a, got_b


def test_messages_arrive_in_order_with_their_descriptors():
    async def main():
        loop = asyncio.get_running_loop()
        ca, cb, _, got_b = pair(loop)
        r, w = os.pipe()
        big = "x" * 500_000                           # past one socket buffer: queued
        ca.send({"n": 1})
        ca.send({"n": 2, "big": big}, [w])
        ca.send({"n": 3})
        while len(got_b) < 3:
            await asyncio.sleep(0.01)
        assert [m["n"] for m, _ in got_b] == [1, 2, 3]
        assert got_b[1][0]["big"] == big and got_b[0][1] == [] and got_b[2][1] == []
        (fd,) = got_b[1][1]
        os.write(fd, b"through the passed descriptor")
        assert os.read(r, 100) == b"through the passed descriptor"
        for x in (fd, r, w):
            os.close(x)
        ca.close()
        cb.close()

    asyncio.run(asyncio.wait_for(main(), 10))


def test_a_request_gets_the_reply_with_its_id_and_fails_when_the_peer_goes():
    async def main():
        loop = asyncio.get_running_loop()
        holder = {}

        def answer(msg, fds):
            if msg.get("op") == "double":
                holder["b"].reply(msg, value=msg["value"] * 2)

        ca, cb, _, _ = pair(loop, on_b=answer)
        holder["b"] = cb
        replies = await asyncio.gather(*(ca.request({"op": "double", "value": i})
                                         for i in range(5)))
        assert [r["value"] for r in replies] == [0, 2, 4, 6, 8]
        pending = loop.create_task(ca.request({"op": "ignored"}))
        await asyncio.sleep(0.05)
        cb.close()
        with pytest.raises(ChannelClosed):
            await pending
        assert ca.closed
        with pytest.raises(ChannelClosed):
            ca.send({"op": "late"})

    asyncio.run(asyncio.wait_for(main(), 10))


def test_garbage_from_the_peer_closes_the_channel():
    async def main():
        loop = asyncio.get_running_loop()
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        closed = asyncio.Event()
        got = []
        Channel(a, loop, lambda m, f: got.append(m), closed.set)
        b.sendall(b'{"ok": 1}\nnot json at all\n{"never": 1}\n')
        await asyncio.wait_for(closed.wait(), 5)
        assert got == [{"ok": 1}]
        b.close()

    asyncio.run(asyncio.wait_for(main(), 10))


def test_exit_statuses_in_words():
    assert describe_status(0) == "exit 0"
    assert describe_status(3) == "exit 3"
    assert describe_status(-9) == "killed by SIGKILL"
    assert describe_status(None) == "unknown"
