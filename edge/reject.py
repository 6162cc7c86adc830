"""Reject signals: telling the line to push a part off the belt, at the right moment.

The camera sees a part some distance before the ejector. A reject is therefore *scheduled*:
it becomes due when the conveyor has moved that distance (encoder counts, when the source
has an encoder) or, without an encoder, after a fixed delay. When due it fires on every sink
(a log line, a ZeroMQ message, a Modbus coil, a GPIO line); one broken sink must never stop
the others, and the defect log records which sinks fired and which failed.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import os
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import zmq

from edge.results import Decision

logger = logging.getLogger(__name__)


class RejectSinkError(RuntimeError):
    """A sink could not be set up or could not fire."""


@dataclass(frozen=True)
class RejectEvent:
    """One part to reject, and when.

    Exactly one of ``due_encoder`` / ``due_time`` is normally set: the encoder count at which
    the part reaches the ejector, or the wall-clock time (seconds since the epoch) at which it
    does. With neither, the event is due at once.
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

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class FiredReject:
    """What happened when an event fired: the defect log stores this."""

    event: RejectEvent
    fired_at: float
    sinks_ok: tuple[str, ...]
    sinks_failed: tuple[str, ...]


# --- sinks --------------------------------------------------------------------------------


class RejectSink(ABC):
    """Somewhere a reject goes. ``fire`` raises RejectSinkError (or anything) on failure."""

    name: str = "sink"

    @abstractmethod
    def fire(self, event: RejectEvent) -> None: ...

    def close(self) -> None:
        """Release the sink's resources; safe to call twice."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class JsonlSink(RejectSink):
    """Appends one JSON line per reject to a file: the audit trail that needs no network."""

    def __init__(self, path: str | os.PathLike, name: str = "jsonl") -> None:
        self.name = name
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")
        self._lock = threading.Lock()

    def fire(self, event: RejectEvent) -> None:
        line = json.dumps({**event.to_dict(), "fired_at": time.time()}, sort_keys=True)
        with self._lock:
            if self._file.closed:
                raise RejectSinkError(f"JsonlSink {self.path} is closed")
            self._file.write(line + "\n")
            # fsync: a reject that was fired must survive a power cut right after it.
            self._file.flush()
            os.fsync(self._file.fileno())

    def close(self) -> None:
        with self._lock:
            self._file.close()


class ZmqPubSink(RejectSink):
    """Publishes rejects as multipart [topic, json] on a bound PUB socket.

    Bind to ``tcp://127.0.0.1:<port>`` (or ``:*`` for a free port, see ``.endpoint``) or
    ``ipc://...``; PLC gateways and dashboards subscribe to the topic.
    """

    def __init__(self, endpoint: str, topic: bytes = b"reject", *,
                 context: zmq.Context | None = None, name: str = "zmq") -> None:
        self.name = name
        self.topic = topic
        self._context = context or zmq.Context.instance()
        self._socket = self._context.socket(zmq.PUB)
        # Let queued messages go out for a moment at close, but never hang the shutdown.
        self._socket.setsockopt(zmq.LINGER, 500)
        try:
            self._socket.bind(endpoint)
        except zmq.ZMQError as exc:
            self._socket.close(0)
            raise RejectSinkError(
                f"ZmqPubSink cannot bind {endpoint!r}: {exc}; is another process using it? "
                "Use tcp://127.0.0.1:<free port> or an ipc:// path"
            ) from exc
        self.endpoint = self._socket.getsockopt(zmq.LAST_ENDPOINT).decode()
        self._lock = threading.Lock()   # zmq sockets are not thread-safe

    def fire(self, event: RejectEvent) -> None:
        payload = json.dumps({**event.to_dict(), "fired_at": time.time()}).encode()
        with self._lock:
            self._socket.send_multipart([self.topic, payload])

    def close(self) -> None:
        with self._lock:
            if not self._socket.closed:
                self._socket.close()


class _Pulse:
    """Turns an output on now and off again after `pulse_s`, without blocking the caller.

    A new pulse while one is on extends it. ``switch(on)`` must raise on failure.
    """

    def __init__(self, name: str, pulse_s: float, switch: Callable[[bool], None]) -> None:
        self._name = name
        self._pulse_s = pulse_s
        self._switch = switch
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None

    def fire(self) -> None:
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
            try:
                self._switch(True)
            finally:
                # Even when switching on failed, an earlier pulse may have left it on.
                self._timer = threading.Timer(self._pulse_s, self._off)
                self._timer.daemon = True
                self._timer.start()

    def _off(self) -> None:
        with self._lock:
            self._timer = None
            try:
                self._switch(False)
            except Exception:
                # An ejector held on would push every following part off the belt.
                logger.critical("%s: could not switch the reject output off after the pulse; "
                                "the output may be stuck ON — check the device", self._name,
                                exc_info=True)

    def close(self) -> None:
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
                try:
                    self._switch(False)
                except Exception:
                    logger.critical("%s: could not switch the reject output off at close",
                                    self._name, exc_info=True)


class ModbusCoilSink(RejectSink):
    """Pulses a coil on a Modbus TCP device (a PLC or a remote I/O block)."""

    def __init__(self, host: str, port: int = 502, unit: int = 1, coil: int = 0,
                 pulse_ms: float = 100.0, *, timeout_s: float = 1.0,
                 name: str = "modbus") -> None:
        try:
            from pymodbus.client import ModbusTcpClient
        except ImportError as exc:
            raise RejectSinkError(
                "ModbusCoilSink needs pymodbus, which is not installed; "
                "pip install 'grad-edge[modbus]'"
            ) from exc
        self.name = name
        self.host, self.port, self.unit, self.coil = host, port, unit, coil
        self._client = ModbusTcpClient(host, port=port, timeout=timeout_s)
        # pymodbus renamed the unit keyword (slave= before 3.10, device_id= after).
        params = inspect.signature(self._client.write_coil).parameters
        self._unit_kw = "device_id" if "device_id" in params else "slave"
        self._client_lock = threading.Lock()
        self._pulse = _Pulse(f"ModbusCoilSink {host}:{port} coil {coil}",
                             pulse_ms / 1000.0, self._write)

    def fire(self, event: RejectEvent) -> None:
        self._pulse.fire()

    def _write(self, value: bool) -> None:
        # One reconnect attempt: PLCs drop idle TCP connections, and the next reject must
        # not fail because of that.
        with self._client_lock:
            for attempt in (1, 2):
                try:
                    if not self._client.connected and not self._client.connect():
                        raise ConnectionError("connect failed")
                    response = self._client.write_coil(self.coil, value,
                                                       **{self._unit_kw: self.unit})
                    if response.isError():
                        raise RejectSinkError(f"device answered {response}")
                    return
                except Exception as exc:
                    self._client.close()
                    if attempt == 2:
                        raise RejectSinkError(
                            f"ModbusCoilSink could not write coil {self.coil}={value} on "
                            f"{self.host}:{self.port} unit {self.unit}: {exc}; check the "
                            "device is reachable and the unit id and coil address"
                        ) from exc
                    logger.warning("ModbusCoilSink %s:%s: %s; reconnecting", self.host,
                                   self.port, exc)

    def close(self) -> None:
        self._pulse.close()
        with self._client_lock:
            self._client.close()


class GpioSink(RejectSink):
    """Pulses a GPIO line through libgpiod (v2 Python bindings)."""

    def __init__(self, chip: str = "/dev/gpiochip0", line: int = 0, pulse_ms: float = 100.0,
                 *, active_low: bool = False, name: str = "gpio") -> None:
        try:
            import gpiod
            from gpiod.line import Direction, Value
        except ImportError as exc:
            raise RejectSinkError(
                "GpioSink needs the gpiod package (libgpiod v2 bindings), which is not "
                "installed; pip install 'grad-edge[gpio]'"
            ) from exc
        if not Path(chip).exists():
            raise RejectSinkError(
                f"GpioSink: GPIO chip {chip!r} does not exist on this machine; list the "
                "chips with `gpiodetect` (or ls /dev/gpiochip*) and set the right one"
            )
        self.name = name
        self._values = (Value.INACTIVE, Value.ACTIVE)
        self._line = line
        try:
            self._request = gpiod.request_lines(
                chip, consumer="grad-edge-reject",
                config={line: gpiod.LineSettings(direction=Direction.OUTPUT,
                                                 active_low=active_low,
                                                 output_value=Value.INACTIVE)},
            )
        except OSError as exc:
            raise RejectSinkError(
                f"GpioSink cannot claim line {line} on {chip}: {exc}; is it used by another "
                "process, and may this user open the chip (group gpio)?"
            ) from exc
        self._pulse = _Pulse(f"GpioSink {chip} line {line}", pulse_ms / 1000.0, self._write)

    def fire(self, event: RejectEvent) -> None:
        self._pulse.fire()

    def _write(self, value: bool) -> None:
        self._request.set_value(self._line, self._values[int(value)])

    def close(self) -> None:
        self._pulse.close()
        self._request.release()


class FakeSink(RejectSink):
    """An in-memory sink that records what it was sent; set ``failing`` to make it raise."""

    def __init__(self, name: str = "fake", *, failing: bool = False) -> None:
        self.name = name
        self.failing = failing
        self.events: list[RejectEvent] = []
        self.fired_at: list[float] = []
        self.closed = False
        self._lock = threading.Lock()

    def fire(self, event: RejectEvent) -> None:
        if self.failing:
            raise RejectSinkError(f"FakeSink {self.name!r} is set to fail")
        with self._lock:
            self.events.append(event)
            self.fired_at.append(time.time())

    def close(self) -> None:
        self.closed = True


# --- scheduling -----------------------------------------------------------------------------


def _without(events: list[RejectEvent], gone: list[RejectEvent]) -> list[RejectEvent]:
    # By identity: two rejects for the same part are still two rejects.
    gone_ids = {id(e) for e in gone}
    return [e for e in events if id(e) not in gone_ids]


@dataclass(frozen=True)
class RejectTiming:
    """Where the ejector is, seen from one source's camera."""

    camera_to_ejector_counts: int | None = None   # encoder counts from camera to ejector
    delay_s: float = 0.0                          # used when a frame has no encoder count


