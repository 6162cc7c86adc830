"""The conveyor encoder: where the belt is *now*, read on its own.

A reject must hit the part the camera saw, so it is timed against the belt itself, not
against the frames the worker has judged: under a backlog those are seconds old, and a
scheduler fed by them would believe the belt is where the oldest queued frame was. An
encoder input is read directly, by the producer when it stamps a frame and by the reject
scheduler when it decides whether a part has reached the ejector.

The contract is one method, :meth:`EncoderInput.read`: the current count, or None when the
belt position is not known (a simulated belt that has not started, a PLC that does not
answer). Counts only grow; a hardware counter that wraps is unwrapped here.

- :class:`SimulatedBelt`: a belt moving at a constant speed from a start moment shared by
  every process on the host (``CLOCK_MONOTONIC`` and a shared integer). The synthetic line,
  paced videos and folders run on one; its position is a pure function of time, so a
  producer that dies and restarts finds the belt where it really is.
- :class:`ModbusEncoder`: a 32-bit counter in two holding registers of a PLC or counter
  module (pymodbus), unwrapped.
- :class:`ManualEncoder`: the fake beside them, a count set by hand (shared across processes),
  for tests and for lines where something else moves the belt.

:class:`EncoderSpec` names one as plain data, so it travels into a producer process.
"""

from __future__ import annotations

import abc
import inspect
import logging
import multiprocessing
import threading
import time
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)


class EncoderError(RuntimeError):
    """An encoder input that cannot be set up."""


class EncoderInput(abc.ABC):
    """Something that says where the belt is now, in encoder counts."""

    @abc.abstractmethod
    def read(self) -> int | None:
        """The current count, or None when the position is not known."""

    def close(self) -> None:
        """Release the device; safe to call twice."""


def _shared_int(value: int = 0, ctx=None):
    """An int shared by a parent and the processes it spawns (passed in Process args)."""
    return (ctx or multiprocessing.get_context("spawn")).Value("q", value, lock=False)


class SimulatedBelt(EncoderInput):
    """A belt at ``counts_per_s`` from the moment :meth:`start` was first called.

    The start moment (``time.monotonic_ns()``) lives in shared memory: the parent makes the
    belt, hands it to the producer process, the producer starts it when its camera is ready,
    and the worker reads the same position. Monotonic time is per host, so both must run on
    one host (remote cameras use a real encoder).
    """

    def __init__(self, counts_per_s: float, *, ctx=None, _start_ns=None):
        if counts_per_s <= 0:
            raise EncoderError(f"a simulated belt needs counts_per_s > 0, got {counts_per_s}")
        self.counts_per_s = float(counts_per_s)
        self._start_ns = _start_ns if _start_ns is not None else _shared_int(0, ctx)

    def __reduce__(self):
        return (_rebuild_belt, (self.counts_per_s, self._start_ns))

    def start(self, now_ns: int | None = None) -> int:
        """Start the belt now unless it is already moving; returns its start moment."""
        if self._start_ns.value == 0:
            self._start_ns.value = now_ns or time.monotonic_ns()
        return self._start_ns.value

    @property
    def started(self) -> bool:
        return self._start_ns.value != 0

    def read(self) -> int | None:
        start = self._start_ns.value
        if start == 0:
            return None
        return int((time.monotonic_ns() - start) * self.counts_per_s / 1e9)

    def time_at(self, count: int) -> int:
        """The ``monotonic_ns`` at which the belt reaches ``count`` (it must be started)."""
        return self._start_ns.value + int(count * 1e9 / self.counts_per_s)


def _rebuild_belt(counts_per_s, start_ns):
    return SimulatedBelt(counts_per_s, _start_ns=start_ns)


class ManualEncoder(EncoderInput):
    """A count set by hand with :meth:`set` (shared with spawned processes); the fake."""

    def __init__(self, count: int | None = None, *, ctx=None, _value=None):
        self._value = _value if _value is not None else _shared_int(-1, ctx)
        if count is not None:
            self.set(count)

    def __reduce__(self):
        return (_rebuild_manual, (self._value,))

    def set(self, count: int) -> None:
        if count < 0:
            raise ValueError(f"encoder counts are >= 0, got {count}")
        self._value.value = count

    def advance(self, counts: int) -> int:
        self.set(max(self._value.value, 0) + counts)
        return self._value.value

    def read(self) -> int | None:
        value = self._value.value
        return None if value < 0 else value


def _rebuild_manual(value):
    return ManualEncoder(_value=value)


class ModbusEncoder(EncoderInput):
    """A 32-bit counter in two holding registers (high word first unless ``word_order``
    says "low"), read over Modbus TCP. Counters wrap at 2**32; reads are unwrapped so counts
    only grow. A failed read returns None (logged once per outage), never a stale count.
    """

    def __init__(self, host: str, port: int = 502, unit: int = 1, register: int = 0,
                 word_order: str = "high", timeout_s: float = 0.5):
        try:
            from pymodbus.client import ModbusTcpClient
        except ImportError as exc:
            raise EncoderError("ModbusEncoder needs pymodbus, which is not installed; "
                               "pip install 'grad-edge[modbus]'") from exc
        if word_order not in ("high", "low"):
            raise EncoderError(f"word_order must be 'high' or 'low', got {word_order!r}")
        self.host, self.port, self.unit, self.register = host, port, unit, register
        self.word_order = word_order
        self._client = ModbusTcpClient(host, port=port, timeout=timeout_s)
        params = inspect.signature(self._client.read_holding_registers).parameters
        self._unit_kw = "device_id" if "device_id" in params else "slave"
        self._lock = threading.Lock()
        self._last_raw: int | None = None
        self._wraps = 0
        self._failing = False

    def read(self) -> int | None:
        with self._lock:
            try:
                if not self._client.connected and not self._client.connect():
                    raise ConnectionError("connect failed")
                response = self._client.read_holding_registers(
                    self.register, count=2, **{self._unit_kw: self.unit})
                if response.isError():
                    raise EncoderError(f"device answered {response}")
            except Exception as exc:
                self._client.close()
                if not self._failing:
                    logger.error("encoder %s:%s register %d unreadable: %s; rejects timed by "
                                 "it wait (and are missed if it stays down)", self.host,
                                 self.port, self.register, exc)
                self._failing = True
                return None
            if self._failing:
                logger.warning("encoder %s:%s readable again", self.host, self.port)
                self._failing = False
            hi, lo = response.registers[:2]
            if self.word_order == "low":
                hi, lo = lo, hi
            raw = (hi << 16) | lo
            if self._last_raw is not None and raw < self._last_raw - (1 << 31):
                self._wraps += 1                    # the counter went past 2**32 - 1
            self._last_raw = raw
            return raw + (self._wraps << 32)

    def close(self) -> None:
        with self._lock:
            self._client.close()


# --------------------------------------------------------------------------- spec


ENCODER_KINDS = {"simulated": SimulatedBelt, "modbus": ModbusEncoder, "manual": ManualEncoder}


@dataclass(frozen=True)
class EncoderSpec:
    """Which encoder input to build, as plain data: ``EncoderSpec("modbus", {"host": ...})``."""

    kind: str
    options: dict[str, Any] = field(default_factory=dict)

    def build(self) -> EncoderInput:
        if self.kind not in ENCODER_KINDS:
            raise EncoderError(f"unknown encoder kind {self.kind!r}; choose one of "
                               f"{sorted(ENCODER_KINDS)}")
        return ENCODER_KINDS[self.kind](**self.options)
