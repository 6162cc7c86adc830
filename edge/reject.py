"""Reject signals: telling the line to push a part off the belt, at the right moment.

The camera sees a part some distance before the ejector. A reject is therefore *scheduled*:
it becomes due when the belt has moved that distance (encoder counts, when the source has an
encoder) or, without one, a fixed delay after capture. Where the belt is comes from the
belt itself (an encoder input read on its own, see :mod:`camera_sources.encoder`), never
from the frames the worker has judged: under a backlog those are seconds old.

The one rule that matters: a reject never hits the wrong part. An event fires only while its
part is at the ejector: from its due point to ``tolerance`` past it. A verdict that arrives
after its part passed is a **missed reject**: never fired, counted, logged at ERROR, raised
as an alarm on every sink, and handed to ``on_missed`` (the defect log records it with its
reason). At shutdown the belt keeps moving: pending rejects are fired when due, for up to
the drain time, and the rest are missed, never fired early.

Fired rejects go to every sink (a log line, a ZeroMQ message, a Modbus coil, a GPIO line,
see :mod:`edge.sinks`); one broken sink never stops the others, and the defect log records
which sinks fired and which failed.

Sources without a live encoder (a replay: the footage is the belt) are fed their position
from judged frames with :meth:`RejectScheduler.on_encoder`, and at the end of the footage
their pending rejects are fired, with a warning, since no real part is at stake.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from edge.results import Alarm, Decision

if TYPE_CHECKING:
    from camera_sources.encoder import EncoderInput
    from edge.sinks import RejectSink

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RejectEvent:
    """One part to reject, and when.

    At most one of ``due_encoder`` / ``due_time`` is set: the encoder count at which the part
    reaches the ejector, or the wall-clock time (seconds since the epoch) at which it does.
    With neither, no ejector geometry is known and the event is due at once.
    """

    source_id: str
    seq: int
    part_id: int | None
    encoder: int | None            # encoder count at capture
    due_encoder: int | None
    due_time: float | None
    verdict: str                   # "DEFECT" or "UNKNOWN"
    raw_score: float | None
    reason: str
    defect_id: int | None = None   # the defect log's row, when the writer gave one
    issued_at: float = field(default_factory=time.time)  # when the reject was decided
    fired_position: int | None = None  # belt count when it fired (set at firing; a PLC may
                                       # check it against due_encoder and the tolerance)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class FiredReject:
    """What happened when an event fired: the defect log stores this."""

    event: RejectEvent
    fired_at: float
    sinks_ok: tuple[str, ...]
    sinks_failed: tuple[str, ...]
    position: int | None = None    # belt count when it fired (encoder-timed events)


@dataclass(frozen=True)
class MissedReject:
    """A reject that could not be fired at its part: the part had passed the ejector (or
    the line stopped first). Never fired at another part; counted, alarmed, logged."""

    event: RejectEvent
    at: float                      # when it was found missed (time.time())
    reason: str
    position: int | None = None    # belt count then (encoder-timed events)


# --- scheduling -----------------------------------------------------------------------------


@dataclass(frozen=True)
class RejectTiming:
    """Where the ejector is, seen from one source's camera, and how exact it must be.

    ``tolerance_counts`` / ``tolerance_s``: how far past its due point the ejector still hits
    the part (about half a part's length on the belt). Past that, firing would hit the next
    part, so the reject is missed instead.
    """

    camera_to_ejector_counts: int | None = None   # encoder counts from camera to ejector
    delay_s: float = 0.0                          # used when a frame has no encoder count
    tolerance_counts: int = 0
    tolerance_s: float = 0.02

    def __post_init__(self) -> None:
        if self.camera_to_ejector_counts is not None and self.camera_to_ejector_counts < 0:
            raise ValueError("camera_to_ejector_counts must be >= 0")
        if self.delay_s < 0 or self.tolerance_counts < 0 or self.tolerance_s < 0:
            raise ValueError("reject delay and tolerances must be >= 0")


class RejectScheduler:
    """Holds rejects until their part reaches the ejector, then fires them on every sink.

    ``encoders`` maps a source id to its live :class:`~camera_sources.encoder.EncoderInput`;
    sources without one are fed from judged frames (:meth:`on_encoder`). Delay-timed events
    are due at ``due_time`` on the wall clock. :meth:`start` runs a thread that watches the
    belts every ``poll_s``; without it, :meth:`poll` does one pass (tests drive it so).
    Thread-safe: an event is taken off the pending list under the lock before it is fired
    or missed, so it is acted on exactly once.
    """

    def __init__(
        self,
        sinks: Sequence[RejectSink],
        *,
        default_timing: RejectTiming = RejectTiming(),
        per_source: Mapping[str, RejectTiming] | None = None,
        encoders: Mapping[str, EncoderInput] | None = None,
        on_fired: Callable[[FiredReject], None] | None = None,
        on_missed: Callable[[MissedReject], None] | None = None,
        on_alarm: Callable[[Alarm], None] | None = None,
        poll_s: float = 0.001,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.sinks = list(sinks)
        self.default_timing = default_timing
        self.per_source = dict(per_source or {})
        self.encoders = dict(encoders or {})
        self.on_fired = on_fired
        self.on_missed = on_missed
        self.on_alarm = on_alarm
        self.poll_s = poll_s
        self.clock = clock
        self.sink_failures: dict[str, int] = {sink.name: 0 for sink in self.sinks}
        self.alarm_failures: dict[str, int] = {sink.name: 0 for sink in self.sinks}
        self.fired_count = 0
        self.missed: dict[str, int] = {}      # source id -> missed rejects
        self._pending: list[RejectEvent] = []
        self._frame_fed: dict[str, int] = {}  # replay sources: latest judged encoder count
        self._cond = threading.Condition()    # guards _pending and _frame_fed
        self._fire_lock = threading.Lock()    # one event at a time through the sinks
        self._closed = False
        self._thread: threading.Thread | None = None

    # --- events -------------------------------------------------------------------------

    def timing(self, source_id: str) -> RejectTiming:
        return self.per_source.get(source_id, self.default_timing)

    def event_for(self, decision: Decision, *, defect_id: int | None = None) -> RejectEvent:
        """The reject for a decision, with its due point from the source's timing."""
        result = decision.result
        timing = self.timing(result.source_id)
        due_encoder = due_time = None
        if result.encoder is not None and timing.camera_to_ejector_counts is not None:
            due_encoder = result.encoder + timing.camera_to_ejector_counts
        elif timing.camera_to_ejector_counts is None and timing.delay_s > 0:
            due_time = result.wall_time + timing.delay_s
        # else no due point: either no ejector geometry is configured (the reject is a
        # signal, due at once), or an encoder-timed source's frame has no count (its encoder
        # was down at capture) and schedule() reports it missed.
        return RejectEvent(
            source_id=result.source_id, seq=result.seq, part_id=result.part_id,
            encoder=result.encoder, due_encoder=due_encoder, due_time=due_time,
            verdict=decision.verdict.value, raw_score=result.raw_score,
            reason=decision.reason, defect_id=defect_id,
        )

    @property
    def pending(self) -> int:
        with self._cond:
            return len(self._pending)

    @property
    def missed_total(self) -> int:
        return sum(self.missed.values())

    def schedule(self, event: RejectEvent) -> FiredReject | MissedReject | None:
        """Take an event: fire it now if its part is at the ejector, report it missed if the
        part has passed, else hold it until it is due (returns None then)."""
        if (event.due_encoder is None and event.due_time is None
                and event.source_id in self.encoders
                and self.timing(event.source_id).camera_to_ejector_counts is not None):
            return self._miss(event, "the frame has no encoder count (the encoder was "
                                     "unreadable at capture), so its part cannot be found")
        with self._cond:
            self._pending.append(event)
            self._cond.notify()
        acted = self.poll(only=event)
        return acted[0] if acted else None

    def on_encoder(self, source_id: str, count: int) -> list[FiredReject | MissedReject]:
        """A judged frame's count, for a source without a live encoder (a replay)."""
        if source_id in self.encoders:
            return []                  # the live encoder knows better than any frame
        with self._cond:
            self._frame_fed[source_id] = max(count, self._frame_fed.get(source_id, count))
        return self.poll()

    # --- where the belt is, and what is due ---------------------------------------------

    def position(self, source_id: str) -> int | None:
        encoder = self.encoders.get(source_id)
        if encoder is not None:
            return encoder.read()
        with self._cond:
            return self._frame_fed.get(source_id)

    def _state(self, event: RejectEvent, positions: dict, now: float) -> tuple[str, int | None]:
        """("wait" | "fire" | "miss", belt position) for one event now."""
        timing = self.timing(event.source_id)
        if event.due_encoder is not None:
            if event.source_id not in positions:
                positions[event.source_id] = self.position(event.source_id)
            pos = positions[event.source_id]
            if pos is None or pos < event.due_encoder:
                return "wait", pos
            live = event.source_id in self.encoders
            if live and pos > event.due_encoder + timing.tolerance_counts:
                return "miss", pos
            return "fire", pos
        if event.due_time is None or now >= event.due_time:
            if event.due_time is not None and now > event.due_time + timing.tolerance_s:
                return "miss", None
            return "fire", None
        return "wait", None

    def poll(self, only: RejectEvent | None = None) -> list[FiredReject | MissedReject]:
        """One pass: fire what is at the ejector, report missed what has passed it."""
        now = self.clock()
        positions: dict[str, int | None] = {}
        act: list[tuple[str, RejectEvent, int | None]] = []
        with self._cond:
            keep = []
            for event in self._pending:
                if only is not None and event is not only:
                    keep.append(event)
                    continue
                state, pos = self._state(event, positions, now)
                if state == "wait":
                    keep.append(event)
                else:
                    act.append((state, event, pos))
            self._pending = keep
        act.sort(key=lambda a: (a[1].due_encoder or 0, a[1].due_time or 0.0))
        return [self._fire(e, pos) if state == "fire" else self._miss(e, self._late(e, pos, now), pos)
                for state, e, pos in act]

    def _late(self, event: RejectEvent, pos: int | None, now: float) -> str:
        if event.due_encoder is not None:
            return (f"the part passed the ejector before its verdict could fire: the belt was "
                    f"{pos - event.due_encoder} counts past the due count {event.due_encoder} "
                    f"(tolerance {self.timing(event.source_id).tolerance_counts})")
        return (f"the part passed the ejector before its verdict could fire: "
                f"{1000 * (now - event.due_time):.0f} ms after it was due (tolerance "
                f"{1000 * self.timing(event.source_id).tolerance_s:.0f} ms)")

    # --- the watcher thread and shutdown ------------------------------------------------

    def start(self) -> RejectScheduler:
        """Watch the belts on a thread of its own, so rejects fire on time whatever the
        worker is busy with."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._watch, name="reject-scheduler",
                                            daemon=True)
            self._thread.start()
        return self

    def _watch(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait(0.1)
                if self._closed:
                    return
            try:
                self.poll()
            except Exception:          # a sink or callback bug must not stop the watcher
                logger.exception("reject scheduler pass failed; carrying on")
            time.sleep(self.poll_s)

    def drain(self, timeout_s: float) -> list[FiredReject | MissedReject]:
        """Line stopping: the belt keeps moving, so fire pending rejects as their parts
        arrive, for up to ``timeout_s``; the rest are missed (replays: fired, see above)."""
        acted: list[FiredReject | MissedReject] = []
        deadline = time.monotonic() + timeout_s
        while self.pending and time.monotonic() < deadline:
            acted += self.poll()
            time.sleep(self.poll_s)
        with self._cond:
            left, self._pending = self._pending, []
        for event in left:
            if event.source_id in self.encoders or event.due_time is not None:
                acted.append(self._miss(event, "the line stopped before the part reached the "
                                               "ejector"))
            else:
                logger.warning("end of footage: firing the reject of %s seq %s with no belt "
                               "left to wait for", event.source_id, event.seq)
                acted.append(self._fire(event, self.position(event.source_id)))
        return acted

    def close(self, drain_s: float = 0.0) -> None:
        """Drain for up to ``drain_s``, stop the watcher, then close every sink. Once."""
        if self._closed:
            return
        self.drain(drain_s)
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(5.0)
        for sink in self.sinks:
            try:
                sink.close()
            except Exception:
                logger.exception("reject sink %s failed to close", sink.name)

    # --- acting -------------------------------------------------------------------------

    def _fire(self, event: RejectEvent, position: int | None) -> FiredReject:
        if position is not None:
            event = dataclasses.replace(event, fired_position=position)
        ok: list[str] = []
        failed: list[str] = []
        with self._fire_lock:
            fired_at = self.clock()
            for sink in self.sinks:
                try:
                    sink.fire(event)
                    ok.append(sink.name)
                except Exception as exc:
                    failed.append(sink.name)
                    self.sink_failures[sink.name] = self.sink_failures.get(sink.name, 0) + 1
                    logger.error("reject sink %s failed for source %s seq %s part %s "
                                 "(defect %s): %s", sink.name, event.source_id, event.seq,
                                 event.part_id, event.defect_id, exc)
            self.fired_count += 1
        fired = FiredReject(event, fired_at, tuple(ok), tuple(failed), position)
        self._callback(self.on_fired, fired)
        return fired

    def _miss(self, event: RejectEvent, reason: str, position: int | None = None) -> MissedReject:
        missed = MissedReject(event, self.clock(), reason, position)
        with self._cond:
            self.missed[event.source_id] = self.missed.get(event.source_id, 0) + 1
        self.raise_alarm(Alarm(
            "missed_reject", f"MISSED REJECT: source {event.source_id} seq {event.seq} part "
            f"{event.part_id} ({event.verdict}, defect {event.defect_id}) was not rejected: "
            f"{reason}", source_id=event.source_id))
        self._callback(self.on_missed, missed)
        return missed

    def raise_alarm(self, alarm: Alarm) -> None:
        """Log an alarm at ERROR and hand it to every sink; a failing sink is counted."""
        logger.error("ALARM %s: %s", alarm.kind, alarm.message)
        if self.on_alarm is not None:
            try:
                self.on_alarm(alarm)
            except Exception:
                logger.exception("reject scheduler on_alarm callback failed")
        for sink in self.sinks:
            try:
                sink.alarm(alarm)
            except Exception as exc:
                self.alarm_failures[sink.name] = self.alarm_failures.get(sink.name, 0) + 1
                logger.error("reject sink %s could not raise the alarm: %s", sink.name, exc)

    def _callback(self, fn, arg) -> None:
        if fn is None:
            return
        try:
            fn(arg)
        except Exception:
            logger.exception("reject scheduler callback %s failed for source %s seq %s",
                             getattr(fn, "__name__", fn), arg.event.source_id, arg.event.seq)
