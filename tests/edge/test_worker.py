"""The GRAD worker in-process on real parts: a tiny checkpoint on the eager runner, real PUSH
sockets speaking the wire format, the rule engine, a reject scheduler and a SQLite defect log."""

from __future__ import annotations

import sqlite3
import threading
import time

import numpy as np
import pytest

from deploy.runner import EagerRunner
from edge.protocol import DropPolicy
from edge.worker import SourceSetup, crop, region

N_OVERLOAD = 30


class SlowRunner(EagerRunner):
    """The real eager runner, slowed down: a model slower than the line."""

    def __init__(self, path, delay_s: float):
        super().__init__(path, device="cpu")
        self.delay_s = delay_s

    def run(self, frames):
        time.sleep(self.delay_s)
        return super().run(frames)


class BrokenRunner(EagerRunner):
    """The real runner whose device fails on every batch."""

    def run(self, frames):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")


class CountingRunner(SlowRunner):
    """The real eager runner on its background thread (overlap=True), slowed down, noting the
    most batches ever submitted and not yet collected."""

    def __init__(self, path, delay_s: float):
        EagerRunner.__init__(self, path, device="cpu", overlap=True)
        self.delay_s = delay_s
        self.in_flight = self.max_in_flight = 0

    def submit(self, frames):
        pending = super().submit(frames)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        wait = pending.result

        def result():
            out = wait()
            self.in_flight -= 1
            return out
        pending.result = result
        return pending


def gray(value: int = 90, size: tuple[int, int] = (64, 64)) -> np.ndarray:
    return np.full((*size, 3), value, np.uint8)


# --- drop policies under overload --------------------------------------------------------------

def overload_latest_source(tiny_checkpoint, worker_rig):
    """N_OVERLOAD frames at once into a `latest` queue of 1 before a slow model; then EOS."""
    rig = worker_rig([("cam", "latest", 1)], runner=SlowRunner(tiny_checkpoint, 0.1),
                     max_batch=1, max_wait_ms=0).start()
    push = rig.push("cam")
    for seq in range(N_OVERLOAD):
        push.frame(seq, gray(seq))
    push.eos(N_OVERLOAD - 1)
    rig.join(timeout=30)
    return rig


def test_worker_drops_and_counts_when_latest_source_is_overloaded(tiny_checkpoint, worker_rig):
    rig = overload_latest_source(tiny_checkpoint, worker_rig)

    c = rig.worker.counters()
    seqs = [r["seq"] for r in rig.results_rows()]
    assert c["dropped"] > 0
    assert c["frames"] == len(seqs) < N_OVERLOAD
    assert c["frames"] + c["dropped"] == N_OVERLOAD
    assert seqs == sorted(seqs)              # the oldest go, the order stays


def test_worker_judges_the_newest_frame_when_latest_source_ends_while_overloaded(
        tiny_checkpoint, worker_rig):
    rig = overload_latest_source(tiny_checkpoint, worker_rig)
    assert N_OVERLOAD - 1 in [r["seq"] for r in rig.results_rows()]


def test_worker_loses_no_frame_and_blocks_the_producer_when_every_frame_source_is_overloaded(
        tiny_checkpoint, worker_rig, short_dir):
    # ipc (a unix socket, as the line uses): the kernel buffers far less than on loopback TCP.
    setup = SourceSetup("cam", f"ipc://{short_dir}/cam.sock", DropPolicy.EVERY_FRAME, 1)
    rig = worker_rig([setup], runner=SlowRunner(tiny_checkpoint, 0.05),
                     max_batch=1, max_wait_ms=0).start()
    # Frames big enough (192 KiB) that the kernel's socket buffers hold only a couple.
    big = np.full((256, 256, 3), 77, np.uint8)
    frames_when_sent = []

    def produce():
        push = rig.push("cam", sndhwm=1)
        for seq in range(N_OVERLOAD):
            push.frame(seq, big)
        frames_when_sent.append(rig.worker.stats.frames)
        push.eos(N_OVERLOAD - 1)

    producer = threading.Thread(target=produce)
    producer.start()
    rig.join(timeout=60)
    producer.join(5)

    c = rig.worker.counters()
    assert c["dropped"] == 0
    assert sorted(r["seq"] for r in rig.results_rows()) == list(range(N_OVERLOAD))
    # The producer could not run ahead: when its last send returned, the worker had already
    # judged most frames (only socket buffers and the 1-frame queue sit in between).
    assert frames_when_sent and frames_when_sent[0] >= N_OVERLOAD - 12


