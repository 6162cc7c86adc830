"""Runs left open by a crash: who ran them, whether that process is gone, closing them.

A run row carries the host, the pid and the process's start token (``process_start``) of the
line that opened it. A later writer on the same host closes, as ``crashed``, every run still
``running`` whose process is gone; a pid that has since been reused by another process does
not count as alive, because its start token differs. Runs of other hosts are never touched
(this host cannot see their processes): on a database shared by many hosts, each host closes
its own.

"With what is known": the closed run gets ``stopped_at`` = the time of its last known record
(defect, reject, alarm or progress snapshot; its start if none), its last progress snapshot
as the summary plus a ``crash_recovery`` note, and, for each defect whose reject was decided
but never recorded as fired or missed, a reject row with outcome ``unconfirmed``.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import Engine, func, insert, select, update

from edge.defect_log.engine import begin_exclusive
from edge.defect_log.tables import AlarmRow, DefectRow, RejectEventRow, RunRow

logger = logging.getLogger(__name__)


def process_start(pid: int) -> str | None:
    """A token naming one process for good: ``linux:<boot id>:<start time in clock ticks>``.

    Read from /proc; None where there is no /proc (then a live pid is taken as the same
    process: a run is never closed while a process with its pid runs). Clock ticks since boot,
    not wall time: a clock change must not make a live process look like another one.
    """
    try:
        boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
    fields = stat[stat.rindex(")") + 2:].split()
    return f"linux:{boot_id}:{fields[19]}"        # field 22 of stat: starttime


def process_alive(pid: int, token: str | None) -> bool:
    """Whether the process that opened a run (pid + start token) still runs on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass                                        # exists, belongs to another user
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if state in ("Z", "X"):                     # dead, not yet reaped
            return False
    except (OSError, IndexError):
        pass
    current = process_start(pid)
    if token is None or current is None:
        return True                                 # cannot tell: never close a live run
    return current == token


def close_crashed_runs(engine: Engine, next_reject_id: Callable[[], int], *,
                       host: str | None = None, now: float | None = None) -> list[int]:
    """Close this host's open runs whose process is gone; returns their ids."""
    host = host or socket.gethostname()
    now = time.time() if now is None else now
    closed: list[int] = []
    with engine.connect() as conn:
        # Two lines starting at once on this host must not both close (and add unconfirmed
        # rejects to) the same crashed run: one closes, the other then finds it closed.
        begin_exclusive(conn, "close crashed runs")
        open_runs = conn.execute(select(RunRow).where(
            RunRow.status == "running", RunRow.host == host)).all()
        for run in open_runs:
            # A run opened before migration 2 has no pid: its process cannot be checked, and
            # the writer's journal lock says no other writer of this version is alive.
            if run.pid is not None and process_alive(run.pid, run.process_start):
                continue
            last = _last_known_time(conn, run)
            unconfirmed = _add_unconfirmed_rejects(conn, run.id, next_reject_id, now)
            summary = dict(run.progress or {})
            summary["crash_recovery"] = {
                "closed_at": now, "closed_by_pid": os.getpid(), "last_known_at": last,
                "progress_at": run.progress_at, "unconfirmed_rejects": unconfirmed,
                "defects_logged": conn.execute(select(func.count()).select_from(DefectRow)
                                               .where(DefectRow.run_id == run.id)).scalar(),
            }
            conn.execute(update(RunRow).where(RunRow.id == run.id).values(
                status="crashed", stopped_at=last, summary=summary, exit_code=None))
            closed.append(run.id)
            logger.warning("defect log: run %d (pid %s on %s) was left open by a crash; "
                           "closed as crashed at its last known record (%s)%s", run.id,
                           run.pid, host, time.strftime("%Y-%m-%d %H:%M:%S",
                                                        time.localtime(last)),
                           f", {unconfirmed} reject(s) unconfirmed" if unconfirmed else "")
        conn.commit()
    return closed


def _last_known_time(conn, run) -> float:
    times = [run.started_at, run.progress_at,
             conn.execute(select(func.max(DefectRow.time)).where(
                 DefectRow.run_id == run.id)).scalar(),
             conn.execute(select(func.max(RejectEventRow.fired_at)).where(
                 RejectEventRow.run_id == run.id)).scalar(),
             conn.execute(select(func.max(RejectEventRow.issued_at)).where(
                 RejectEventRow.run_id == run.id)).scalar(),
             conn.execute(select(func.max(AlarmRow.time)).where(
                 AlarmRow.run_id == run.id)).scalar()]
    return max(t for t in times if t is not None)


def _add_unconfirmed_rejects(conn, run_id: int, next_reject_id: Callable[[], int],
                             now: float) -> int:
    """A reject row for each defect of the run whose reject was decided but never recorded."""
    recorded = select(RejectEventRow.defect_id).where(RejectEventRow.defect_id.is_not(None))
    orphans = conn.execute(select(DefectRow).where(
        DefectRow.run_id == run_id, DefectRow.reject.is_(True),
        DefectRow.id.not_in(recorded))).all()
    for d in orphans:
        conn.execute(insert(RejectEventRow).values(
            id=next_reject_id(), run_id=run_id, defect_id=d.id, source_id=d.source_id,
            part_id=d.part_id, issued_at=d.time, due_encoder=None, due_time=None,
            fired_at=None, sinks_ok=[], sinks_failed=[], outcome="unconfirmed",
            reason="the line's process died after deciding this reject and before recording "
                   "that it fired; whether the ejector fired is not known (see the reject "
                   "sinks' own logs)"))
    return len(orphans)