class RejectScheduler:
    """Holds rejects until their part reaches the ejector, then fires them on every sink.

    Encoder-timed events become due when the source's latest encoder count (fed with
    :meth:`on_encoder`) reaches ``due_encoder``; time-based ones when :meth:`poll` is called
    at or after ``due_time``. Thread-safe; sinks are fired one event at a time.
    """

    def __init__(
        self,
        sinks: Sequence[RejectSink],
        *,
        default_timing: RejectTiming = RejectTiming(),
        per_source: Mapping[str, RejectTiming] | None = None,
        on_fired: Callable[[RejectEvent, list[str], list[str]], None] | None = None,
    ) -> None:
        self.sinks = list(sinks)
        self.default_timing = default_timing
        self.per_source = dict(per_source or {})
        self.on_fired = on_fired
        self.sink_failures: dict[str, int] = {sink.name: 0 for sink in self.sinks}
        self.fired_count = 0
        self._encoder_pending: list[RejectEvent] = []
        self._time_pending: list[RejectEvent] = []
        self._latest_encoder: dict[str, int] = {}
        self._lock = threading.Lock()        # guards the pending lists
        self._fire_lock = threading.Lock()   # one event at a time through the sinks

    def event_for(self, decision: Decision, *, defect_id: int | None = None) -> RejectEvent:
        """The reject for a decision, with its due point from the source's timing."""
        result = decision.result
        timing = self.per_source.get(result.source_id, self.default_timing)
        due_encoder = due_time = None
        if result.encoder is not None and timing.camera_to_ejector_counts is not None:
            due_encoder = result.encoder + timing.camera_to_ejector_counts
        else:
            due_time = result.wall_time + timing.delay_s
        return RejectEvent(
            source_id=result.source_id, seq=result.seq, part_id=result.part_id,
            encoder=result.encoder, due_encoder=due_encoder, due_time=due_time,
            verdict=decision.verdict.value, raw_score=result.raw_score,
            reason=decision.reason, defect_id=defect_id,
        )

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._encoder_pending) + len(self._time_pending)

    def schedule(self, event: RejectEvent, now: float | None = None) -> list[FiredReject]:
        """Queue an event; fires it at once if it is already due."""
        with self._lock:
            if event.due_encoder is not None:
                self._encoder_pending.append(event)
            else:
                self._time_pending.append(event)
            latest = self._latest_encoder.get(event.source_id)
        if event.due_encoder is None:
            return self.poll(now)
        if latest is not None:
            return self.on_encoder(event.source_id, latest)
        return []

    def on_encoder(self, source_id: str, count: int) -> list[FiredReject]:
        """The conveyor under `source_id` is at `count`: fire what has reached the ejector."""
        with self._lock:
            self._latest_encoder[source_id] = count
            due = [e for e in self._encoder_pending
                   if e.source_id == source_id and e.due_encoder <= count]
            self._encoder_pending = _without(self._encoder_pending, due)
        return [self._fire(e) for e in sorted(due, key=lambda e: e.due_encoder)]

    def poll(self, now: float | None = None) -> list[FiredReject]:
        """Fire the time-based events due at `now` (wall-clock seconds, default now)."""
        now = time.time() if now is None else now
        with self._lock:
            due = [e for e in self._time_pending if e.due_time is None or e.due_time <= now]
            self._time_pending = _without(self._time_pending, due)
        return [self._fire(e) for e in sorted(due, key=lambda e: e.due_time or 0.0)]

    def flush(self) -> list[FiredReject]:
        """End of stream: fire everything still pending — those parts are still on the belt."""
        with self._lock:
            due = self._encoder_pending + self._time_pending
            self._encoder_pending, self._time_pending = [], []
        if due:
            logger.warning("reject scheduler flush: firing %d pending reject(s) early at end "
                           "of stream (sources: %s)", len(due),
                           ", ".join(sorted({e.source_id for e in due})))
        return [self._fire(e) for e in due]

    def close(self) -> None:
        """Flush, then close every sink."""
        self.flush()
        for sink in self.sinks:
            try:
                sink.close()
            except Exception:
                logger.exception("reject sink %s failed to close", sink.name)

    def _fire(self, event: RejectEvent) -> FiredReject:
        ok: list[str] = []
        failed: list[str] = []
        with self._fire_lock:
            fired_at = time.time()
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
        if self.on_fired is not None:
            try:
                self.on_fired(event, ok, failed)
            except Exception:
                logger.exception("reject on_fired callback failed for source %s seq %s",
                                 event.source_id, event.seq)
        return FiredReject(event, fired_at, tuple(ok), tuple(failed))