# --- overlapping runners: batch k+1 computes while batch k is judged --------------------------

def blob_frame(seq: int) -> np.ndarray:
    frame = gray(60 + 4 * seq)
    frame[8 + seq:20 + seq, 10:24] = 230       # every frame different, some with a bright blob
    return frame


def test_worker_judges_every_frame_in_order_with_eager_scores_when_the_runner_overlaps(
        tiny_checkpoint, eager_runner, worker_rig):
    runner = CountingRunner(tiny_checkpoint, 0.03)
    rig = worker_rig([("cam", "every_frame", 64)], runner=runner, max_batch=2,
                     max_wait_ms=0).start()
    push = rig.push("cam")
    n = 12
    for seq in range(n):
        push.frame(seq, blob_frame(seq))
    push.eos(n - 1)
    rig.join(timeout=30)
    runner.close()

    rows = rig.results_rows()
    assert [r["seq"] for r in rows] == list(range(n))          # judged in arrival order
    expected = [float(eager_runner.run(blob_frame(seq)[None]).scores[0]) for seq in range(n)]
    np.testing.assert_allclose([r["raw_score"] for r in rows], expected, rtol=1e-5)
    # The point of overlapping: a batch was handed over while the one before was not judged.
    assert runner.max_in_flight == 2
    assert runner.in_flight == 0                                  # every batch collected


def test_worker_gives_unknown_when_an_overlapping_runner_fails_on_its_thread(tiny_checkpoint,
                                                                             worker_rig):
    class BrokenOnThread(EagerRunner):
        def run(self, frames):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

    runner = BrokenOnThread(tiny_checkpoint, overlap=True)
    rig = worker_rig([("cam", "every_frame", 8)], runner=runner, max_batch=2).start()
    push = rig.push("cam")
    for seq in range(4):
        push.frame(seq, gray())
    push.eos(3)
    rig.join(timeout=10)
    runner.close()
    rows = rig.results_rows()
    assert [(r["seq"], r["verdict"]) for r in rows] == [(i, "UNKNOWN") for i in range(4)]
    assert all("illegal memory access" in r["error"] for r in rows)


# --- end of stream, corrupt messages, silent sources ------------------------------------------

def test_worker_run_returns_only_when_every_source_sent_end_of_stream(worker_rig):
    rig = worker_rig([("a", "every_frame", 4), ("b", "every_frame", 4)]).start()
    a, b = rig.push("a"), rig.push("b")
    for seq in range(3):
        a.frame(seq, gray())
        b.frame(seq, gray(120))
    a.eos(2)
    time.sleep(0.6)
    assert rig.thread.is_alive(), "run() ended while source b had not ended"
    b.eos(2)
    rig.join(timeout=10)
    assert rig.stats.frames == 6
    assert sorted((r["source_id"], r["seq"]) for r in rig.results_rows()) == [
        (s, i) for s in "ab" for i in range(3)]


def test_worker_counts_a_corrupt_message_and_keeps_running_when_a_header_is_bad(worker_rig):
    rig = worker_rig([("cam", "every_frame", 4)]).start()
    push = rig.push("cam")
    push.frame(0, gray())
    push.raw([b"\xc1 definitely not msgpack", b"pixels"])
    push.frame(1, gray())
    push.eos(1)
    rig.join(timeout=10)
    c = rig.worker.counters()
    assert c["corrupt"] == 1
    assert c["frames"] == 2
    assert [r["seq"] for r in rig.results_rows()] == [0, 1]


