"""Serving the station: in the foreground (`grad-edge serve`) or on a thread beside a line
in the same process (`grad-edge run --serve`)."""

from __future__ import annotations

import logging
import socket
import threading
from pathlib import Path

import uvicorn

from edge.config import LineConfig
from station.app import StationConfigError, StationSettings, create_app, read_token
from station.link import HttpLineLink, LocalLineLink

log = logging.getLogger(__name__)


def settings_for(cfg: LineConfig, link, *, bind: str | None = None,
                 port: int | None = None) -> tuple[StationSettings, int]:
    st = cfg.station
    bind = bind or st.bind
    token = read_token(st.token_file, bind)
    return StationSettings(
        db=cfg.defect_log.url, images=Path(cfg.defect_log.images), run_dir=Path(cfg.run_dir),
        link=link, config_path=Path(cfg.source_file) if cfg.source_file else None, bind=bind,
        token=token, shifts=list(st.shifts), page_size=st.page_size), (
        st.port if port is None else port)


def line_link_for(cfg: LineConfig):
    """Where a station in its own process reads the line: station.metrics_url, or the line's
    metrics port."""
    url = cfg.station.metrics_url
    if url is None:
        if cfg.metrics.port is None:
            raise StationConfigError(
                f"{cfg.source_file or 'config'}: the station reads the line's state from its "
                "metrics port, and metrics.port is null; set metrics.port (e.g. 9464), or set "
                "station.metrics_url, or run the line with `grad-edge run --serve`")
        host = "127.0.0.1" if cfg.metrics.bind in ("0.0.0.0", "::") else cfg.metrics.bind
        url = f"http://{host}:{cfg.metrics.port}/metrics"
    return HttpLineLink(url)


class StationServer:
    """uvicorn on a socket bound here (so port 0 works and a port in use fails at once)."""

    def __init__(self, settings: StationSettings, port: int):
        self.settings = settings
        family = socket.AF_INET6 if ":" in settings.bind else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.sock.bind((settings.bind, port))
        except OSError as exc:
            self.sock.close()
            raise StationConfigError(f"station: cannot listen on {settings.bind}:{port} "
                                     f"({exc.strerror or exc}); set station.port to a free "
                                     "port (0: any)") from None
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(create_app(settings), log_level="warning",
                                                    access_log=False))
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = self.settings.bind if ":" not in self.settings.bind else f"[{self.settings.bind}]"
        return f"http://{host}:{self.port}/"

    def run(self) -> None:
        """In the foreground until Ctrl-C / SIGTERM."""
        log.info("station: %s (defect log %s; line from %s)", self.url, self.settings.db,
                 self.settings.link.where)
        self.server.run(sockets=[self.sock])

    def start(self) -> StationServer:
        """On a thread of its own (beside a line)."""
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                        name="station", daemon=True)
        self._thread.start()
        log.info("station: %s (beside the line)", self.url)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(10)
        self.sock.close()


def serve_beside(cfg: LineConfig, line) -> StationServer:
    """`grad-edge run --serve`: the station on a thread, reading the line's publisher."""
    settings, port = settings_for(cfg, LocalLineLink(line.publisher))
    return StationServer(settings, port).start()
