"""The producer supervisor with real producer processes and a real worker inbox: a producer
that finished its stream is not taken for a dead one while its end-of-stream waits for a
worker that is behind, and a killed one still is."""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading

import numpy as np
import pytest

from camera_sources.base import SourceSpec
from edge import protocol
from edge.inbox import Inbox
from edge.protocol import DropPolicy
from edge.supervisor import ProducerSupervisor

RUN = "supervisorrun0001"
spawn = multiprocessing.get_context("spawn")


@pytest.fixture
def behind(ctx, short_dir):
    """A worker's inbox that is bound (frames queue in ZeroMQ) but reads nothing: a worker
    that is behind. Yields (inbox, supervisor); each test adds its producer."""
    inbox = Inbox(ctx, "belt", protocol.default_endpoint("src-belt", short_dir),
                  DropPolicy.EVERY_FRAME, 16, threading.Event(), run_id=RUN)
    supervisor = ProducerSupervisor(spawn, spawn.Event(), run_id=RUN)
    yield inbox, supervisor
    supervisor.stop()


def test_a_finished_producer_is_not_restarted_while_its_end_of_stream_waits_to_be_read(behind):
    # The producer sends its 3 frames and its end-of-stream, drains 0.2 s and exits 0. Seen
    # on a starved 2-core machine (verdicts 8-30 s late): such a producer was taken for dead,
    # with an alarm and a restart that would give its finished belt a second life.
    inbox, supervisor = behind
    images = [np.full((48, 64, 3), i, np.uint8) for i in range(3)]
    supervisor.add(SourceSpec("fake", "belt", {"images": images}), inbox.endpoint,
                   DropPolicy.EVERY_FRAME, restartable=True, eos_drain_s=0.2)
    supervisor.start_all()
    state = supervisor.producers["belt"]
    state.proc.join(60)
    assert state.proc.exitcode == 0 and state.captured.value == 3
    assert inbox.end is None and not inbox.stats.ended            # nothing read yet

    assert supervisor.check({"belt": inbox}) == []
    assert (state.restart_at, state.restarts, state.deaths) == (None, 0, [])


def test_a_killed_producer_is_restarted_while_its_worker_is_behind(behind):
    inbox, supervisor = behind
    images = [np.full((48, 64, 3), i, np.uint8) for i in range(3)]
    # hold_open: the stream stays open after the last frame, like a camera with no parts.
    supervisor.add(SourceSpec("fake", "belt", {"images": images, "hold_open": True}),
                   inbox.endpoint, DropPolicy.EVERY_FRAME, restartable=True)
    supervisor.start_all()
    state = supervisor.producers["belt"]
    first = state.proc
    os.kill(first.pid, signal.SIGKILL)
    first.join(30)

    events = supervisor.check({"belt": inbox})
    assert [sid for sid, _ in events] == ["belt"] and "exit code -9" in events[0][1]
    assert state.restart_at is not None and len(state.deaths) == 1