def test_worker_reports_a_silent_source_when_no_heartbeat_comes_within_the_timeout(
        worker_rig, wait_until):
    rig = worker_rig([("alive", "every_frame", 4), ("quiet", "every_frame", 4)],
                     heartbeat_timeout_s=0.3).start()
    alive = rig.push("alive")
    stop = threading.Event()

    def beat():
        while not stop.is_set():
            alive.heartbeat()
            stop.wait(0.05)

    beater = threading.Thread(target=beat)
    beater.start()
    try:
        assert wait_until(lambda: rig.worker.counters()["silent_sources"] == ["quiet"], 5.0), \
            rig.worker.counters()["silent_sources"]
        time.sleep(0.4)   # well past the timeout: the beating source is still not silent
        assert rig.worker.counters()["silent_sources"] == ["quiet"]
        # A silent source that speaks again is no longer reported.
        quiet = rig.push("quiet")
        quiet.heartbeat()
        assert wait_until(lambda: rig.worker.counters()["silent_sources"] == [], 5.0)
    finally:
        stop.set()
        beater.join()
    alive.eos(-1)
    quiet.eos(-1)
    rig.join(timeout=10)


# --- fail-safe verdicts ----------------------------------------------------------------------

def test_worker_rejects_and_logs_unknown_when_the_runner_raises(tiny_checkpoint, worker_rig):
    rig = worker_rig([("cam", "every_frame", 4)], runner=BrokenRunner(tiny_checkpoint)).start()
    push = rig.push("cam")
    for seq in range(3):
        push.frame(seq, gray())
    push.eos(2)
    rig.join(timeout=10)
    rig.writer.stop()

    rows = rig.results_rows()
    assert [r["verdict"] for r in rows] == ["UNKNOWN"] * 3
    assert all(r["reject"] and "model failed" in r["error"] for r in rows)
    assert sorted(e.seq for e in rig.sink.events) == [0, 1, 2]
    assert rig.worker.counters()["unknown"] == 3
    db = sqlite3.connect(rig.db)
    logged = db.execute("SELECT seq, verdict, reason, raw_score FROM defects ORDER BY seq").fetchall()
    assert [(s, v, score) for s, v, _, score in logged] == [(i, "UNKNOWN", None) for i in range(3)]
    assert all("fail-safe reject" in reason for _, _, reason, _ in logged)
    fired = db.execute("SELECT defect_id, sinks_ok FROM reject_events").fetchall()
    assert len(fired) == 3 and all("fake" in ok for _, ok in fired)


def test_worker_gives_unknown_when_results_come_after_the_latency_budget(worker_rig):
    rig = worker_rig([("cam", "every_frame", 4)], threshold=1e9,
                     latency_budget_ms=0.001).start()
    push = rig.push("cam")
    for seq in range(2):
        push.frame(seq, gray())
    push.eos(1)
    rig.join(timeout=10)
    rows = rig.results_rows()
    assert [r["verdict"] for r in rows] == ["UNKNOWN", "UNKNOWN"]
    assert all(r["late"] and r["raw_score"] is not None for r in rows)
    assert all("latency budget" in r["reason"] and r["reject"] for r in rows)
    assert len(rig.sink.events) == 2


def test_worker_passes_ok_frames_when_results_are_within_a_generous_latency_budget(worker_rig):
    rig = worker_rig([("cam", "every_frame", 4)], threshold=1e9,
                     latency_budget_ms=60_000).start()
    push = rig.push("cam")
    push.frame(0, gray())
    push.eos(0)
    rig.join(timeout=10)
    (row,) = rig.results_rows()
    assert row["verdict"] == "OK" and not row["late"] and not row["reject"]
    assert rig.sink.events == []


# --- ROI crop ----------------------------------------------------------------------------------

ROI = [40, 30, 104, 94]            # 64 x 64: the model sees the crop at its own size


def blob(x: int, y: int) -> np.ndarray:
    image = np.full((128, 128, 3), 60, np.uint8)
    image[y:y + 10, x:x + 10] = 255
    return image


