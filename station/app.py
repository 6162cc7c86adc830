"""The operator station: one Starlette app, server-rendered Jinja2 pages.

Pages (templates/ beside this file; static/ holds the one small script, vendored):

  /                  the line view: per source, the latest judged frames and the live numbers;
                     it updates itself (static/station.js polls /fragment/line)
  /defects           the defect browser: filters, thumbnails, keyset pages
  /defects/<id>      one defect: frame, heatmap, box, score; acknowledge, false positive,
                     comment
  /report            the shift report, with a what-if threshold (/api/whatif)
  /roi/<source>      draw the region of interest on a frame and save it into the config file
  /audit             every operator action
  /metrics /healthz  the line's, as it publishes them

Safety: the station binds 127.0.0.1 unless configured; bound anywhere else it needs a token
(from a file) and every action asks for it (a cookie set at /login); a POST from another
site's page is refused (its Origin names another host); images are served only from inside
the images folder; every action lands in the defect log's audit table with the operator's
name and the client's address.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import hmac
import ipaddress
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlencode, urlsplit

import cv2
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import (FileResponse, JSONResponse, PlainTextResponse,
                                 RedirectResponse, Response)
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from edge.defect_log import (DefectFilter, DefectLogError, DefectLogReader,
                             DefectNotFoundError)
from station import report
from station.roi import save_roi

log = logging.getLogger(__name__)
HERE = Path(__file__).parent
TOKEN_COOKIE = "station_token"


class StationConfigError(ValueError):
    """The station cannot start as configured (one line: what and how to fix it)."""


@dataclass
class StationSettings:
    db: str                                  # defect log URL or path
    images: Path                             # the only folder images are served from
    run_dir: Path                            # results-<run id>.jsonl, for the report
    link: object                             # station.link.LocalLineLink | HttpLineLink
    config_path: Path | None = None          # where a saved ROI goes
    bind: str = "127.0.0.1"
    token: str | None = None
    shifts: list[str] = field(default_factory=lambda: ["06:00", "14:00", "22:00"])
    page_size: int = 50


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_token(token_file: str | None, bind: str) -> str | None:
    """The token operators must give, or None on a loopback bind without one."""
    if token_file is None:
        if not is_loopback(bind):
            raise StationConfigError(
                f"station.bind {bind} opens the station's actions to the network; set "
                "station.token_file to a file holding a token (or bind 127.0.0.1)")
        return None
    try:
        token = Path(token_file).read_text().strip()
    except OSError as exc:
        raise StationConfigError(f"station.token_file {token_file}: cannot read it "
                                 f"({exc.strerror or exc})") from None
    if len(token) < 8:
        raise StationConfigError(f"station.token_file {token_file}: the token is empty or "
                                 "shorter than 8 characters; write a longer one")
    return token


def safe_image(root: Path, path: str | None) -> Path | None:
    """`path` if it is a file inside `root` (after resolving `..` and links), else None."""
    if not path or "\x00" in path:
        return None
    base = root.resolve()
    candidate = Path(path)
    candidate = (candidate if candidate.is_absolute() else base / candidate).resolve()
    if not candidate.is_relative_to(base) or not candidate.is_file():
        return None
    return candidate


@functools.lru_cache(maxsize=1024)
def _thumbnail(path: str, mtime: float, side: int) -> bytes | None:
    image = cv2.imread(path, cv2.IMREAD_COLOR)
    if image is None:
        return None
    h, w = image.shape[:2]
    scale = side / max(h, w)
    if scale < 1:
        image = cv2.resize(image, (max(1, int(w * scale)), max(1, int(h * scale))),
                           interpolation=cv2.INTER_AREA)
    ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 80])
    return data.tobytes() if ok else None


def _when(t: float | None) -> str:
    return "-" if t is None else dt.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S")


def _parse_time(text: str | None) -> float | None:
    """`2026-11-30T14:00` (a datetime-local field, local time) -> epoch seconds."""
    if not text:
        return None
    try:
        return dt.datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise ValueError(f"time {text!r}: expected YYYY-MM-DDTHH:MM") from None


class LazyReader:
    """The defect log's reader, opened at first use: beside a line, the station starts before
    the line has created the database. Until it exists, pages answer 503 saying so."""

    def __init__(self, db: str) -> None:
        self.db = db
        self._reader: DefectLogReader | None = None
        self._lock = threading.Lock()

    def __getattr__(self, name: str):
        if self._reader is None:
            with self._lock:
                if self._reader is None:
                    self._reader = DefectLogReader(self.db)
        return getattr(self._reader, name)

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()


def create_app(settings: StationSettings) -> Starlette:
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    templates.env.filters["when"] = _when
    templates.env.filters["num"] = lambda x, fmt="{:.3g}": "-" if x is None else fmt.format(x)
    reader = LazyReader(settings.db)
    images = settings.images

    def page(request: Request, name: str, status_code: int = 200, **context) -> Response:
        context.setdefault("message", request.query_params.get("msg"))
        return templates.TemplateResponse(request, name, {
            "token_needed": settings.token is not None,
            "authorised": authorised(request), **context}, status_code=status_code)

    # --- safety -----------------------------------------------------------------------

    def authorised(request: Request) -> bool:
        if settings.token is None:
            return True
        given = request.cookies.get(TOKEN_COOKIE) or request.headers.get("x-station-token")
        return given is not None and hmac.compare_digest(given, settings.token)

    def refuse_action(request: Request) -> Response | None:
        """Why an action may not go ahead (None: it may)."""
        origin = request.headers.get("origin")
        if origin and origin != "null" and urlsplit(origin).netloc != request.headers.get("host"):
            return PlainTextResponse(f"refused: this action came from another site's page "
                                     f"({origin})", status_code=403)
        if not authorised(request):
            return PlainTextResponse("refused: this station needs its token for actions; "
                                     "enter it at /login", status_code=403)
        return None

    def via(request: Request) -> str:
        return f"station {request.client.host if request.client else '?'}"

    async def login(request: Request) -> Response:
        if request.method == "GET":
            return page(request, "login.html")
        form = await request.form()
        token = str(form.get("token", ""))
        if settings.token is None or not hmac.compare_digest(token, settings.token):
            return page(request, "login.html", error="wrong token", status_code=403)
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="strict")
        return response

    # --- the line view ----------------------------------------------------------------

    def line_context() -> dict:
        state = settings.link.state()
        live = settings.link.live_index() if state.reachable else {}
        alarms = reader.list_alarms(limit=8)
        return {"state": state, "live": live, "alarms": alarms, "now": _when(time.time()),
                "health": settings.link.health() if state.reachable else None,
                "where": settings.link.where}

    async def line_view(request: Request) -> Response:
        return page(request, "line.html", **line_context())

    async def line_fragment(request: Request) -> Response:
        return page(request, "line_fragment.html", **line_context())

    async def live_jpeg(request: Request) -> Response:
        data = settings.link.live_jpeg(request.path_params["source"],
                                       request.path_params["seq"])
        if data is None:
            return PlainTextResponse("no such live frame (it scrolled away)", status_code=404)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=60"})

    async def metrics(request: Request) -> Response:
        try:
            text = settings.link.metrics_text()
        except OSError as exc:
            return PlainTextResponse(f"line not reachable at {settings.link.where} ({exc})",
                                     status_code=503)
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    async def healthz(request: Request) -> Response:
        h = settings.link.health()
        return JSONResponse(h, status_code=200 if h["ok"] else 503)

    # --- the defect browser -----------------------------------------------------------

    def filters(q) -> DefectFilter:
        def opt_int(name):
            v = q.get(name)
            return int(v) if v not in (None, "") else None
        fp = q.get("fp")
        ack = q.get("ack")
        return DefectFilter(
            run_id=opt_int("run"), source=q.get("source") or None,
            verdict=q.get("verdict") or None, since=_parse_time(q.get("since")),
            until=_parse_time(q.get("until")),
            acknowledged={"yes": True, "no": False}.get(ack),
            judgement={"yes": "false_positive", "no": "ack"}.get(fp))

    async def defects(request: Request) -> Response:
        q = request.query_params
        try:
            where = filters(q)
        except ValueError as exc:
            return page(request, "defects.html", rows=[], error=str(exc), q=q, total=0,
                        next_url=None, sources=reader.sources(), runs=reader.list_runs(50))
        after = None
        if q.get("after"):
            try:
                t, i = q["after"].split("_")
                after = (float(t), int(i))
            except ValueError:
                return page(request, "defects.html", status_code=400, rows=[], q=q, total=0,
                            error=f"after={q['after']!r}: not a page key; start from the "
                                  "first page", next_url=None, sources=reader.sources(),
                            runs=reader.list_runs(50))
        result = reader.browse(where, after=after, limit=settings.page_size)
        total = reader.count_defects(where, cap=10_001)
        keep = {k: v for k, v in q.items() if k != "after" and v}
        next_url = None
        if result.next_key is not None:
            next_url = "/defects?" + urlencode({**keep, "after": "%r_%d" % result.next_key})
        first_url = "/defects?" + urlencode(keep) if after else None
        return page(request, "defects.html", rows=result.rows, q=q, total=total,
                    next_url=next_url, first_url=first_url, sources=reader.sources(),
                    runs=reader.list_runs(50))

    async def defect(request: Request) -> Response:
        try:
            detail = reader.get_defect(request.path_params["id"])
        except DefectNotFoundError as exc:
            return PlainTextResponse(str(exc), status_code=404)
        return page(request, "defect.html", d=detail.defect, detail=detail,
                    operator=request.cookies.get("operator", ""))

    async def defect_image(request: Request) -> Response:
        try:
            d = reader.get_defect(request.path_params["id"]).defect
        except DefectNotFoundError as exc:
            return PlainTextResponse(str(exc), status_code=404)
        kind = request.path_params["kind"]
        if kind == "frame":
            path = safe_image(images, d.frame_path)
        elif kind == "heatmap":
            path = safe_image(images, d.heatmap_path)
        elif kind == "thumb":
            path = safe_image(images, d.heatmap_path) or safe_image(images, d.frame_path)
        else:
            return PlainTextResponse(f"no {kind} image; frame, heatmap or thumb",
                                     status_code=404)
        if path is None:
            return PlainTextResponse("no image for this defect inside the images folder",
                                     status_code=404)
        if kind == "thumb":
            data = _thumbnail(str(path), path.stat().st_mtime, 160)
            if data is None:
                return PlainTextResponse("image unreadable", status_code=404)
            return Response(data, media_type="image/jpeg",
                            headers={"Cache-Control": "max-age=3600"})
        return FileResponse(path)

    async def image_file(request: Request) -> Response:
        path = safe_image(images, request.path_params["path"])
        if path is None:
            return PlainTextResponse("not found inside the images folder", status_code=404)
        return FileResponse(path)

    async def defect_action(request: Request) -> Response:
        refused = refuse_action(request)
        if refused is not None:
            return refused
        defect_id = request.path_params["id"]
        form = await request.form()
        operator = str(form.get("operator", "")).strip()
        comment = str(form.get("comment", "")).strip() or None
        action = request.path_params["action"]
        try:
            if action == "ack":
                done = reader.acknowledge(defect_id, operator, comment, via=via(request))
            elif action == "false-positive":
                done = reader.mark_false_positive(defect_id, operator, comment,
                                                  via=via(request))
            elif action == "comment":
                done = reader.comment(defect_id, operator, comment or "", via=via(request))
            else:
                return PlainTextResponse(f"unknown action {action}", status_code=404)
        except DefectNotFoundError as exc:
            return PlainTextResponse(str(exc), status_code=404)
        except ValueError as exc:
            return RedirectResponse(f"/defects/{defect_id}?" + urlencode({"msg": str(exc)}),
                                    status_code=303)
        except DefectLogError as exc:     # locked too long, read-only, disk full
            return PlainTextResponse(f"not recorded: {exc}", status_code=503)
        response = RedirectResponse(f"/defects/{defect_id}?" + urlencode(
            {"msg": done.describe()}), status_code=303)
        response.set_cookie("operator", operator, samesite="strict")
        return response

    # --- the shift report -------------------------------------------------------------

    def report_window(q) -> report.Window:
        if q.get("day"):
            day = dt.date.fromisoformat(q["day"])
            return report.shift_window(day, int(q.get("shift", 0)), settings.shifts)
        run_id = int(q["run"]) if q.get("run") else None
        if run_id is None:
            runs = reader.list_runs(limit=1)
            if not runs:
                raise LookupError("no runs in the defect log yet")
            run_id = runs[0].id
        return report.run_window(reader, run_id)

    async def report_page(request: Request) -> Response:
        q = request.query_params
        try:
            window = report_window(q)
        except (ValueError, LookupError) as exc:
            return page(request, "report.html", error=str(exc), q=q, runs=reader.list_runs(50),
                        shifts=settings.shifts, rows=[], histograms={}, notes=[], window=None)
        scores, notes = report.load_scores(settings.run_dir, reader, window)
        rows = report.summary_rows(reader, window, scores)
        source = q.get("source") or None
        shown = {sid: s for sid, s in scores.items() if source in (None, sid)}
        histograms = {sid: report.histogram_svg(s, s.threshold) for sid, s in shown.items()}
        return page(request, "report.html", q=q, window=window, rows=rows, notes=notes,
                    histograms=histograms, scores=shown, runs=reader.list_runs(50),
                    shifts=settings.shifts)

    async def whatif(request: Request) -> Response:
        q = request.query_params
        try:
            window = report_window(q)
            t = float(q["t"])
        except (ValueError, LookupError, KeyError) as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        scores, _ = report.load_scores(settings.run_dir, reader, window)
        if q.get("source"):
            scores = {k: v for k, v in scores.items() if k == q["source"]}
        return JSONResponse(report.what_if(scores, reader, window, t))

    # --- ROI --------------------------------------------------------------------------

    async def roi_page(request: Request) -> Response:
        sid = request.path_params["source"]
        frames = settings.link.live_index().get(sid, [])
        image_url = size = None
        if frames:
            image_url, size = f"/live/{sid}/{frames[0]['seq']}.jpg", frames[0]["size"]
        else:
            latest = reader.browse(DefectFilter(source=sid), limit=1).rows
            if latest and safe_image(images, latest[0].frame_path):
                image_url = f"/defects/{latest[0].id}/frame.jpg"
        return page(request, "roi.html", source=sid, image_url=image_url, size=size,
                    config_path=settings.config_path,
                    operator=request.cookies.get("operator", ""))

    async def roi_save(request: Request) -> Response:
        refused = refuse_action(request)
        if refused is not None:
            return refused
        sid = request.path_params["source"]
        if settings.config_path is None:
            return PlainTextResponse("this station was started without a config file; "
                                     "there is nowhere to save an ROI", status_code=409)
        form = await request.form()
        operator = str(form.get("operator", "")).strip()
        try:
            roi = None if form.get("clear") else [int(round(float(form[k])))
                                                  for k in ("x0", "y0", "x1", "y1")]
            if not operator:
                raise ValueError("operator name is empty; actions are recorded with who "
                                 "took them")
            old, key = save_roi(settings.config_path, sid, roi)
        except (KeyError, ValueError) as exc:      # ConfigError is a ValueError
            return RedirectResponse(f"/roi/{sid}?" + urlencode({"msg": f"not saved: {exc}"}),
                                    status_code=303)
        except OSError as exc:                     # the config file or its folder
            return RedirectResponse(f"/roi/{sid}?" + urlencode(
                {"msg": f"not saved: {settings.config_path}: {exc.strerror or exc}"}),
                status_code=303)
        reader.record_audit(operator, via(request), "roi", key, {"old": old, "new": roi})
        return RedirectResponse(f"/roi/{sid}?" + urlencode(
            {"msg": f"saved {key} = {roi} (was {old}); the line uses it from its next start"}),
            status_code=303)

    async def audit(request: Request) -> Response:
        return page(request, "audit.html", rows=reader.list_audit(limit=200))

    routes = [
        Route("/", line_view), Route("/fragment/line", line_fragment),
        Route("/live/{source}/{seq:int}.jpg", live_jpeg),
        Route("/metrics", metrics), Route("/healthz", healthz),
        Route("/login", login, methods=["GET", "POST"]),
        Route("/defects", defects), Route("/defects/{id:int}", defect),
        Route("/defects/{id:int}/{kind}.jpg", defect_image),
        Route("/defects/{id:int}/{action}", defect_action, methods=["POST"]),
        Route("/images/{path:path}", image_file),
        Route("/report", report_page), Route("/api/whatif", whatif),
        Route("/roi/{source}", roi_page), Route("/roi/{source}", roi_save, methods=["POST"]),
        Route("/audit", audit),
        Mount("/static", StaticFiles(directory=str(HERE / "static")), name="static"),
    ]
    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        reader.close()

    async def unavailable(request: Request, exc: Exception) -> Response:
        # No database yet, or it cannot be read (locked, not a database): one line.
        return PlainTextResponse(f"defect log unavailable: {exc}", status_code=503)

    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={FileNotFoundError: unavailable,
                                        DefectLogError: unavailable})
    app.state.settings = settings
    return app
