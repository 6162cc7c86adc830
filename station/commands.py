"""`grad-edge serve | dataset`: thin shells over `station.server` and `station.dataset`."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

log = logging.getLogger(__name__)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve the operator station for a line's config "
                                     "(the line runs in another process; see run --serve)")
    p.add_argument("config", type=Path, nargs="?", default=Path("edge.yaml"),
                   help="the line's config file: defect log, images, run folder, metrics port, "
                        "station section (default: edge.yaml)")
    p.add_argument("--bind", help="address to listen on (default: station.bind, 127.0.0.1)")
    p.add_argument("--port", type=int, help="port to listen on (default: station.port, 8080; "
                                            "0: any free port)")
    p.set_defaults(func=serve)

    p = sub.add_parser("dataset", help="write frames marked false positive and kept "
                                       "near-threshold good frames as a training folder "
                                       "(MVTec layout) for grad-edge train")
    p.add_argument("--db", required=True, help="the defect log (file or URL)")
    p.add_argument("--out", required=True, type=Path,
                   help="dataset root to write; grad-edge train --data reads it")
    p.add_argument("--category", default="line",
                   help="category folder name under --out (default: line)")
    p.add_argument("--include", type=Path,
                   help="a category folder (with train/good) whose normal images are copied "
                        "in too, e.g. the data the current model was trained on")
    p.add_argument("--run", type=int, help="only this run's frames")
    p.add_argument("--source", help="only this source's frames")
    p.add_argument("--since-hours", type=float, help="only the last N hours")
    p.set_defaults(func=dataset)


def serve(args: argparse.Namespace) -> int:
    from edge.config import load_config
    from station.server import StationServer, line_link_for, settings_for

    cfg = load_config(args.config)
    settings, port = settings_for(cfg, line_link_for(cfg), bind=args.bind, port=args.port)
    StationServer(settings, port).run()
    return 0


def dataset(args: argparse.Namespace) -> int:
    from station.dataset import write_dataset

    since = time.time() - args.since_hours * 3600 if args.since_hours else None
    s = write_dataset(args.db, args.out, category=args.category, include=args.include,
                      run_id=args.run, since=since, source=args.source)
    print(f"wrote {s.folder}/train/good: {s.false_positives} false positive(s), {s.kept} "
          f"near-threshold good frame(s), {s.included} included from {args.include or '-'}"
          + (f"; left out {s.skipped_missing} with no image file" if s.skipped_missing else "")
          + (f"; left out {s.skipped_defective} kept frame(s) the source knew were defective"
             if s.skipped_defective else ""))
    print(f"train on it: grad-edge train --data {args.out} --category {args.category} "
          "--out model.pt")
    return 0
