"""The shared-memory frame ring: for a producer on the worker's host, the pixels stay in memory
both processes map and ZeroMQ carries only the header (``edge.protocol``, *Frame ring*).

  RingWriter    the producer's side: makes the ring on its first frame (an anonymous,
                sealed memory file), offers it to the worker over a unix socket, copies
                each frame into a free slot and takes slots back as the worker frees them.
  RingReceiver  the worker's side, one per source: listens beside the source's ipc socket,
                maps the rings it is offered read-only, turns a ring_frame header into a
                Frame whose image is a view on its slot, and frees the slot when nothing
                holds that view any more (judged, dropped, or left at stop).

Nothing is ever named in /dev/shm: the memory is a ``memfd`` whose descriptor travels over
the unix socket (``SCM_RIGHTS``), so it lives exactly as long as one of the two processes
maps it, and a SIGKILL of either leaves nothing behind. The slot goes back when the last
view on it dies (a ``weakref.finalize`` on the array that owns the view): a slot is never
rewritten while the model, a queue or the defect log may still read its pixels.
"""

from __future__ import annotations

import array
import fcntl
import logging
import mmap
import os
import select
import socket
import stat
import threading
import time
import weakref
from dataclasses import dataclass, field

import numpy as np

from edge import protocol
from edge.protocol import Frame, ProtocolError, RingFrame, RingOffer, RingReply

log = logging.getLogger(__name__)

_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
_PAGE = mmap.PAGESIZE


# --- the producer's side -----------------------------------------------------------------------

