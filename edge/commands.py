"""`grad-edge run | replay | defects | produce | keys`: thin shells over `edge.line`,
`edge.defect_log`, `camera_sources.remote` and `edge.security`."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from edge.config import (ConfigError, DefectLogConfig, LineConfig, ModelConfig, Pace,
                         SourceConfig, SourceKind, WorkerConfig, describe, load_config)
from edge.defect_log import (REJECT_OUTCOMES, DefectFilter, DefectLogReader, database_url,
                             explain, export_format, format_alarms_table, format_audit_table,
                             format_defect_detail, format_defect_table, format_rejects_table,
                             format_runs_table)
from edge.protocol import DropPolicy

log = logging.getLogger(__name__)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run the line described by a config file (edge.yaml)")
    p.add_argument("config", type=Path, nargs="?", default=Path("edge.yaml"),
                   help="the line's config file (default: edge.yaml)")
    p.add_argument("--describe-config", action="store_true",
                   help="list every config key with its type and default, then exit")
    p.add_argument("--serve", action="store_true",
                   help="serve the operator station beside the line (station.bind:port "
                        "in the config; default http://127.0.0.1:8080)")
    p.set_defaults(func=run)

    p = sub.add_parser("replay", help="run recorded footage through the model, every frame")
    p.add_argument("video", type=Path, help="the video file to replay")
    p.add_argument("--model", required=True, type=Path,
                   help="GRAD checkpoint (.pt) written by grad-edge train")
    p.add_argument("--out", type=Path, help="run folder (default: runs/replay-<video name>)")
    p.add_argument("--backend", default="eager",
                   choices=["auto", "tensorrt", "cudagraph", "compile", "eager"],
                   help="how the model runs (default: eager, bit-identical on every replay)")
    p.add_argument("--roi", type=int, nargs=4, metavar=("X0", "Y0", "X1", "Y1"),
                   help="crop of the frame the model sees, in frame pixels")
    p.set_defaults(func=replay)

    p = sub.add_parser("defects", help="read, judge and export the defect log")
    p.add_argument("--db", default="runs/demo/defects.db",
                   help="database file or URL (default: runs/demo/defects.db)")
    dsub = p.add_subparsers(dest="action", required=True)
    q = dsub.add_parser("list", help="recent defects, newest first")
    _filters(q)
    q.add_argument("--unacked", action="store_true", help="only defects no operator judged")
    q.add_argument("--limit", type=int, default=50, help="at most this many rows (default 50)")
    q = dsub.add_parser("show", help="one defect with its rejects and operator actions")
    q.add_argument("id", type=int, help="the defect's id (first column of `list`)")
    for name, help_text in (("ack", "acknowledge a defect (seen; the verdict stands)"),
                            ("false-positive", "mark a defect as a false positive (the part "
                                               "was good; `grad-edge dataset` trains on it)"),
                            ("comment", "comment on a defect")):
        q = dsub.add_parser(name, help=help_text)
        q.add_argument("id", type=int, help="the defect's id")
        q.add_argument("--operator", required=True, help="your name, recorded with the action")
        q.add_argument("--comment", required=(name == "comment"),
                       help="what you want recorded" + (" (optional)" if name != "comment"
                                                        else ""))
    q = dsub.add_parser("export", help="write defects with their judgements to CSV or JSONL")
    q.add_argument("out", type=Path, help="file.csv or file.jsonl (the suffix picks the format)")
    _filters(q)
    q = dsub.add_parser("runs", help="runs and how each ended (completed, crashed, ...)")
    q.add_argument("--limit", type=int, default=20, help="at most this many runs (default 20)")
    q = dsub.add_parser("rejects", help="rejects: fired, missed (and why), unconfirmed")
    q.add_argument("--outcome", choices=REJECT_OUTCOMES, help="only rejects with this outcome")
    q.add_argument("--run", type=int, help="only this run's rejects")
    q.add_argument("--limit", type=int, default=50, help="at most this many rows (default 50)")
    q = dsub.add_parser("alarms", help="alarms the line raised")
    q.add_argument("--run", type=int, help="only this run's alarms")
    q.add_argument("--since-hours", type=float, help="only the last N hours")
    q.add_argument("--limit", type=int, default=50, help="at most this many rows (default 50)")
    q = dsub.add_parser("audit", help="every operator action (judgements, comments, ROI "
                                      "changes), newest first")
    q.add_argument("--limit", type=int, default=50, help="at most this many rows (default 50)")
    p.set_defaults(func=defects)
    add_transport_parsers(sub)


def _filters(q: argparse.ArgumentParser) -> None:
    q.add_argument("--run", type=int, help="only this run's defects (`defects runs` lists them)")
    q.add_argument("--source", help="only this source's defects")
    q.add_argument("--since-hours", type=float, help="only the last N hours")
    q.add_argument("--false-positive", action="store_true",
                   help="only defects an operator marked false positive")


def _open_runner(cfg: LineConfig):
    from deploy.runner import open_runner  # the only deploy import the line needs

    return open_runner(cfg.model.path, backend=cfg.model.backend, device=cfg.model.device,
                       artifact=cfg.model.artifact)


def run(args: argparse.Namespace) -> int:
    if args.describe_config:
        print("\n".join(describe()))
        return 0
    from edge.line import Line
    from edge.pool import WorkerPool, default_workers, format_pool_summary
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
    assignments = cfg.workers or default_workers(cfg, _visible_gpus())
    if assignments:
        if args.serve:
            raise ConfigError(f"{args.config}: `run --serve` shows one line process, and this "
                              f"config runs {len(assignments)} worker processes; start the "
                              "station apart with `grad-edge serve` (it reads the defect log), "
                              "or set workers: to one worker")
        pool_summary = WorkerPool(cfg, assignments).run()
        print(format_pool_summary(pool_summary))
        return pool_summary.outcome.exit_code
    line = Line(cfg, _open_runner(cfg))
    station = None
    if args.serve:
        # The station is a package beside the line; the line itself never imports it. This
        # shell starts it on a thread that reads the line's publisher (metrics, live frames).
        from station.server import serve_beside

        station = serve_beside(cfg, line)
    try:
        summary = line.run()
    finally:
        if station is not None:
            station.stop()
    print(format_summary(summary))
    return summary.outcome.exit_code


def _visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


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
    summary = line.run()         # results-<run id>.jsonl holds exactly this replay
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
    from edge.line import point_latest

    point_latest(path.with_name("results.csv"), path)      # the latest replay's
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
    if args.action == "export":
        export_format(args.out)          # an unknown suffix is refused before any work
    with DefectLogReader(args.db) as reader:
        if args.action in ("list", "export"):
            where = DefectFilter(run_id=args.run, source=args.source, since=since,
                                 acknowledged=False if getattr(args, "unacked", False) else None,
                                 judgement="false_positive" if args.false_positive else None)
        if args.action == "list":
            print(format_defect_table(reader.browse(where, limit=args.limit).rows))
        elif args.action == "show":
            print(format_defect_detail(reader.get_defect(args.id)))
        elif args.action == "ack":
            print(reader.acknowledge(args.id, args.operator, args.comment).describe())
        elif args.action == "false-positive":
            print(reader.mark_false_positive(args.id, args.operator, args.comment).describe())
        elif args.action == "comment":
            print(reader.comment(args.id, args.operator, args.comment).describe())
        elif args.action == "export":
            n = reader.export(args.out, where)
            print(f"wrote {n} defect(s) to {args.out}")
        elif args.action == "runs":
            print(format_runs_table(reader.list_runs(limit=args.limit)))
        elif args.action == "rejects":
            print(format_rejects_table(reader.list_rejects(outcome=args.outcome, run_id=args.run,
                                                           limit=args.limit)))
        elif args.action == "alarms":
            print(format_alarms_table(reader.list_alarms(since=since, run_id=args.run,
                                                         limit=args.limit)))
        elif args.action == "audit":
            print(format_audit_table(reader.list_audit(limit=args.limit)))
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
