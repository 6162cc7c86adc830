"""The station's safety, over real HTTP against a real uvicorn: images never escape the
images folder, actions need the token when the station listens beyond this machine, a POST
from another site is refused, every action is audited, a locked database is said, not hidden."""

from __future__ import annotations

import http.client
import sqlite3
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import pytest

from edge.defect_log import DefectLogWriter, DefectRecord
from station.app import StationConfigError, StationSettings, read_token
from station.link import HttpLineLink

from tests.station.conftest import write_jpeg

WHEN = 1_700_000_000.0


@pytest.fixture
def log_with_images(tmp_path) -> tuple[Path, Path]:
    """A defect log with two defects whose frames are inside the images folder, and one whose
    frame_path points outside it."""
    images = tmp_path / "images"
    db = tmp_path / "defects.db"
    writer = DefectLogWriter(db).start()
    run_id = writer.begin_run()
    for seq, path in ((1, write_jpeg(images / "day" / "one_frame.jpg")),
                      (2, write_jpeg(images / "day" / "two_frame.jpg", seed=1)),
                      (3, write_jpeg(tmp_path / "outside" / "secret.jpg", seed=2))):
        writer.submit(DefectRecord(source_id="cam0", seq=seq, time=WHEN + seq,
                                   verdict="DEFECT", reason="r", run_id=run_id,
                                   raw_score=3.0, threshold=2.0, frame_path=str(path),
                                   heatmap_path=str(path), box=(1, 2, 30, 40)))
    writer.end_run(run_id)
    writer.stop()
    return db, images


def settings(db: Path, images: Path, **kw) -> StationSettings:
    dead = HttpLineLink("http://127.0.0.1:9/metrics", timeout_s=0.5)   # nothing listens
    return StationSettings(db=str(db), images=images, run_dir=db.parent, link=dead, **kw)