class RingWriter:
    """One producer's frame ring. ``put`` returns the header to send for a frame -- copying
    its pixels into a free slot, unless the source captured it straight into one (``lend``)
    -- or None when the frame must go the plain way (the ring was refused, the worker went
    away, the frame is larger than a slot).

    ``lend(shape)`` (from the source's thread) hands out a free slot as a writable array: a
    source that captures into it (a camera decoding into the buffer it is given) sends its
    frame with no copy at all. A lent slot not sent (dropped by a latest queue, left at
    stop) comes back when its array dies; lending never waits.

    ``path`` is :func:`edge.protocol.ring_path` of the source's endpoint. The ring is made on
    the first frame, with slots of that frame's size (rounded up to a page). The worker
    answers the offer from its inbox thread, which may be waiting for queue room first
    (backpressure): hence the long ``offer_timeout_s``.
    """

    def __init__(self, path: str, source_id: str, run_id: str, slots: int = 8,
                 offer_timeout_s: float = 30.0):
        if not 1 <= slots <= protocol.MAX_RING_SLOTS:
            raise ValueError(f"a frame ring has 1-{protocol.MAX_RING_SLOTS} slots, got {slots}")
        self.path = path
        self.source_id = source_id
        self.run_id = run_id
        self.slots = slots
        self.offer_timeout_s = offer_timeout_s
        self.token = protocol.new_run_id()
        self.slot_bytes = 0
        self.state = "new"          # new -> open -> gone (worker left) | refused
        self.sent_in_ring = 0       # frames that went through the ring
        self.lent_sent = 0          # of them, captured straight into their slot (no copy)
        self._free: list[int] = []
        self._lent: dict[int, int] = {}    # slot -> lending, for slots lent and not sent yet
        self._lendings = 0
        self._lock = threading.RLock()     # the source's thread lends, the sender frees
        self._base = 0                     # address of the mapping, to know a lent slot
        self._mm: mmap.mmap | None = None
        self._sock: socket.socket | None = None

    @property
    def usable(self) -> bool:
        return self.state in ("new", "open")

    def _open(self, nbytes: int) -> bool:
        self.slot_bytes = -(-nbytes // _PAGE) * _PAGE
        size = self.slots * self.slot_bytes
        try:
            fd = os.memfd_create(f"grad-edge-ring-{self.source_id}",
                                 os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        except OSError as exc:
            return self._refused(f"no shared memory for a frame ring: {exc}")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            # Every page now: memory that runs out later would be a SIGBUS mid-frame.
            os.posix_fallocate(fd, 0, size)
            # Sealed: neither side can shrink it under the other's mapping (a SIGBUS too).
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS | fcntl.F_SEAL_SEAL)
            self._mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            sock.settimeout(self.offer_timeout_s)
            sock.connect(self.path)
            offer = RingOffer(self.source_id, self.token, self.slots, self.slot_bytes,
                              run_id=self.run_id)
            sock.sendmsg(protocol.encode(offer),
                         [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])
            reply = protocol.decode([sock.recv(protocol.MAX_HEADER_BYTES)],
                                    expect=protocol.RING_REPLY_KINDS)
        except (OSError, ProtocolError) as exc:
            sock.close()
            return self._refused(f"the frame ring could not be offered at {self.path}: {exc}")
        finally:
            os.close(fd)      # the mappings (this one, the worker's) keep the memory
        if reply.error:
            sock.close()
            return self._refused(f"the worker refused the frame ring: {reply.error}")
        sock.setblocking(False)
        self._sock = sock
        probe = np.frombuffer(self._mm, np.uint8, 1)
        self._base = probe.__array_interface__["data"][0]
        del probe
        with self._lock:
            self._free = list(range(self.slots))
            self.state = "open"
        log.info("source %s: frame ring of %d x %d bytes in shared memory", self.source_id,
                 self.slots, self.slot_bytes)
        return True

    def _refused(self, why: str) -> bool:
        log.warning("source %s: %s; its frames go in the messages instead", self.source_id, why)
        self.state = "refused"
        self._unmap()
        return False

    def _gone(self) -> None:
        log.warning("source %s: the worker closed the frame ring; its frames go in the "
                    "messages from now on", self.source_id)
        with self._lock:
            self.state = "gone"
        if self._sock is not None:
            self._sock.close()
        self._unmap()

    def _unmap(self) -> None:
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:
                pass          # lent slots still hold views: the last one to go unmaps it
            self._mm = None

    def _take_releases(self) -> None:
        # From the sender (before a copy) and the source's thread (before lending a slot).
        with self._lock:
            while self._sock is not None and self.state == "open":
                try:
                    data = self._sock.recv(4096)
                except (BlockingIOError, InterruptedError):
                    return
                except OSError:
                    data = b""
                if not data:
                    self._gone()
                    return
                for (slot,) in protocol.RING_RELEASE.iter_unpack(data[:len(data) // 4 * 4]):
                    if slot < self.slots and slot not in self._free and slot not in self._lent:
                        self._free.append(slot)

    def lend(self, shape: tuple[int, ...], wait_s: float = 0.0) -> np.ndarray | None:
        """A free slot as a writable uint8 array of ``shape``, or None (no ring yet, too
        large, or no slot came free within ``wait_s``): the source then captures into an
        array of its own."""
        nbytes = int(np.prod(shape))
        deadline = time.monotonic() + wait_s
        while True:
            with self._lock:
                if self.state != "open" or nbytes > self.slot_bytes:
                    return None
                if not self._free:
                    self._take_releases()
                if self._free:
                    slot = self._free.pop(0)
                    self._lendings += 1
                    lending = self._lent[slot] = self._lendings
                    mm = self._mm
                    break
                sock = self._sock
            left = deadline - time.monotonic()
            if left <= 0 or sock is None:
                return None
            _wait_readable(sock, min(left, 0.05))
        owner = np.frombuffer(mm, np.uint8, nbytes, slot * self.slot_bytes)
        # Every view of the frame keeps `owner` alive: when the last goes unsent, the slot
        # is free again. By lending, not slot: once sent, the slot may come back and be lent
        # anew before this frame's last view dies, and that must not free it.
        back = weakref.finalize(owner, self._unlend, slot, lending)
        back.atexit = False
        return owner.reshape(shape)

    def _unlend(self, slot: int, lending: int) -> None:
        with self._lock:
            if self._lent.get(slot) == lending:      # still lent by that lending: unsent
                del self._lent[slot]
                if self.state == "open":
                    self._free.append(slot)

    def _lent_slot(self, image: np.ndarray) -> int | None:
        """The slot ``image`` was captured into, when it is a lent slot not yet sent."""
        if not image.flags.c_contiguous or not self._lent:
            return None
        offset = image.__array_interface__["data"][0] - self._base
        slot, rest = divmod(offset, self.slot_bytes)
        if rest or not 0 <= slot < self.slots or image.nbytes > self.slot_bytes:
            return None
        with self._lock:
            if slot not in self._lent:
                return None
            del self._lent[slot]              # with the worker from now on
        return slot

    def put(self, frame: Frame) -> RingFrame | None:
        """The header that sends ``frame`` through the ring: as it lies when the source
        captured it into a lent slot, else copied into a free slot. None: send it the plain
        way -- no ring, too large, or every slot is with the worker (which never waits here:
        a slot lent to a frame queued behind this one could otherwise never come back;
        ZeroMQ's high-water marks hold the producer back as for any plain frame)."""
        image = frame.image
        if self.state == "new" and not self._open(image.nbytes):
            return None
        if not self.usable or image.nbytes > self.slot_bytes:
            return None
        slot = self._lent_slot(image)
        if slot is None:              # captured elsewhere: copy it into a free slot
            with self._lock:
                self._take_releases()
                if self.state != "open" or not self._free:
                    return None
                slot = self._free.pop(0)
            dst = np.frombuffer(self._mm, np.uint8, image.nbytes, slot * self.slot_bytes)
            np.copyto(dst.reshape(image.shape), image)
            del dst
        else:
            self.lent_sent += 1
        self.sent_in_ring += 1
        return RingFrame(frame.source_id, frame.seq, frame.wall_time, frame.mono_ns,
                         tuple(image.shape), ring=self.token, slot=slot,
                         part_id=frame.part_id, encoder=frame.encoder, truth=frame.truth)

    def unused(self, header: RingFrame) -> None:
        """The header of ``put`` was never sent: its slot is free again."""
        with self._lock:
            if self.state == "open":
                self._free.insert(0, header.slot)
                self.sent_in_ring -= 1

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
        self._unmap()
        self.state = "gone" if self.state == "open" else self.state


def _wait_readable(sock: socket.socket, timeout_s: float) -> None:
    select.select([sock], [], [], timeout_s)


# --- the worker's side -------------------------------------------------------------------------

@dataclass
class RingStats:
    offered: int = 0             # rings offered by producers
    refused: int = 0             # offers refused (wrong run or source, unsealed, bad size)
    frames: int = 0              # frames mapped from a ring
    released: int = 0            # slots given back


# A ring whose producer has gone still maps frames that were on their way when it went (its
# last headers may be read after its unix connection closed): it is forgotten this long after.
_GONE_GRACE_S = 5.0


@dataclass(eq=False)
class _Ring:
    token: str
    source_id: str
    slots: int
    slot_bytes: int
    mm: mmap.mmap
    conn: socket.socket
    stats: RingStats
    view: memoryview = field(init=False)
    busy: set = field(default_factory=set)
    closed: bool = False
    closed_at: float = 0.0
    lock: threading.RLock = field(default_factory=threading.RLock)

    def __post_init__(self) -> None:
        self.view = memoryview(self.mm)

    def release(self, slot: int) -> None:
        # Called from whichever thread let go of the frame's last view (the worker after
        # judging, an inbox whose latest queue dropped it, the collector): never blocks.
        with self.lock:
            self.busy.discard(slot)
            self.stats.released += 1
            if self.closed:
                return
            try:
                self.conn.send(protocol.RING_RELEASE.pack(slot), socket.MSG_DONTWAIT)
            except OSError:
                pass          # the producer is gone (or far behind reading): nothing to free


class RingReceiver:
    """The worker's end of one source's frame rings (see the module docstring).

    Its sockets are read by the inbox thread: ``fds()`` lists what to poll, ``ready(fd)``
    handles one. ``frame(header)`` maps a ring_frame to a Frame, or raises ProtocolError
    (unknown ring, slot out of range or still held, frame larger than a slot).
    """

    def __init__(self, path: str, source_id: str, run_id: str | None = None):
        self.path = path
        self.source_id = source_id
        self.run_id = run_id
        self.stats = RingStats()
        self.rings: dict[str, _Ring] = {}
        self._conns: dict[int, tuple[socket.socket, _Ring | None]] = {}
        _remove_stale(path)
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self._listener.bind(path)
            os.chmod(path, 0o600)
            self._listener.listen(8)
        except OSError as exc:
            self._listener.close()
            raise ValueError(f"cannot listen for frame rings at {path}: {exc}") from None
        self._listener.setblocking(False)

    def fds(self) -> list[int]:
        return [self._listener.fileno(), *self._conns]

    def ready(self, fd: int) -> None:
        if fd == self._listener.fileno():
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            conn.setblocking(False)
            self._conns[conn.fileno()] = (conn, None)
            return
        conn, ring = self._conns.get(fd, (None, None))
        if conn is None:
            return
        if ring is None:
            self._offer(conn)
            return
        try:
            data = conn.recv(64)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:      # the producer is gone: its ring lives while its frames do
            self._drop(conn, ring)

    def _offer(self, conn: socket.socket) -> None:
        fds: list[int] = []
        try:
            msg, anc, _, _ = conn.recvmsg(protocol.MAX_HEADER_BYTES,
                                          socket.CMSG_SPACE(4 * array.array("i").itemsize))
            for level, kind, data in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds += array.array("i", data[:len(data) // 4 * 4]).tolist()
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            msg = b""
        try:
            if not msg:
                self._close_conn(conn)
                return
            self.stats.offered += 1
            offer = None
            try:
                offer = protocol.decode([msg], expect=protocol.RING_OFFER_KINDS)
                ring = self._map(offer, fds, conn)
            except (ProtocolError, ValueError, OSError) as exc:
                self.stats.refused += 1
                log.warning("source %s: refused a frame ring: %s", self.source_id, exc)
                token = offer.ring if offer is not None else "unknown"
                try:
                    conn.send(protocol.encode(RingReply(token, protocol.clean_reason(str(exc))))[0])
                except OSError:
                    pass
                self._close_conn(conn)
                return
            self._conns[conn.fileno()] = (conn, ring)
            conn.send(protocol.encode(RingReply(ring.token, ""))[0])
        finally:
            for fd in fds:
                os.close(fd)

    def _map(self, offer: RingOffer, fds: list[int], conn: socket.socket) -> _Ring:
        if self.run_id is not None and offer.run_id != self.run_id:
            raise ValueError(f"it belongs to run {offer.run_id}, this run is {self.run_id}")
        if offer.source_id != self.source_id:
            raise ValueError(f"it names source {offer.source_id!r}, this socket is "
                             f"{self.source_id!r}'s")
        if len(fds) != 1:
            raise ValueError(f"the offer must carry exactly one file descriptor, it had "
                             f"{len(fds)}")
        fd = fds[0]
        info = os.fstat(fd)
        size = offer.slots * offer.slot_bytes
        if not stat.S_ISREG(info.st_mode) or info.st_size != size:
            raise ValueError(f"its memory is {info.st_size} bytes, not {offer.slots} slots x "
                             f"{offer.slot_bytes}")
        try:
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        except OSError:
            seals = 0
        if seals & _SEALS != _SEALS:
            raise ValueError("its memory is not sealed against shrinking and growing "
                             "(memfd F_SEAL_SHRINK | F_SEAL_GROW)")
        # Read-only: the worker never writes the producer's pixels.
        mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
        ring = _Ring(offer.ring, offer.source_id, offer.slots, offer.slot_bytes, mm, conn,
                     self.stats)
        old = self.rings.pop(offer.ring, None)
        if old is not None:
            old.closed = True
        self.rings[offer.ring] = ring
        log.info("source %s: frame ring %s mapped (%d x %d bytes)", self.source_id, offer.ring,
                 offer.slots, offer.slot_bytes)
        return ring

    def frame(self, header: RingFrame) -> Frame:
        ring = self.rings.get(header.ring)
        if ring is None:
            raise ProtocolError(f"ring_frame names ring {header.ring!r}, which this worker was "
                                "not offered (or whose producer is gone)")
        n = header.nbytes
        if header.slot >= ring.slots or n > ring.slot_bytes:
            raise ProtocolError(f"ring_frame slot {header.slot} / {n} bytes does not fit ring "
                                f"{ring.token} ({ring.slots} x {ring.slot_bytes})")
        with ring.lock:
            if header.slot in ring.busy:
                raise ProtocolError(f"ring_frame slot {header.slot} of ring {ring.token} is "
                                    "still held by an earlier frame")
            ring.busy.add(header.slot)
        offset = header.slot * ring.slot_bytes
        owner = np.frombuffer(ring.view[offset:offset + n], np.uint8)   # read-only mapping
        # The slot goes back when the last view on `owner` dies (every view, crop or reshape
        # of the image keeps `owner` alive).
        done = weakref.finalize(owner, ring.release, header.slot)
        done.atexit = False
        self.stats.frames += 1
        return Frame(header.source_id, header.seq, header.wall_time, header.mono_ns,
                     owner.reshape(header.shape), part_id=header.part_id,
                     encoder=header.encoder, truth=header.truth, run_id=header.run_id)

    def _drop(self, conn: socket.socket, ring: _Ring) -> None:
        with ring.lock:
            ring.closed = True
            ring.closed_at = time.monotonic()
        log.info("source %s: the producer of frame ring %s is gone", self.source_id, ring.token)
        self._close_conn(conn)

    def sweep(self) -> None:
        """Forget the rings whose producer left more than a grace time ago (frames still
        held keep their memory mapped; the last one to go unmaps it)."""
        now = time.monotonic()
        for token, ring in list(self.rings.items()):
            if ring.closed and now - ring.closed_at > _GONE_GRACE_S:
                del self.rings[token]

    def _close_conn(self, conn: socket.socket) -> None:
        self._conns.pop(conn.fileno(), None)
        conn.close()

    def close(self) -> None:
        for conn, ring in list(self._conns.values()):
            if ring is not None:
                with ring.lock:
                    ring.closed = True
            self._close_conn(conn)
        self.rings.clear()
        self._listener.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass


def _remove_stale(path: str) -> None:
    """A ring socket left by a killed worker is replaced; a live one is refused."""
    if not os.path.exists(path):
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except OSError:
        os.unlink(path)
        return
    finally:
        probe.close()
    raise ValueError(f"cannot listen for frame rings at {path}: another live process listens "
                     "there (a second run in the same run_dir?)")


def ring_bytes_mapped(pid: int | str = "self") -> int:
    """Bytes of grad-edge frame rings that process ``pid`` maps (from /proc/PID/maps)."""
    total = 0
    try:
        with open(f"/proc/{pid}/maps") as maps:
            for line in maps:
                if "memfd:grad-edge-ring" in line:
                    lo, hi = line.split()[0].split("-")
                    total += int(hi, 16) - int(lo, 16)
    except FileNotFoundError:
        return 0
    return total

