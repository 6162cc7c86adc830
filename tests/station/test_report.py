"""The shift report's arithmetic on a real defect log and a real per-run results file."""

from __future__ import annotations

import datetime as dt
import json

import pytest

from edge.defect_log import DefectLogReader, DefectLogWriter, DefectRecord, RejectRecord
from edge.reject import RejectEvent
from station import report


def test_shift_window_runs_from_its_start_to_the_next_shift_and_past_midnight_for_the_last():
    day = dt.date(2026, 11, 30)
    starts = ["14:00", "06:00", "22:00"]                 # any order in the config
    first = report.shift_window(day, 0, starts)
    assert (first.since, first.until) == (dt.datetime(2026, 11, 30, 6).timestamp(),
                                          dt.datetime(2026, 11, 30, 14).timestamp())
    night = report.shift_window(day, 2, starts)
    assert night.until == dt.datetime(2026, 12, 1, 6).timestamp()
    assert "shift 3 (22:00-06:00)" in night.label
    with pytest.raises(ValueError, match="there are 3 shifts"):
        report.shift_window(day, 3, starts)


def test_report_counts_parts_defects_false_positive_rate_missed_rejects_and_recounts_what_if(
        tmp_path):
    db = tmp_path / "defects.db"
    writer = DefectLogWriter(db).start()
    run_id = writer.begin_run()
    rows, ids = [], {}
    for seq in range(20):                  # scores 0..19, threshold 15: seqs 15-19 flagged
        verdict = "DEFECT" if seq >= 15 else "OK"
        rows.append({"run_id": run_id, "time": 1000.0 + seq, "source_id": "cam0", "seq": seq,
                     "part_id": seq // 2, "raw_score": float(seq), "threshold": 15.0,
                     "verdict": verdict, "reject": verdict != "OK",
                     "truth": 1 if seq >= 18 else 0})
        if verdict == "DEFECT":
            ids[seq] = writer.submit(DefectRecord(source_id="cam0", seq=seq, time=1000.0 + seq,
                                                  verdict="DEFECT", reason="r", run_id=run_id,
                                                  raw_score=float(seq), threshold=15.0))
    event = RejectEvent(source_id="cam0", seq=19, part_id=9, encoder=None, due_encoder=None,
                        due_time=None, verdict="DEFECT", raw_score=19.0, reason="r",
                        defect_id=ids[19])
    writer.submit(RejectRecord.missed(event, "too late", run_id=run_id))
    writer.end_run(run_id)
    writer.stop()
    (tmp_path / f"results-{run_id}.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in rows) + '{"cut by a cra')
    with DefectLogReader(db) as reader:
        reader.mark_false_positive(ids[15], "maria")
        reader.mark_false_positive(ids[16], "maria")
        reader.acknowledge(ids[18], "maria")
        window = report.run_window(reader, run_id)
        scores, notes = report.load_scores(tmp_path, reader, window)
        (row,) = report.summary_rows(reader, window, scores)
        assert notes == []
        assert row["parts"] == 10 and row["frames"] == 20 and row["defects"] == 5
        assert row["judged"] == 3 and row["false_positives"] == 2
        assert row["fp_rate"] == pytest.approx(2 / 3) and row["missed_rejects"] == 1
        at_16 = report.what_if(scores, reader, window, 16.0)["sources"]["cam0"]
    assert at_16 == {"frames": 20, "flagged": 4, "false_positives_still_flagged": 1,
                     "defective": 2, "defective_found": 2, "good": 18, "good_flagged": 2}


def test_report_says_which_run_has_no_results_file_when_one_is_missing(tmp_path):
    db = tmp_path / "defects.db"
    writer = DefectLogWriter(db).start()
    run_id = writer.begin_run()
    writer.end_run(run_id)
    writer.stop()
    with DefectLogReader(db) as reader:
        scores, notes = report.load_scores(tmp_path, reader, report.run_window(reader, run_id))
    assert scores == {} and notes == [f"run {run_id}: no per-frame results "
                                      f"(results-{run_id}.jsonl is not in {tmp_path})"]
