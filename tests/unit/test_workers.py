"""The supervisor's listening sockets (ingestor.workers)."""

from __future__ import annotations

import socket

from ingestor.config import Settings
from ingestor.workers import _worker_sockets, restart_pause


def test_each_worker_gets_its_own_socket_on_the_one_port_the_kernel_chose() -> None:
    every = _worker_sockets(Settings(bind="127.0.0.1:0", workers=3))
    socks = [sock for sockets in every for sock in sockets.insecure_sockets]
    try:
        assert len(socks) == 3
        assert len({sock.fileno() for sock in socks}) == 3
        ports = {sock.getsockname()[1] for sock in socks}
        assert len(ports) == 1
        assert 0 not in ports
        for sock in socks:
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
        # Listening already: a connection made before any worker runs is queued.
        with socket.create_connection(("127.0.0.1", ports.pop()), timeout=5):
            pass
    finally:
        for sock in socks:
            sock.close()


def test_a_worker_that_keeps_dying_at_start_is_restarted_less_and_less_often() -> None:
    pauses = [0.0]
    for _ in range(8):
        pauses.append(restart_pause(pauses[-1], lived=2.0))
    assert pauses[1:] == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
    # One that served a while and then died starts over from the first pause.
    assert restart_pause(30.0, lived=600.0) == 1.0
    assert restart_pause(30.0, lived=59.0) == 30.0
