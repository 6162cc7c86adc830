"""The worker against the live belt and the sources' health: rejects timed by the encoder, not
by the frames judged; late verdicts missed; a source down while its producer lives; a source
that fails."""

from __future__ import annotations

import time

import numpy as np

from camera_sources.encoder import ManualEncoder
from edge.reject import RejectTiming
from edge.worker import SourceSetup


def gray(value: int = 90) -> np.ndarray:
    return np.full((64, 64, 3), value, np.uint8)


def test_worker_fires_a_pending_reject_when_the_belt_arrives_though_no_frame_is_judged(
        worker_rig, wait_until):
    belt = ManualEncoder(0)
    rig = worker_rig([("cam", "every_frame", 8)], threshold=0.0,       # every frame a defect
                     scheduler_kw={"default_timing": RejectTiming(500, tolerance_counts=50),
                                   "encoders": {"cam": belt}})
    rig.worker.scheduler.start()
    rig.start()
    push = rig.push("cam")
    push.frame(0, gray(), encoder=1000, part_id=10)
    assert wait_until(lambda: rig.worker.stats.frames == 1)
    time.sleep(0.1)
    assert rig.sink.events == []                # the part has not reached the ejector yet
    belt.set(1510)                              # the belt moves; no further frame arrives
    assert wait_until(lambda: len(rig.sink.events) == 1, 2.0)
    assert rig.sink.events[0].part_id == 10 and rig.sink.events[0].fired_position == 1510
    push.eos(0)
    rig.join()


def test_worker_reports_missed_and_fires_nothing_when_the_part_passed_before_its_verdict(
        worker_rig, wait_until):
    belt = ManualEncoder(5000)                  # far past the frame's ejector point (1500)
    rig = worker_rig([("cam", "every_frame", 8)], threshold=0.0,
                     scheduler_kw={"default_timing": RejectTiming(500, tolerance_counts=50),
                                   "encoders": {"cam": belt}}).start()
    push = rig.push("cam")
    push.frame(0, gray(), encoder=1000, part_id=10)
    push.eos(0)
    rig.join()
    c = rig.worker.counters()
    assert c["defects"] == 1 and c["rejects"] == 0 and c["missed_rejects"] == 1
    assert rig.sink.events == [] and [a.kind for a in rig.sink.alarms] == ["missed_reject"]


def test_worker_raises_source_down_while_heartbeats_come_and_clears_it_when_frames_return(
        worker_rig, wait_until):
    setup = SourceSetup("cam", "tcp://127.0.0.1:*", max_frame_gap_s=0.5)
    rig = worker_rig([setup], heartbeat_timeout_s=5).start()
    push = rig.push("cam")
    push.frame(0, gray())
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:          # the producer lives, the camera delivers nothing
        push.heartbeat(seq=0)
        time.sleep(0.1)
    assert rig.worker.down_sources == {"cam"}
    assert rig.worker.counters()["silent_sources"] == []        # alive, just blind
    assert [a.kind for a in rig.sink.alarms] == ["source_down"]
    assert "producer is alive" in rig.sink.alarms[0].message
    push.frame(1, gray())
    assert wait_until(lambda: rig.worker.down_sources == set())
    push.eos(1)
    rig.join()
    assert len(rig.sink.alarms) == 1            # raised once, not once per check


def test_worker_marks_a_source_failed_and_alarms_when_its_stream_ends_in_an_error(worker_rig):
    rig = worker_rig([("cam", "every_frame", 8)]).start()
    push = rig.push("cam")
    push.frame(0, gray())
    push.eos(0, reason="source error: VideoReadError: video 'x.avi' unreadable from frame 1")
    rig.join()
    assert rig.worker.failed_sources == {
        "cam": "source error: VideoReadError: video 'x.avi' unreadable from frame 1"}
    assert [a.kind for a in rig.sink.alarms] == ["source_failed"]
