"""The supervisor (ingestor.workers): its sockets, restarts and workers' directory."""

from __future__ import annotations

import ctypes
import os
import shutil
import socket
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from ingestor.config import Settings
from ingestor.workers import _sibling_directory, _worker_sockets, restart_pause


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


@pytest.fixture
def short_tmp(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A temporary directory short enough for Unix sockets (pytest's may not be),
    as TMPDIR."""
    where = Path(tempfile.mkdtemp(prefix="sib-", dir="/tmp"))
    monkeypatch.setattr(tempfile, "tempdir", str(where))
    yield where
    shutil.rmtree(where, ignore_errors=True)


def test_a_supervisor_removes_the_worker_directories_dead_supervisors_left(
    short_tmp: Path,
) -> None:
    """A supervisor killed with SIGKILL (or by the OOM killer) leaves its
    workers' directory of sockets behind: one for each crash, for ever. The
    next supervisor removes those whose supervisor is gone, and nothing else."""
    tmp_path = short_tmp
    gone = subprocess.Popen(["true"])
    gone.wait()  # a pid nobody has now (reaped)
    stale = tmp_path / f"ingestor-{gone.pid}-k2x_9abc"
    stale.mkdir()
    (stale / "worker-0.sock").touch()
    running = tmp_path / f"ingestor-{os.getppid()}-q7w3e4r5"  # a live supervisor's
    running.mkdir()
    unrelated = [tmp_path / "ingestor-notes", tmp_path / f"other-{gone.pid}-k2x_9abc"]
    for path in unrelated:
        path.mkdir()
    made = Path(_sibling_directory())
    assert not stale.exists()
    assert running.is_dir()
    assert all(path.is_dir() for path in unrelated)
    assert made.parent == tmp_path
    assert made.name.startswith(f"ingestor-{os.getpid()}-")
    # Its own is not taken for a dead one's by the next supervisor of this process.
    again = Path(_sibling_directory())
    assert made.is_dir()
    assert again != made


class _Exited(Exception):
    pass


def test_a_single_process_stopped_and_continued_is_not_taken_for_stuck(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The watchdog of a process alone (`run_alone`), and the whole process
    stopped for 10 s (SIGSTOP, a paused container), the timeout 3 s: once
    continued, the watchdog may run before the event loop beats again. It
    must see its own sleep took 10 s, give the loop a whole timeout from
    then, and exit only once the loop has stayed silent that long after."""
    from ingestor import workers

    ticks = iter([0.0, 1.0, 11.0, 12.0, 13.0, 14.0, 15.0, 16.0])  # each look at the clock
    now = [0.0]

    def monotonic() -> float:
        now[0] = next(ticks)
        return now[0]

    def exit_(code: int) -> None:
        raise _Exited(code, now[0])

    monkeypatch.setattr(workers.os, "_exit", exit_)
    monkeypatch.setattr(workers.faulthandler, "dump_traceback", lambda **kwargs: None)
    monkeypatch.setattr(workers, "_BEAT", 0.001)
    heart = ctypes.c_double(0.0)  # the loop's last beat, at 0: none after the stop
    with pytest.raises(_Exited) as exited:
        workers._watch_alone(heart, 3.0, threading.Event(), monotonic)
    assert exited.value.args == (70, 15.0)  # 4 s after the stop ended, not at once (11)
