"""What protocol v2's field checks cost per message, beside an unchecked decoder, in one run.

    python benchmarks/protocol_checks.py            # ~10 s
    python benchmarks/protocol_checks.py --quick    # a few thousand messages: checks the code

Rows, per message kind (a 1080x1920x3 frame, a heartbeat, an end-of-stream):
    decode     edge.protocol.decode: msgpack with duplicate-key refusal, every field's type and
               range checked, the zero-copy image view
    unchecked  the bare minimum a decoder does: msgpack.unpackb, np.frombuffer + reshape, the
               dataclass built from the header as it is (what version 1 did, minus its checks)
    encode     edge.protocol.encode, which applies the same checks before packing

The pixels are never copied by either decoder, so a frame costs the same as a heartbeat; the
ratio decode / unchecked is the price of the checks. Prints a table and writes
benchmarks/results/protocol.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import msgpack
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edge import protocol  # noqa: E402
from edge.protocol import EndOfStream, Frame, Heartbeat  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
RUN = protocol.new_run_id()


def unchecked(parts: list):
    """Decode trusting the header: no type or range checks at all."""
    h = msgpack.unpackb(parts[0])
    if h["kind"] == "frame":
        image = np.frombuffer(parts[1], np.uint8).reshape(h["shape"])
        return Frame(h["source_id"], h["seq"], h["wall_time"], h["mono_ns"], image,
                     h["part_id"], h["encoder"], h["truth"], h["run"])
    counters = (h["frames_captured"], h["frames_sent"], h["frames_dropped"], h["frames_unsent"])
    if h["kind"] == "eos":
        return EndOfStream(h["source_id"], h["last_seq"], h["reason"], *counters, h["run"])
    return Heartbeat(h["source_id"], h["seq"], h["mono_ns"], *counters, h["run"])


def per_call_us(fn, arg, n: int) -> float:
    """Best of 5 repeats of n calls, in microseconds per call."""
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            fn(arg)
        best = min(best, time.perf_counter() - t0)
    return 1e6 * best / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few messages, to check the code")
    args = parser.parse_args()
    n = 2000 if args.quick else 20000

    image = np.random.default_rng(0).integers(0, 256, (1080, 1920, 3), dtype=np.uint8)
    messages = {
        "frame 1080p": Frame("cam1", 123456, time.time(), time.monotonic_ns(), image,
                             part_id=4567, encoder=1234500, truth=0),
        "heartbeat": Heartbeat("cam1", 123456, time.monotonic_ns(), 123460, 123456, 3, 0),
        "eos": EndOfStream("cam1", 123456, "end of file", 123460, 123456, 4, 0),
    }
    rows = []
    for name, msg in messages.items():
        parts = [bytes(p) if i == 0 else p for i, p in enumerate(protocol.encode(msg, RUN))]
        assert unchecked(parts).source_id == protocol.decode(parts).source_id
        checked_us = per_call_us(protocol.decode, parts, n)
        bare_us = per_call_us(unchecked, parts, n)
        encode_us = per_call_us(lambda m: protocol.encode(m, RUN), msg, n)
        rows.append({"message": name, "header_bytes": len(parts[0]),
                     "decode_us": round(checked_us, 2), "unchecked_us": round(bare_us, 2),
                     "ratio": round(checked_us / bare_us, 2), "encode_us": round(encode_us, 2)})

    print(f"{'message':<12} {'header B':>8} {'decode us':>10} {'unchecked us':>13} "
          f"{'ratio':>6} {'encode us':>10}")
    for r in rows:
        print(f"{r['message']:<12} {r['header_bytes']:>8} {r['decode_us']:>10.2f} "
              f"{r['unchecked_us']:>13.2f} {r['ratio']:>6.2f} {r['encode_us']:>10.2f}")
    out = {"when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "host": {"python": platform.python_version(), "machine": platform.machine(),
                    "processor": platform.processor()},
           "protocol_version": protocol.PROTOCOL_VERSION, "calls_per_repeat": n,
           "quick": args.quick, "rows": rows}
    if not args.quick:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "protocol.json").write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {RESULTS / 'protocol.json'}")


if __name__ == "__main__":
    main()
