"""The station on the plant's PostgreSQL defect log, by URL, over real HTTP against a real
uvicorn and a real (throwaway) PostgreSQL server: the browser pages it, a defect's page shows
it, a judgement lands in the database with its audit row, and a second one is kept as such."""

from __future__ import annotations

from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from edge.defect_log import DefectLogWriter, DefectRecord, database_url
from station.app import StationSettings
from station.link import HttpLineLink

from tests.station.conftest import write_jpeg
from tests.station.test_station_safety import get, post

WHEN = 1_700_000_000.0


def test_station_browses_and_judges_a_postgres_defect_log_when_given_its_url(
        postgres_url, serve_station, tmp_path):
    images = tmp_path / "images"
    frame = write_jpeg(images / "day" / "frame.jpg")
    with DefectLogWriter(postgres_url) as writer:
        run_id = writer.begin_run(model_hash="abc123")
        ids = [writer.submit(DefectRecord(source_id=f"cam{seq % 2}", seq=seq, time=WHEN + seq,
                                          verdict="DEFECT", reason=f"seq {seq}", run_id=run_id,
                                          raw_score=3.0, threshold=2.0, frame_path=str(frame),
                                          heatmap_path=str(frame), box=(1, 2, 30, 40)))
               for seq in range(1, 61)]
        writer.end_run(run_id)
    dead = HttpLineLink("http://127.0.0.1:9/metrics", timeout_s=0.5)     # no line running
    station = serve_station(StationSettings(db=postgres_url, images=images, run_dir=tmp_path,
                                            link=dead))

    status, page = get(station.url, "/defects?source=cam1")
    assert status == 200
    assert f"/defects/{ids[-2]}".encode() in page             # newest cam1 defect first
    assert f"/defects/{ids[-1]}\"".encode() not in page        # cam0's is filtered out
    status, detail = get(station.url, f"/defects/{ids[0]}")
    assert status == 200 and b"seq 1" in detail
    assert get(station.url, f"/defects/{ids[0]}/thumb.jpg")[0] == 200

    first = post(station.url, f"/defects/{ids[0]}/ack", {"operator": "maria"})
    second = post(station.url, f"/defects/{ids[0]}/false-positive",
                  {"operator": "li", "comment": "oil stain"})
    assert first.status == second.status == 303
    engine = create_engine(database_url(postgres_url), poolclass=NullPool)
    with engine.connect() as conn:
        row = conn.execute(text("SELECT judgement, judged_by, judgements FROM defects "
                                "WHERE id = :id"), {"id": ids[0]}).one()
        actions = conn.execute(text("SELECT operator, action, previous_id IS NOT NULL "
                                    "FROM operator_actions ORDER BY id")).all()
        audit = conn.execute(text("SELECT operator, action FROM audit ORDER BY id")).all()
    engine.dispose()
    assert tuple(row) == ("false_positive", "li", 2)
    assert [tuple(a) for a in actions] == [("maria", "ack", False), ("li", "false_positive", True)]
    assert [tuple(a) for a in audit] == [("maria", "ack"), ("li", "false_positive")]
