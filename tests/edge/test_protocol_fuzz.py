"""Seeded fuzz of the decoder: 100,000 random and mutated messages.

The decoder may raise ProtocolError and nothing else, and whatever it does decode must have
every field of the right type and range. The messages are real encoded frames, heartbeats and
end-of-streams, mutated the ways a broken or hostile sender would (flipped, cut and inserted
bytes; any field swapped for a value of another type -- lists, maps, bools, huge ints, NaN,
nested garbage; keys dropped, added, duplicated or made unhashable; parts dropped, duplicated,
swapped or resized), plus purely random bytes. A seeded generator, not hypothesis: the same
100,000 messages every run, in a few seconds on one core.

`GRAD_EDGE_FUZZ_SEED` / `GRAD_EDGE_FUZZ_N` run another seed or more messages by hand.
"""

from __future__ import annotations

import collections
import math
import os
import random
import re

import msgpack
import numpy as np

from edge import protocol
from edge.protocol import (EndOfStream, Frame, Heartbeat, Hello, ProtocolError, RingFrame,
                           RingOffer, RingReply, Welcome)

SEED = int(os.environ.get("GRAD_EDGE_FUZZ_SEED", "20240608"))
N_MESSAGES = int(os.environ.get("GRAD_EDGE_FUZZ_N", "100000"))
INT64 = (-(2 ** 63), 2 ** 63 - 1)

# --- the oracle: what a decoded message must look like (written apart from the decoder) --------

SAFE_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
TOKEN = re.compile(r"[A-Za-z0-9_\-]{1,64}")


def plain_int(value, lo=INT64[0], hi=INT64[1]) -> bool:
    return type(value) is int and lo <= value <= hi


def wrong_fields(msg) -> list[str]:
    """The fields of a decoded message that break the spec (empty when it is sound)."""
    bad = []

    def need(ok: bool, name: str) -> None:
        if not ok:
            bad.append(f"{name}={getattr(msg, name, '?')!r}")

    if not isinstance(msg, RingReply):
        need(type(msg.source_id) is str and bool(SAFE_NAME.fullmatch(msg.source_id))
             and msg.source_id not in (".", ".."), "source_id")
    if not isinstance(msg, (Hello, RingReply)):
        need(type(msg.run_id) is str and bool(TOKEN.fullmatch(msg.run_id)), "run_id")
    if isinstance(msg, Hello):
        need(plain_int(msg.mono_ns, 0), "mono_ns")
    elif isinstance(msg, Welcome):
        need(msg.state in ("running", "stopping", "unknown_source"), "state")
        need(plain_int(msg.port, 0, 65535), "port")
        need(plain_int(msg.mono_ns, 0) and plain_int(msg.echo_ns, 0), "mono_ns")
    elif isinstance(msg, RingOffer):
        need(bool(TOKEN.fullmatch(msg.ring)), "ring")
        need(plain_int(msg.slots, 1, 1024) and plain_int(msg.slot_bytes, 1)
             and msg.slots * msg.slot_bytes <= 2 ** 34, "slots")
    elif isinstance(msg, RingReply):
        need(type(msg.ring) is str and bool(TOKEN.fullmatch(msg.ring)), "ring")
        need(type(msg.error) is str and len(msg.error) <= 256 and msg.error.isprintable(),
             "error")
    elif isinstance(msg, (Frame, RingFrame)):
        need(plain_int(msg.seq, 0), "seq")
        need(type(msg.wall_time) is float and math.isfinite(msg.wall_time)
             and 0 <= msg.wall_time < 253402300800, "wall_time")
        need(plain_int(msg.mono_ns, 0), "mono_ns")
        need(msg.part_id is None or plain_int(msg.part_id), "part_id")
        need(msg.encoder is None or plain_int(msg.encoder), "encoder")
        need(msg.truth is None or (type(msg.truth) is int and msg.truth in (0, 1)), "truth")
        if isinstance(msg, RingFrame):
            need(bool(TOKEN.fullmatch(msg.ring)), "ring")
            need(plain_int(msg.slot, 0, 1023), "slot")
            need(type(msg.shape) is tuple and len(msg.shape) in (2, 3)
                 and all(plain_int(n, 1, 2 ** 31 - 1) for n in msg.shape)
                 and (len(msg.shape) == 2 or msg.shape[2] == 3), "shape")
        else:
            image = msg.image
            need(isinstance(image, np.ndarray) and image.dtype == np.uint8
                 and (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3))
                 and image.size > 0 and not image.flags.writeable, "image")
    else:
        need(msg.producer is None or bool(TOKEN.fullmatch(msg.producer)), "producer")
        counters = ("frames_captured", "frames_sent", "frames_dropped", "frames_unsent")
        for name in counters:
            need(plain_int(getattr(msg, name), 0), name)
        if isinstance(msg, EndOfStream):
            need(plain_int(msg.last_seq, -1), "last_seq")
            need(type(msg.reason) is str and len(msg.reason) <= 256
                 and msg.reason.isprintable(), "reason")
        else:
            need(isinstance(msg, Heartbeat), "kind")
            need(plain_int(msg.seq, -1), "seq")
            need(plain_int(msg.mono_ns, 0), "mono_ns")
    return bad