def test_worker_scores_only_the_roi_when_a_blob_lies_outside_or_inside_it(
        eager_runner, worker_rig):
    # Threshold below any map value: the whole crop is "above", so the box is the ROI itself.
    rig = worker_rig([("cam", "every_frame", 4, ROI)], threshold=-1e9, max_batch=1).start()
    push = rig.push("cam")
    push.frame(0, np.full((128, 128, 3), 60, np.uint8))  # plain belt
    push.frame(1, blob(110, 5))                    # blob outside the ROI
    push.frame(2, blob(60, 50))                    # blob inside the ROI
    push.eos(2)
    rig.join(timeout=10)
    plain, outside, inside = sorted(rig.results_rows(), key=lambda r: r["seq"])

    assert outside["raw_score"] == pytest.approx(plain["raw_score"], rel=1e-6)
    assert inside["raw_score"] != pytest.approx(plain["raw_score"], rel=1e-3)
    # Box and area in frame pixels: the ROI's own rectangle, offset by its origin.
    assert tuple(inside["box"]) == tuple(ROI)
    assert inside["area_px"] == 64 * 64
    # The peak is the map's argmax on the crop, shifted by the ROI origin.
    c, _ = crop(blob(60, 50), ROI)
    amap = eager_runner.run(np.ascontiguousarray(c)[None]).maps[0]
    r, col = np.unravel_index(int(np.argmax(amap)), amap.shape)
    assert tuple(inside["peak_xy"]) == (ROI[0] + int(col), ROI[1] + int(r))


def test_worker_maps_box_to_the_roi_in_frame_pixels_when_the_roi_is_not_square(worker_rig):
    roi = [10, 20, 106, 68]        # 96 wide, 48 high: resized to 64 x 64 for the model
    rig = worker_rig([("cam", "every_frame", 4, roi)], threshold=-1e9).start()
    push = rig.push("cam")
    push.frame(0, blob(50, 40))
    push.eos(0)
    rig.join(timeout=10)
    (row,) = rig.results_rows()
    assert tuple(row["box"]) == tuple(roi)
    assert row["area_px"] == 96 * 48
    x, y = row["peak_xy"]
    assert roi[0] <= x < roi[2] and roi[1] <= y < roi[3]


# --- region / crop geometry --------------------------------------------------------------------

def hand_map() -> np.ndarray:
    amap = np.zeros((8, 8), np.float32)
    amap[2:4, 4:7] = 1.0           # rows 2-3, columns 4-6
    amap[2, 5] = 2.0               # the peak
    return amap


def test_region_gives_box_area_and_peak_in_map_cells_when_crop_is_map_sized_without_offset():
    peak, box, area = region(hand_map(), 0.5, (8, 8), (0, 0))
    assert peak == (5, 2)
    assert box == (4, 2, 7, 4)
    assert area == 6


def test_region_scales_to_frame_pixels_when_the_crop_is_not_square():
    # Crop 16 high, 32 wide over an 8 x 8 map: a cell is 2 pixels high and 4 wide.
    peak, box, area = region(hand_map(), 0.5, (16, 32), (0, 0))
    assert box == (16, 4, 28, 8)
    assert area == 6 * 2 * 4
    assert peak == (int(5.5 * 4), int(2.5 * 2))


def test_region_shifts_by_the_roi_origin_when_given_an_offset():
    peak, box, area = region(hand_map(), 0.5, (16, 32), (100, 50))
    assert box == (116, 54, 128, 58)
    assert peak == (100 + 22, 50 + 5)
    assert area == 48


def test_region_has_no_box_and_no_area_when_nothing_reaches_the_threshold():
    peak, box, area = region(hand_map(), 5.0, (8, 8), (3, 4))
    assert box is None and area == 0
    assert peak == (3 + 5, 4 + 2)


def test_crop_makes_three_channels_when_the_frame_is_gray():
    image = np.arange(12 * 10, dtype=np.uint8).reshape(12, 10)
    out, offset = crop(image, None)
    assert out.shape == (12, 10, 3) and offset == (0, 0)
    assert (out[..., 0] == image).all() and (out[..., 2] == image).all()


def test_crop_returns_a_view_and_its_origin_when_given_a_roi():
    image = np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8)
    out, offset = crop(image, [5, 7, 25, 17])
    assert out.shape == (10, 20, 3) and offset == (5, 7)
    assert np.shares_memory(out, image)
    assert (out == image[7:17, 5:25]).all()


def test_crop_crops_a_gray_frame_after_making_it_three_channels_when_given_a_roi():
    image = np.arange(20 * 30, dtype=np.uint16).reshape(20, 30).astype(np.uint8)
    out, offset = crop(image, [3, 4, 13, 9])
    assert out.shape == (5, 10, 3) and offset == (3, 4)
    assert (out[..., 1] == image[4:9, 3:13]).all()
