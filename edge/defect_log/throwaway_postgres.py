"""A throwaway PostgreSQL server in a temporary folder, for tests and benchmarks.

    with ThrowawayPostgres() as pg:              # initdb + pg_ctl start, on a free port
        url = pg.create_database("line1")        # postgresql+psycopg://postgres@127.0.0.1:PORT/line1
        pg.stop(); pg.start()                    # the server going away and coming back

It uses the PostgreSQL binaries of the machine (Debian's `postgresql` package puts them in
/usr/lib/postgresql/<version>/bin; `pg_config --bindir` or PATH elsewhere). PostgreSQL refuses
to run as root, so as root the server runs as the `postgres` user (`runuser`), in a folder
that user owns. It listens on 127.0.0.1 only, with `trust` authentication: never a server to
keep. `fsync=False` (the default here) makes a test cluster fast and loses data only on a
power cut; benchmarks pass `fsync=True` to measure what a real server costs. Commits are
synchronous either way (a plant's server must keep `synchronous_commit = on`: the writer
empties its journal once the database says committed).
"""

from __future__ import annotations

import glob
import logging
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL binaries here, or no user to run them as; the message says which."""


def find_bindir() -> Path:
    """The folder holding initdb and pg_ctl; raises PostgresUnavailable naming what to do."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"),
                        key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit()
                        else 0, reverse=True)
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            candidates.append(subprocess.run([pg_config, "--bindir"], capture_output=True,
                                             text=True, check=True).stdout.strip())
        except (OSError, subprocess.CalledProcessError):
            pass
    if shutil.which("initdb"):
        candidates.append(str(Path(shutil.which("initdb")).resolve().parent))
    for folder in candidates:
        if (Path(folder) / "initdb").is_file() and (Path(folder) / "pg_ctl").is_file():
            return Path(folder)
    raise PostgresUnavailable(
        "no PostgreSQL server binaries (initdb, pg_ctl) found in /usr/lib/postgresql/*/bin, "
        "pg_config --bindir or PATH; install them (Debian: apt-get install postgresql)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ThrowawayPostgres:
    """A PostgreSQL cluster of its own in a temporary folder; `close` removes every trace."""

    def __init__(self, *, fsync: bool = False) -> None:
        self.bindir = find_bindir()
        self.fsync = fsync
        self._as: list[str] = []
        if os.geteuid() == 0:
            if shutil.which("runuser") is None:
                raise PostgresUnavailable("running as root without `runuser`: cannot start "
                                          "PostgreSQL as another user")
            try:
                import pwd
                pw = pwd.getpwnam("postgres")
            except KeyError as exc:
                raise PostgresUnavailable(
                    "running as root and there is no `postgres` user to run the server as "
                    "(PostgreSQL refuses root); install Debian's postgresql package, which "
                    "makes it") from exc
            self._as = ["runuser", "-u", "postgres", "--"]
            self._uid, self._gid = pw.pw_uid, pw.pw_gid
        self.folder = Path(tempfile.mkdtemp(prefix="grad-edge-pg-"))
        if self._as:
            os.chown(self.folder, self._uid, self._gid)
        self.data = self.folder / "data"
        self.log = self.folder / "server.log"
        self.port = 0
        self.running = False
        try:
            self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust",
                      "-E", "UTF8", "--no-sync", "--no-instructions")
            self.start()
        except BaseException:
            self.close()
            raise

    def _run(self, tool: str, *args: str, timeout: float = 120) -> str:
        result = subprocess.run([*self._as, str(self.bindir / tool), *args],
                                capture_output=True, text=True, timeout=timeout)
        if result.returncode != 0:
            log = self.log.read_text()[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"{tool} {' '.join(args)} failed ({result.returncode}): "
                               f"{result.stderr.strip()[-2000:]}\n{log}")
        return result.stdout

    def start(self) -> None:
        """Start the server (the same port as before, once it has one)."""
        if self.running:
            return
        self.port = self.port or _free_port()
        # fsync off loses data only when the machine itself goes down; a commit is still
        # written to the kernel before it returns (synchronous_commit stays on), so killing
        # the server (`stop("immediate")`) loses nothing that was committed, as in a plant.
        options = (f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 "
                   f"-c fsync={'on' if self.fsync else 'off'} "
                   f"-c full_page_writes={'on' if self.fsync else 'off'} "
                   "-c max_connections=200")
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options,
                  "-w", "-t", "60", "start")
        self.running = True
        logger.info("throwaway PostgreSQL on 127.0.0.1:%d (%s)", self.port, self.folder)

    def stop(self, mode: str = "fast") -> None:
        """Stop the server: `fast` ends open sessions (what a restart does), `immediate`
        is a crash."""
        if not self.running:
            return
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")
        self.running = False

    def version(self) -> str:
        """The server's version string (SELECT version())."""
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=self.port, user="postgres",
                             dbname="postgres") as conn:
            return conn.execute("SELECT version()").fetchone()[0]

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """A new empty database; returns its URL."""
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=self.port, user="postgres",
                             dbname="postgres", autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def close(self) -> None:
        try:
            self.stop("immediate")
        except Exception:                       # noqa: BLE001 - cleanup: say, then go on
            logger.exception("could not stop the throwaway PostgreSQL in %s", self.folder)
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> ThrowawayPostgres:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
