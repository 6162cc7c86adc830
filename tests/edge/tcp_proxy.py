"""A TCP proxy to cut a network link for real: kill it and every connection through it breaks;
start it again and the link is back.

    python tcp_proxy.py LISTEN_HOST TARGET_HOST PORT [PORT ...]

forwards LISTEN_HOST:PORT to TARGET_HOST:PORT for each port (e.g. 127.0.0.2 -> 127.0.0.1: the
producer talks to "another host" whose traffic goes through this process). It prints
"ready" once it listens. A thread pair per connection; it holds bytes in flight like a
router does, and they are lost when it dies.
"""

from __future__ import annotations

import socket
import sys
import threading


def pipe(src: socket.socket, dst: socket.socket) -> None:
    try:
        while True:
            data = src.recv(65536)
            if not data:
                break
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def serve(listener: socket.socket, target: tuple[str, int]) -> None:
    while True:
        conn, _ = listener.accept()
        try:
            upstream = socket.create_connection(target, timeout=5)
        except OSError:
            conn.close()
            continue
        upstream.settimeout(None)
        for a, b in ((conn, upstream), (upstream, conn)):
            threading.Thread(target=pipe, args=(a, b), daemon=True).start()


def main(argv: list[str]) -> None:
    listen_host, target_host, *ports = argv
    threads = []
    for port in map(int, ports):
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((listen_host, port))
        listener.listen(16)
        threads.append(threading.Thread(target=serve, args=(listener, (target_host, port)),
                                        daemon=True))
    for t in threads:
        t.start()
    print("ready", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main(sys.argv[1:])