def get(url: str, path: str, headers: dict | None = None) -> tuple[int, bytes]:
    """A raw request: the path goes on the wire exactly as written (no client clean-up)."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    conn.request("GET", path, headers=headers or {})
    r = conn.getresponse()
    return r.status, r.read()


def post(url: str, path: str, form: dict, headers: dict | None = None
         ) -> http.client.HTTPResponse:
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    conn.request("POST", path, urllib.parse.urlencode(form), {
        "Content-Type": "application/x-www-form-urlencoded", **(headers or {})})
    r = conn.getresponse()
    r.body = r.read()
    return r


@pytest.mark.parametrize("path", [
    "/images/../defects.db", "/images/../../../../etc/passwd", "/images/%2e%2e/defects.db",
    "/images/..%2f..%2fetc%2fpasswd", "/images//etc/passwd", "/images/%2Fetc%2Fpasswd",
    "/images/day/../../outside/secret.jpg", "/images/link/secret.jpg"])
def test_station_refuses_an_image_outside_the_images_folder_when_the_url_tries_to_escape(
        log_with_images, serve_station, tmp_path, path):
    db, images = log_with_images
    (images / "link").symlink_to(tmp_path / "outside")          # a link out of the folder
    station = serve_station(settings(db, images))
    assert get(station.url, "/images/day/one_frame.jpg")[0] == 200      # inside: served
    status, body = get(station.url, path)
    assert status == 404, (path, body[:200])
    assert b"root:" not in body and b"SQLite" not in body


def test_station_serves_no_defect_image_whose_stored_path_lies_outside_the_images_folder(
        log_with_images, serve_station):
    db, images = log_with_images
    station = serve_station(settings(db, images))
    assert get(station.url, "/defects/1/frame.jpg")[0] == 200
    assert get(station.url, "/defects/1/thumb.jpg")[0] == 200
    for kind in ("frame", "heatmap", "thumb"):
        assert get(station.url, f"/defects/3/{kind}.jpg")[0] == 404


def test_station_refuses_to_listen_beyond_this_machine_when_no_token_file_is_set(tmp_path):
    with pytest.raises(StationConfigError, match="station.token_file"):
        read_token(None, "0.0.0.0")
    assert read_token(None, "127.0.0.1") is None
    short = tmp_path / "token"
    short.write_text("abc\n")
    with pytest.raises(StationConfigError, match="shorter than 8"):
        read_token(str(short), "0.0.0.0")


def test_station_acts_only_with_its_token_when_bound_beyond_this_machine(
        log_with_images, serve_station, tmp_path):
    db, images = log_with_images
    token_file = tmp_path / "station.token"
    token_file.write_text("s3cret-token-for-the-line\n")
    station = serve_station(settings(db, images, bind="0.0.0.0",
                                     token=read_token(str(token_file), "0.0.0.0")))
    form = {"operator": "maria", "comment": "burr"}

    refused = post(station.url, "/defects/1/ack", form)
    assert refused.status == 403
    wrong = post(station.url, "/login", {"token": "guess"})
    assert wrong.status == 403 and wrong.getheader("set-cookie") is None
    with sqlite3.connect(db) as con:
        assert con.execute("SELECT count(*) FROM operator_actions").fetchone() == (0,)

    login = post(station.url, "/login", {"token": "s3cret-token-for-the-line"})
    assert login.status == 303
    cookie = login.getheader("set-cookie").split(";")[0]
    assert "httponly" in login.getheader("set-cookie").lower()
    done = post(station.url, "/defects/1/ack", form, {"Cookie": cookie})
    assert done.status == 303 and "acknowledged+by+maria" in done.getheader("location")
    by_header = post(station.url, "/defects/2/comment", {"operator": "li", "comment": "x"},
                     {"X-Station-Token": "s3cret-token-for-the-line"})
    assert by_header.status == 303
    with sqlite3.connect(db) as con:
        assert con.execute("SELECT defect_id, operator, action FROM audit JOIN "
                           "operator_actions USING (operator, action) ORDER BY audit.id"
                           ).fetchall() == [(1, "maria", "ack"), (2, "li", "comment")]
        vias = {row[0] for row in con.execute("SELECT via FROM audit")}
    assert vias == {"station 127.0.0.1"}


def test_station_refuses_an_action_posted_from_another_sites_page(log_with_images,
                                                                  serve_station):
    db, images = log_with_images
    station = serve_station(settings(db, images))
    r = post(station.url, "/defects/1/false-positive", {"operator": "maria"},
             {"Origin": "http://attacker.example"})
    assert r.status == 403
    same = post(station.url, "/defects/1/false-positive", {"operator": "maria"},
                {"Origin": station.url})
    assert same.status == 303
    with sqlite3.connect(db) as con:
        assert con.execute("SELECT count(*) FROM operator_actions").fetchone() == (1,)


def test_station_says_the_action_was_not_recorded_when_the_database_stays_locked(
        log_with_images, serve_station):
    db, images = log_with_images
    station = serve_station(settings(db, images))
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sqlite3, sys, time\n"
        f"con = sqlite3.connect({str(db)!r}, isolation_level=None)\n"
        "con.execute('BEGIN IMMEDIATE'); print('locked', flush=True); time.sleep(9)\n")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        started = time.monotonic()
        r = post(station.url, "/defects/1/ack", {"operator": "maria"})
        assert r.status == 503
        assert b"not recorded" in r.body and b"locked" in r.body
        assert time.monotonic() - started >= 4.5          # it waited busy_timeout first
    finally:
        holder.kill()
        holder.wait()
    with sqlite3.connect(db) as con:
        assert con.execute("SELECT count(*) FROM operator_actions").fetchone() == (0,)
        assert con.execute("SELECT count(*) FROM audit").fetchone() == (0,)


def test_station_line_view_and_healthz_say_the_line_is_unreachable_when_it_is_not_running(
        log_with_images, serve_station):
    db, images = log_with_images
    station = serve_station(settings(db, images))
    status, body = get(station.url, "/healthz")
    assert status == 503 and b"not reachable" in body
    status, body = get(station.url, "/")
    assert status == 200 and b"line not reachable at http://127.0.0.1:9/metrics" in body
    assert get(station.url, "/metrics")[0] == 503


@pytest.mark.parametrize("query", ["after=garbage", "after=1.5_x", "since=yesterday",
                                   "run=abc"])
def test_station_defect_browser_answers_garbage_in_its_query_with_a_message_not_a_crash(
        log_with_images, serve_station, query):
    db, images = log_with_images
    station = serve_station(settings(db, images))
    status, body = get(station.url, "/defects?" + query)
    assert status in (200, 400) and b"Traceback" not in body
    assert b'class="error"' in body