# --- the generator ------------------------------------------------------------------------------

EVIL = [None, True, False, 0, 1, -1, -2, 2, 2 ** 31, 2 ** 63 - 1, 2 ** 63, 2 ** 64 - 1,
        -(2 ** 63), 0.0, -0.0, 1.5, -1.5, 1e300, float("nan"), float("inf"), float("-inf"),
        "", ".", "..", "../etc/passwd", "a/b", "cam1", "x" * 65, "x" * 300, "café", "a\nb",
        "\x00", "frame", "eos", "heartbeat", "ring_frame", "hello", "welcome", "ring",
        "ring_reply", "running", "stopping", "uint8", "float32", b"", b"cam1", b"\xff" * 9,
        [], [1], [4, 4], [4, 4, 3], [0, 4], [-1, 4], [True, 4], [2 ** 63, 1], [[4], [4]],
        {}, {"a": 1}, {"kind": "frame"}, msgpack.ExtType(1, b"x"), msgpack.Timestamp(1, 0)]


KINDS = ["frame", "ring_frame", "eos", "heartbeat", "hello", "welcome", "ring", "ring_reply"]


def garbage(rng: random.Random, depth: int = 0):
    """A random msgpack-able value: scalars of every type, or nested lists and maps."""
    roll = rng.random()
    if depth > 3 or roll < 0.55:
        return rng.choice(EVIL) if rng.random() < 0.7 else rng.randint(-(2 ** 63), 2 ** 64 - 1)
    if roll < 0.8:
        return [garbage(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {rng.choice(["v", "kind", "run", "seq", "k", ""]) + str(i): garbage(rng, depth + 1)
            for i in range(rng.randint(0, 4))}


def valid_messages(rng: random.Random) -> list[list[bytes]]:
    """A corpus of real encoded messages of every kind, as byte parts."""
    out = []
    for i in range(40):
        shape = rng.choice([(4, 4), (3, 5, 3), (1, 1), (2, 7, 3)])
        image = np.frombuffer(rng.randbytes(math.prod(shape)), np.uint8).reshape(shape)

        def opt() -> int | None:
            return rng.choice([None, rng.randint(-5, 10 ** 6)])
        msgs = [
            Frame(f"cam{i % 3}", rng.randint(0, 10 ** 6), rng.uniform(0, 2e9),
                  rng.randint(0, 2 ** 62), image, part_id=opt(), encoder=opt(),
                  truth=rng.choice([None, 0, 1])),
            RingFrame(f"cam{i % 3}", rng.randint(0, 10 ** 6), rng.uniform(0, 2e9),
                      rng.randint(0, 2 ** 62), shape, ring=f"ring{i}", slot=rng.randint(0, 7),
                      part_id=opt(), encoder=opt(), truth=rng.choice([None, 0, 1])),
            EndOfStream(f"line-{i}", rng.randint(-1, 100), rng.choice(["end of file", ""]),
                        *(rng.randint(0, 1000) for _ in range(4)),
                        producer=rng.choice([None, f"life{i}"])),
            Heartbeat(f"src.{i}", rng.randint(-1, 100), rng.randint(0, 2 ** 62),
                      *(rng.randint(0, 1000) for _ in range(4)),
                      producer=rng.choice([None, f"life{i}"])),
            Hello(f"cam{i % 3}", rng.randint(0, 2 ** 62)),
            Welcome(f"cam{i % 3}", rng.choice(["running", "stopping", "unknown_source"]),
                    rng.randint(0, 65535), rng.randint(0, 2 ** 62), rng.randint(0, 2 ** 62)),
            RingOffer(f"cam{i % 3}", f"ring{i}", rng.randint(1, 16), rng.randint(1, 2 ** 24)),
            RingReply(f"ring{i}", rng.choice(["", "not sealed"])),
        ]
        for msg in msgs:
            out.append([bytes(p) for p in protocol.encode(msg, run_id=f"run{i % 4}")])
    return out


def mutate_bytes(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.random()
        if op < 0.5 and b:
            b[rng.randrange(len(b))] = rng.randrange(256)         # flip a byte
        elif op < 0.7:
            b.insert(rng.randint(0, len(b)), rng.randrange(256))  # insert one
        elif op < 0.85 and b:
            del b[rng.randrange(len(b))]                           # delete one
        else:
            b = b[:rng.randint(0, len(b))]                         # cut short
    return bytes(b)


def mutate_header(rng: random.Random, parts: list[bytes]) -> list[bytes]:
    header = msgpack.unpackb(parts[0])
    pairs = list(header.items())
    op = rng.random()
    if op < 0.6:                                  # one or more fields swapped for garbage
        for _ in range(rng.randint(1, 3)):
            i = rng.randrange(len(pairs))
            pairs[i] = (pairs[i][0], garbage(rng))
    elif op < 0.7:                                # a key dropped
        del pairs[rng.randrange(len(pairs))]
    elif op < 0.8:                                # a key added: known, unknown or bytes
        pairs.append((rng.choice(["seq", "extra", "run", "shape", b"seq", "v"]), garbage(rng)))
    elif op < 0.9:                                # an unhashable or non-string key
        pairs.insert(rng.randint(0, len(pairs)), (rng.choice([[1], {"a": 1}, 7, 1.5, None]),
                                                  garbage(rng)))
    else:                                         # the kind changed, the rest kept
        pairs = [(k, rng.choice(KINDS) if k == "kind" else v)
                 for k, v in pairs]
    packed = msgpack.Packer(strict_types=False).pack_map_pairs(pairs)
    return [packed, *parts[1:]]


def mutate_parts(rng: random.Random, parts: list[bytes]) -> list[bytes]:
    parts = list(parts)
    op = rng.random()
    if op < 0.2 and parts:
        del parts[rng.randrange(len(parts))]
    elif op < 0.4:
        parts.append(rng.choice(parts) if parts else b"")
    elif op < 0.55 and len(parts) > 1:
        parts.reverse()
    elif op < 0.75:
        i = rng.randrange(len(parts))
        parts[i] = rng.randbytes(rng.randint(0, 80))
    else:
        i = rng.randrange(len(parts))
        parts[i] = mutate_bytes(rng, parts[i])
    return parts


def random_message(rng: random.Random) -> list[bytes]:
    if rng.random() < 0.5:
        return [rng.randbytes(rng.randint(0, 100)) for _ in range(rng.randint(0, 3))]
    # random msgpack: maps of garbage, sometimes with the right version and kind
    header = {"v": rng.choice([3, 3, 2, "3"]), "kind": rng.choice([*KINDS, "x"])}
    header.update({str(garbage(rng))[:8]: garbage(rng) for _ in range(rng.randint(0, 6))})
    return [msgpack.packb(header), *(rng.randbytes(rng.randint(0, 50))
                                     for _ in range(rng.randint(0, 2)))]


def messages(seed: int, n: int):
    """(mutation, parts) n times, the same for the same seed."""
    rng = random.Random(seed)
    corpus = valid_messages(rng)
    for _ in range(n):
        roll = rng.random()
        parts = list(rng.choice(corpus))
        if roll < 0.05:
            yield "valid", parts
        elif roll < 0.15:
            yield "random", random_message(rng)
        elif roll < 0.55:
            yield "header fields", mutate_header(rng, parts)
        elif roll < 0.7:
            yield "header bytes", [mutate_bytes(rng, parts[0]), *parts[1:]]
        elif roll < 0.85:
            yield "parts", mutate_parts(rng, parts)
        else:                                     # several mutations stacked
            for _ in range(rng.randint(2, 4)):
                try:
                    parts = (mutate_header(rng, parts) if rng.random() < 0.5
                             else mutate_parts(rng, parts))
                except Exception:                 # the header no longer unpacks: bytes only
                    parts = mutate_parts(rng, parts) if parts else [b""]
            yield "stacked", parts


CHANNELS = [protocol.DATA_KINDS, protocol.DATA_KINDS | protocol.HELLO_KINDS
            | protocol.WELCOME_KINDS | protocol.RING_OFFER_KINDS | protocol.RING_REPLY_KINDS]


def test_decode_raises_only_protocol_error_and_decodes_only_sound_messages_when_fuzzed():
    outcomes: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    escaped: list[str] = []
    unsound: list[str] = []
    for i, (mutation, parts) in enumerate(messages(SEED, N_MESSAGES)):
        try:
            # The data socket's decoder and one taking every kind: what one accepts, the
            # other must refuse cleanly. Valid messages go to the one that takes them all.
            channel = CHANNELS[1] if mutation == "valid" else CHANNELS[i % len(CHANNELS)]
            msg = protocol.decode(parts, expect=channel)
        except ProtocolError:
            outcomes[mutation]["refused"] += 1
            continue
        except Exception as exc:  # noqa: BLE001 - exactly what this test hunts
            outcomes[mutation]["escaped"] += 1
            if len(escaped) < 5:
                escaped.append(f"#{i} {mutation}: {type(exc).__name__}: {exc} <- {parts!r:.200}")
            continue
        outcomes[mutation][type(msg).__name__] += 1
        bad = wrong_fields(msg)
        if bad and len(unsound) < 5:
            unsound.append(f"#{i} {mutation}: {type(msg).__name__} with {bad}")
        outcomes[mutation]["unsound"] += bool(bad)

    total = collections.Counter()
    for counts in outcomes.values():
        total.update(counts)
    summary = {m: dict(c) for m, c in outcomes.items()}
    assert sum(total.values()) == N_MESSAGES
    assert total["escaped"] == 0, f"seed {SEED}: {escaped}\n{summary}"
    assert total["unsound"] == 0, f"seed {SEED}: {unsound}\n{summary}"
    # The fuzz is not vacuous: valid messages decode, every mutation is refused many times,
    # and mutated messages that stay within the spec are decoded too (so nothing is refused
    # blindly).
    assert outcomes["valid"]["refused"] == 0
    assert all(outcomes[m]["refused"] > 1000 for m in
               ("random", "header fields", "header bytes", "parts", "stacked")), summary
    decoded_mutants = sum(total[k] for k in ("Frame", "RingFrame", "Heartbeat", "EndOfStream",
                                             "Hello", "Welcome", "RingOffer", "RingReply")) \
        - sum(outcomes["valid"].values())
    assert decoded_mutants > 100, summary
