"""Kernel behaviour the raw-socket relay relies on, checked on the machine that runs it."""
import socket


def test_accepted_sockets_inherit_tcp_nodelay_from_the_listener():
    # SpliceServer sets TCP_NODELAY once on the listening socket instead of once per
    # accepted connection (ext/l4lb/splice.pxi).
    with socket.socket() as listener:
        listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        with socket.create_connection(listener.getsockname(), timeout=5):
            conn, _ = listener.accept()
            with conn:
                assert conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    with socket.socket() as plain:                   # and without it, no inheritance
        plain.bind(("127.0.0.1", 0))
        plain.listen()
        with socket.create_connection(plain.getsockname(), timeout=5):
            conn, _ = plain.accept()
            with conn:
                assert conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0
