"""`grad-edge run | replay | defects | produce | keys`: thin shells over `edge.line`,
`edge.defect_log`, `camera_sources.remote` and `edge.security`."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import time
from pathlib import Path

from edge.config import (DefectLogConfig, LineConfig, ModelConfig, Pace, SourceConfig, SourceKind,
                         WorkerConfig, describe, load_config)
from edge.defect_log import (REJECT_OUTCOMES, DefectLogReader, database_url, explain,
                             format_alarms_table, format_defect_table,
                             format_rejects_table, format_runs_table)
from edge.protocol import DropPolicy

log = logging.getLogger(__name__)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run the line described by a config file (edge.yaml)")
    p.add_argument("config", type=Path, nargs="?", default=Path("edge.yaml"))
    p.add_argument("--describe-config", action="store_true", help="list every config key")
    p.set_defaults(func=run)

    p = sub.add_parser("replay", help="run recorded footage through the model, every frame")
    p.add_argument("video", type=Path)
    p.add_argument("--model", required=True, type=Path)
    p.add_argument("--out", type=Path, help="run folder (default: runs/replay-<video name>)")
    p.add_argument("--backend", default="eager")
    p.add_argument("--roi", type=int, nargs=4, metavar=("X0", "Y0", "X1", "Y1"))
    p.set_defaults(func=replay)

    p = sub.add_parser("defects", help="read and acknowledge the defect log")
    p.add_argument("--db", default="runs/demo/defects.db", help="database file or URL")
    dsub = p.add_subparsers(dest="action", required=True)
    q = dsub.add_parser("list", help="recent defects")
    q.add_argument("--source")
    q.add_argument("--unacked", action="store_true")
    q.add_argument("--since-hours", type=float)
    q.add_argument("--limit", type=int, default=50)
    q = dsub.add_parser("show", help="one defect with its rejects and operator actions")
    q.add_argument("id", type=int)
    for name, help_text in (("ack", "acknowledge a defect"),
                            ("false-positive", "mark a defect as a false positive"),
                            ("comment", "comment on a defect")):
        q = dsub.add_parser(name, help=help_text)
        q.add_argument("id", type=int)
        q.add_argument("--operator", required=True)
        q.add_argument("--comment", required=(name == "comment"))
    q = dsub.add_parser("export", help="write defects to CSV or JSONL")
    q.add_argument("out", type=Path, help="file.csv or file.jsonl")
    q.add_argument("--source")
    q.add_argument("--since-hours", type=float)
    q = dsub.add_parser("runs", help="runs and how each ended (completed, crashed, ...)")
    q.add_argument("--limit", type=int, default=20)
    q = dsub.add_parser("rejects", help="rejects: fired, missed (and why), unconfirmed")
    q.add_argument("--outcome", choices=REJECT_OUTCOMES)
    q.add_argument("--run", type=int)
    q.add_argument("--limit", type=int, default=50)
    q = dsub.add_parser("alarms", help="alarms the line raised")
    q.add_argument("--run", type=int)
    q.add_argument("--since-hours", type=float)
    q.add_argument("--limit", type=int, default=50)
    p.set_defaults(func=defects)
    add_transport_parsers(sub)


def _open_runner(cfg: LineConfig):
    from deploy.runner import open_runner  # the only deploy import the line needs

    return open_runner(cfg.model.path, backend=cfg.model.backend, device=cfg.model.device,
                       artifact=cfg.model.artifact)


def run(args: argparse.Namespace) -> int:
    if args.describe_config:
        print("\n".join(describe()))
        return 0
    from edge.line import Line
    from edge.summary import format_summary

    cfg = load_config(args.config)
    if not Path(cfg.model.path).exists():
        if not cfg.model.train_demo_if_missing:
            raise FileNotFoundError(f"{args.config}: model.path {cfg.model.path} does not exist: "
                                    "train one with `grad-edge train`, or set "
                                    "model.train_demo_if_missing: true for the demo line")
        # The one place the line reaches into the trainer, and only on a first demo run.
        from trainer.demo import train_demo_model

        train_demo_model(cfg.model.path, Path(cfg.run_dir) / "demo_data")
    summary = Line(cfg, _open_runner(cfg)).run()
    print(format_summary(summary))
    return summary.outcome.exit_code


def replay_config(video: Path, model: Path, out: Path, backend: str,
                  roi: list[int] | None) -> LineConfig:
    """A one-source line that reads every frame of a file as fast as the model takes them."""
    source = SourceConfig(id=video.stem, kind=SourceKind.VIDEO, path=str(video.resolve()),
                          pace=Pace.FAST, drop_policy=DropPolicy.EVERY_FRAME, roi=roi)
    return LineConfig(model=ModelConfig(path=str(model.resolve()), backend=backend),
                      sources=[source], run_dir=str(out.resolve()),
                      # Batches always full (but the last): the same frames batch together
                      # on every replay, so the scores match to the last bit.
                      worker=WorkerConfig(max_batch=8, max_wait_ms=60_000.0),
                      defect_log=DefectLogConfig(url=f"sqlite:///{(out / 'defects.db').resolve()}",
                                                 images=str((out / "images").resolve())),
                      status_interval_s=2.0, source_file=str(video),
                      config_hash=f"replay-{video.name}")


def replay(args: argparse.Namespace) -> int:
    from edge.line import Line
    from edge.summary import format_summary

    if not args.video.is_file():
        raise FileNotFoundError(f"no video at {args.video}")
    out = args.out or Path("runs") / f"replay-{args.video.stem}"
    cfg = replay_config(args.video, args.model, out, args.backend, args.roi)
    line = Line(cfg, _open_runner(cfg))
    if line.results_path.exists():
        line.results_path.unlink()  # a replay's results file holds exactly this replay
    summary = line.run()
    csv_path = write_results_csv(line.results_path)
    print(format_summary(summary))
    print(f"  per-frame CSV: {csv_path}")
    return summary.outcome.exit_code


def write_results_csv(jsonl: Path) -> Path:
    import csv
    import json

    rows = [json.loads(line) for line in jsonl.read_text().splitlines() if line]
    rows.sort(key=lambda r: (r["source_id"], r["seq"]))
    path = jsonl.with_suffix(".csv")
    with open(path, "w", newline="") as f:
        if rows:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    return path


def defects(args: argparse.Namespace) -> int:
    """`grad-edge defects ...`; any database trouble is one line naming the file (exit 2)."""
    from sqlalchemy.exc import SQLAlchemyError

    try:
        return _defects(args)
    except BrokenPipeError:
        # `grad-edge defects list | head`: the reader went away; that is not an error.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except SQLAlchemyError as exc:   # the reader explains what it expects; this is a net
        raise explain(exc, database_url(args.db)) from exc


def _defects(args: argparse.Namespace) -> int:
    since = time.time() - args.since_hours * 3600 if getattr(args, "since_hours", None) else None
    with DefectLogReader(args.db) as reader:
        if args.action == "list":
            rows = reader.list_defects(since=since, source=args.source,
                                       unacked_only=args.unacked, limit=args.limit)
            print(format_defect_table(rows))
        elif args.action == "show":
            detail = reader.get_defect(args.id)
            d = dataclasses.asdict(detail)
            for key, value in d["defect"].items():
                print(f"{key:>18}: {value}")
            for ev in d["reject_events"]:
                print(f"{'reject':>18}: {ev}")
            for act in d["actions"]:
                print(f"{'action':>18}: {act}")
        elif args.action == "ack":
            reader.acknowledge(args.id, args.operator, args.comment)
            print(f"defect {args.id} acknowledged by {args.operator}")
        elif args.action == "false-positive":
            reader.mark_false_positive(args.id, args.operator, args.comment)
            print(f"defect {args.id} marked false positive by {args.operator}")
        elif args.action == "comment":
            reader.comment(args.id, args.operator, args.comment)
            print(f"comment added to defect {args.id}")
        elif args.action == "export":
            export = reader.export_jsonl if args.out.suffix == ".jsonl" else reader.export_csv
            n = export(args.out, since=since, source=args.source)
            print(f"wrote {n} defect(s) to {args.out}")
        elif args.action == "runs":
            print(format_runs_table(reader.list_runs(limit=args.limit)))
        elif args.action == "rejects":
            print(format_rejects_table(reader.list_rejects(outcome=args.outcome, run_id=args.run,
                                                           limit=args.limit)))
        elif args.action == "alarms":
            print(format_alarms_table(reader.list_alarms(since=since, run_id=args.run,
                                                         limit=args.limit)))
    return 0


# --- remote producers: `grad-edge produce` and `grad-edge keys` --------------------------------

def add_transport_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("produce", help="run one tcp source of a line config on this (camera) "
                                       "host, feeding the worker over the network")
    p.add_argument("config", type=Path, help="the line config (the same file as the worker's)")
    p.add_argument("--source", required=True, help="the id of a source with transport: tcp")
    p.add_argument("--once", action="store_true",
                   help="serve one run, then exit (default: serve run after run)")
    p.set_defaults(func=produce)

    p = sub.add_parser("keys", help="make CURVE key pairs for the worker and camera hosts")
    p.add_argument("folder", type=Path, help="where NAME.key and NAME.key_secret are written")
    p.add_argument("names", nargs="+", help="one key pair per name, e.g. worker cam1 cam2")
    p.add_argument("--force", action="store_true", help="replace existing key pairs")
    p.set_defaults(func=keys)


def produce(args: argparse.Namespace) -> int:
    """Exit 0: the runs served ended cleanly or the producer was stopped; 1: the source
    failed; 2: a bad config, missing keys or a blind source; 130 / 143: SIGINT / SIGTERM."""
    import signal
    import threading

    from camera_sources.probe import SourceUnavailable, probe_source
    from camera_sources.remote import RemoteError, RemoteProducer
    from edge.config import ConfigError, Transport, producer_keys
    from edge.line import source_spec

    cfg = load_config(args.config)
    where = cfg.source_file or str(args.config)
    found = [(i, s) for i, s in enumerate(cfg.sources) if s.id == args.source]
    if not found:
        raise ConfigError(f"{where}: sources: no source with id {args.source!r} (sources: "
                          f"{', '.join(s.id for s in cfg.sources)})")
    i, source = found[0]
    if source.transport is not Transport.TCP:
        raise ConfigError(f"{where}: sources[{i}].transport: produce serves tcp sources; "
                          f"{source.id!r} is {source.transport.value} (the line starts its "
                          "producer itself)")
    if not cfg.network.worker:
        raise ConfigError(f"{where}: network.worker: required by produce: the worker's host "
                          "name or address")
    client = producer_keys(cfg, source.id)
    spec = source_spec(source)
    try:
        probe_source(spec, attempts=source.open_attempts)
    except SourceUnavailable as exc:
        raise ConfigError(f"{where}: sources[{i}] (source {source.id!r}): {exc}") from None
    stop = threading.Event()
    caught: list[int] = []

    def on_signal(signum, _frame) -> None:
        caught.append(signum)
        stop.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, on_signal)
    remote = RemoteProducer(spec, cfg.network.worker, cfg.network.hello_port, client,
                            policy=source.drop_policy, once=args.once)
    try:
        runs = remote.run(stop)
    except RemoteError as exc:
        raise ConfigError(f"{where}: sources[{i}]: {exc}") from None
    for stats in runs:
        print(f"run {stats.run_id}: {stats.source_id} captured {stats.frames_captured} = sent "
              f"{stats.frames_sent} + dropped {stats.frames_dropped} + unsent "
              f"{stats.frames_unsent} ({stats.reason})")
    if caught:
        return 130 if caught[0] == signal.SIGINT else 143
    return 1 if any(s.reason.startswith("source error") for s in runs) else 0


def keys(args: argparse.Namespace) -> int:
    from edge.security import make_keys

    for path in make_keys(args.folder, args.names, force=args.force):
        print(path)
    print("copy NAME.key (public) where it must be known: the worker's public key to every "
          "camera host, each camera host's public key to the worker; a NAME.key_secret never "
          "leaves its host")
    return 0
