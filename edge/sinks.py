"""Reject sinks: where a reject signal goes (a log file, a ZeroMQ message, a Modbus coil, a
GPIO line), and where an alarm goes when the line cannot do its job.

The contract is small: ``fire(event)`` pushes the part off the belt (or records that it
should be), ``alarm(alarm)`` tells people something is wrong (a missed reject, a camera
down), ``close()``. A sink raises on failure; the scheduler logs it, counts it, and fires
the other sinks anyway. :class:`FakeSink` is the real in-memory sink beside them for tests.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import zmq

from edge.results import Alarm

if TYPE_CHECKING:
    from edge.reject import RejectEvent

logger = logging.getLogger(__name__)


class RejectSinkError(RuntimeError):
    """A sink could not be set up or could not fire."""


class RejectSink(ABC):
    """Somewhere a reject goes. ``fire`` raises RejectSinkError (or anything) on failure."""

    name: str = "sink"

    @abstractmethod
    def fire(self, event: RejectEvent) -> None: ...

    def alarm(self, alarm: Alarm) -> None:
        """Raise an alarm where this sink reaches people or a PLC. Default: nowhere (an
        ejector output is no place for it); the scheduler logs every alarm anyway."""

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
        self._append(json.dumps({**event.to_dict(), "fired_at": time.time()}, sort_keys=True))

    def alarm(self, alarm: Alarm) -> None:
        self._append(json.dumps({"alarm": alarm.to_dict()}, sort_keys=True))

    def _append(self, line: str) -> None:
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

    def alarm(self, alarm: Alarm) -> None:
        # Its own topic: a PLC gateway subscribed to rejects never mistakes an alarm for one.
        with self._lock:
            self._socket.send_multipart([b"alarm", json.dumps(alarm.to_dict()).encode()])

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
                 alarm_coil: int | None = None, name: str = "modbus") -> None:
        try:
            from pymodbus.client import ModbusTcpClient
        except ImportError as exc:
            raise RejectSinkError(
                "ModbusCoilSink needs pymodbus, which is not installed; "
                "pip install 'grad-edge[modbus]'"
            ) from exc
        self.name = name
        self.host, self.port, self.unit, self.coil = host, port, unit, coil
        self.alarm_coil = alarm_coil   # latched on by an alarm; a person resets it on the PLC
        self._client = ModbusTcpClient(host, port=port, timeout=timeout_s)
        # pymodbus renamed the unit keyword (slave= before 3.10, device_id= after).
        params = inspect.signature(self._client.write_coil).parameters
        self._unit_kw = "device_id" if "device_id" in params else "slave"
        self._client_lock = threading.Lock()
        self._pulse = _Pulse(f"ModbusCoilSink {host}:{port} coil {coil}",
                             pulse_ms / 1000.0, self._write)

    def fire(self, event: RejectEvent) -> None:
        self._pulse.fire()

    def alarm(self, alarm: Alarm) -> None:
        if self.alarm_coil is not None:
            self._write(True, coil=self.alarm_coil)

    def _write(self, value: bool, coil: int | None = None) -> None:
        coil = self.coil if coil is None else coil
        # One reconnect attempt: PLCs drop idle TCP connections, and the next reject must
        # not fail because of that.
        with self._client_lock:
            for attempt in (1, 2):
                try:
                    if not self._client.connected and not self._client.connect():
                        raise ConnectionError("connect failed")
                    response = self._client.write_coil(coil, value,
                                                       **{self._unit_kw: self.unit})
                    if response.isError():
                        raise RejectSinkError(f"device answered {response}")
                    return
                except Exception as exc:
                    self._client.close()
                    if attempt == 2:
                        raise RejectSinkError(
                            f"ModbusCoilSink could not write coil {coil}={value} on "
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
        if self._request is not None:        # safe to call twice
            self._request.release()
            self._request = None


class FakeSink(RejectSink):
    """An in-memory sink that records what it was sent; set ``failing`` to make it raise."""

    def __init__(self, name: str = "fake", *, failing: bool = False) -> None:
        self.name = name
        self.failing = failing
        self.events: list[RejectEvent] = []
        self.fired_at: list[float] = []
        self.alarms: list[Alarm] = []
        self.closed = False
        self._lock = threading.Lock()

    def fire(self, event: RejectEvent) -> None:
        if self.failing:
            raise RejectSinkError(f"FakeSink {self.name!r} is set to fail")
        with self._lock:
            self.events.append(event)
            self.fired_at.append(time.time())

    def alarm(self, alarm: Alarm) -> None:
        if self.failing:
            raise RejectSinkError(f"FakeSink {self.name!r} is set to fail")
        with self._lock:
            self.alarms.append(alarm)

    def close(self) -> None:
        self.closed = True


