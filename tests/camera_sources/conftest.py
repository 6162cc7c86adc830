"""Real media for the source tests: videos written with OpenCV, one brightness per frame."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest


def _write_video(path: Path, n_frames: int = 20, size: tuple[int, int] = (48, 64),
                fps: float = 20.0) -> Path:
    """An MJPG .avi whose frame i is a flat grey of level 10 * i (so order can be read back)."""
    height, width = size
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (width, height))
    assert writer.isOpened(), "OpenCV cannot write MJPG .avi here"
    for i in range(n_frames):
        writer.write(np.full((height, width, 3), (10 * i) % 256, np.uint8))
    writer.release()
    return path


def _frame_level(image: np.ndarray) -> int:
    """Which frame of write_video this is (MJPG is lossy, so round the mean)."""
    return int(round(float(image.mean()) / 10))


@pytest.fixture
def write_video():
    """``write_video(path, n_frames=20, size=(48, 64), fps=20.0) -> path``."""
    return _write_video


@pytest.fixture
def frame_level():
    """``frame_level(image) -> i``: which frame of ``write_video`` an image is."""
    return _frame_level


@pytest.fixture
def video_file(tmp_path) -> Path:
    """A 20-frame 64x48 MJPG .avi at 20 fps."""
    return _write_video(tmp_path / "line.avi")


@pytest.fixture
def modbus_registers():
    """pymodbus's own TCP server on loopback with 16 holding registers; yields
    (port, write(address, [values]))."""
    import asyncio
    import socket
    import threading
    import time

    from pymodbus.client import ModbusTcpClient
    from pymodbus.datastore import ModbusSequentialDataBlock, ModbusServerContext
    from pymodbus.server import ModbusTcpServer
    try:
        from pymodbus.datastore import ModbusDeviceContext as DeviceContext
    except ImportError:                                  # pymodbus < 3.10
        from pymodbus.datastore import ModbusSlaveContext as DeviceContext

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    loop = asyncio.new_event_loop()
    holder: dict = {}

    async def serve():
        # Old-style blocks are 1-based: a block at address 1 serves registers 0..15.
        context = ModbusServerContext(DeviceContext(hr=ModbusSequentialDataBlock(1, [0] * 16)))
        holder["server"] = ModbusTcpServer(context, address=("127.0.0.1", port))
        await holder["server"].serve_forever()

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    writer = ModbusTcpClient("127.0.0.1", port=port, timeout=2)
    deadline = time.monotonic() + 5.0
    while not writer.connect():
        assert time.monotonic() < deadline, "pymodbus server did not start"
        time.sleep(0.05)

    def write(address: int, values: list[int]) -> None:
        assert not writer.write_registers(address, values).isError()

    yield port, write

    writer.close()
    asyncio.run_coroutine_threadsafe(holder["server"].shutdown(), loop).result(5)
    thread.join(5)
    loop.close()
