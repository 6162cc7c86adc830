"""The transport keys of a line config (sources[].transport/port/key/ring_slots, network.*) and
`grad-edge produce`'s start-up checks: each mistake is one line naming the file and the key."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from edge.config import (ConfigError, Transport, describe, load_config, producer_keys,
                         worker_keys)
from edge.security import load_public, make_keys


@pytest.fixture
def folder(tmp_path) -> Path:
    make_keys(tmp_path / "keys", ["worker", "cam"])
    return tmp_path


def line(**source) -> dict:
    return {
        "model": {"path": "model.pt"},
        "sources": [{"id": "cam", "kind": "synthetic", "fps": 10, "transport": "tcp",
                     "key": "keys/cam.key", "encoder": {"kind": "none"}, **source}],
        "network": {"listen": "0.0.0.0", "worker": "gpu1", "hello_port": 5600,
                    "worker_key": "keys/worker.key"},
    }


def load(folder: Path, data: dict):
    path = folder / "line.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_config(path)


def error_of(folder: Path, data: dict) -> str:
    with pytest.raises(ConfigError) as info:
        load(folder, data)
    message = str(info.value)
    assert str(folder / "line.yaml") in message and "\n" not in message, message
    return message


def test_a_tcp_source_loads_with_its_keys_resolved_beside_the_config(folder):
    cfg = load(folder, line(port=5601))
    (src,) = cfg.sources
    assert src.transport is Transport.TCP and src.port == 5601
    assert src.key == str(folder / "keys" / "cam.key")
    assert cfg.network.worker_key == str(folder / "keys" / "worker.key")
    per_source, hello = worker_keys(cfg)
    assert per_source["cam"].allowed == {load_public(folder / "keys" / "cam.key")}
    assert hello.allowed == per_source["cam"].allowed
    client = producer_keys(cfg, "cam")
    assert client.server_public == load_public(folder / "keys" / "worker.key")


def test_ipc_stays_the_default_and_needs_no_keys(folder):
    data = line()
    data["sources"][0] = {"id": "cam", "kind": "synthetic", "fps": 10}
    cfg = load(folder, data)
    assert cfg.sources[0].transport is Transport.IPC and cfg.network.listen == "0.0.0.0"
    assert worker_keys(cfg) == ({}, None)


@pytest.mark.parametrize("change, message", [
    (lambda d: d["sources"][0].pop("key"), r"sources\[0\]\.key: required for transport tcp"),
    (lambda d: d["network"].pop("worker_key"), r"network\.worker_key: required when a source "),
    (lambda d: d["sources"][0].update(encoder={"kind": "simulated"}),
     r"sources\[0\]\.encoder\.kind: a remote source cannot share a simulated belt"),
    (lambda d: d["sources"][0].update(port=70000), r"sources\[0\]\.port: must be 1-65535"),
    (lambda d: d["sources"][0].update(port=5600), r"port 5600 is used twice"),
    (lambda d: d["sources"][0].update(transport="udp"),
     r"sources\[0\]\.transport: 'udp' is not one of: ipc, shm, tcp"),
    (lambda d: d["sources"][0].update(transport="shm"),
     r"sources\[0\]\.port: only for transport tcp|sources\[0\]\.key: only for transport tcp"),
    (lambda d: d["sources"][0].update(ring_slots=0), r"sources\[0\]\.ring_slots: must be 1-1024"),
    (lambda d: d["network"].update(hello_port=0), r"network\.hello_port: must be 1-65535"),
    (lambda d: d["network"].update(listne="0.0.0.0"), r"network\.listne: unknown key"),
    (lambda d: d["sources"][0].update(key="keys/nope.key"),
     r"sources\[0\]\.key: .*nope\.key: no such key file"),
    (lambda d: d["network"].update(worker_key="line.yaml"),
     r"network\.worker_key: .*line\.yaml: not a CURVE certificate"),
])
def test_a_transport_mistake_is_one_line_naming_the_file_and_key(folder, change, message):
    data = line(port=5601)
    change(data)
    if data["sources"][0]["transport"] == "shm":
        data["sources"][0].pop("port")
    assert re.search(message, error_of(folder, data))


def test_each_role_names_the_secret_key_it_misses(folder):
    cfg = load(folder, line())
    (folder / "keys" / "worker.key_secret").unlink()      # a camera host's copy
    with pytest.raises(ConfigError, match=r"network\.worker_key \(run needs the worker's secret "
                                          r"key beside it\): .*worker\.key_secret: no such"):
        worker_keys(cfg)
    producer_keys(cfg, "cam")                              # what produce needs is there
    (folder / "keys" / "cam.key_secret").unlink()
    with pytest.raises(ConfigError, match=r"sources\[0\]\.key \(produce needs the producer's "
                                          r"secret key beside it\)"):
        producer_keys(cfg, "cam")


def test_describe_lists_the_transport_keys():
    keys = {line.split(" ")[0] for line in describe()}       # "key (type, default): what"
    assert {"sources[].transport", "sources[].port", "sources[].key", "sources[].ring_slots",
            "network.listen", "network.worker", "network.hello_port",
            "network.worker_key"} <= keys


def produce(folder: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge.cli", "produce", str(folder / "line.yaml"),
                           *args], cwd=folder, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("source, args, message", [
    ({}, ["--source", "cam2"], "sources: no source with id 'cam2' (sources: cam)"),
    ({"transport": "ipc", "key": None}, ["--source", "cam"],
     "sources[0].transport: produce serves tcp sources; 'cam' is ipc"),
    ({"kind": "video", "path": "missing.avi"}, ["--source", "cam"],
     "sources[0] (source 'cam'): "),
])
def test_produce_exits_2_with_one_line_naming_what_is_wrong(folder, source, args, message):
    data = line(**source)
    if data["sources"][0]["key"] is None:
        del data["sources"][0]["key"]
    (folder / "line.yaml").write_text(yaml.safe_dump(data))
    done = produce(folder, *args)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr and done.stderr.count("\n") == 1, done.stderr


def test_produce_exits_2_when_the_worker_address_or_its_own_secret_key_is_missing(folder):
    data = line()
    del data["network"]["worker"]
    (folder / "line.yaml").write_text(yaml.safe_dump(data))
    done = produce(folder, "--source", "cam")
    assert done.returncode == 2 and "network.worker: required by produce" in done.stderr
    (folder / "line.yaml").write_text(yaml.safe_dump(line()))
    (folder / "keys" / "cam.key_secret").unlink()
    done = produce(folder, "--source", "cam")
    assert done.returncode == 2 and "cam.key_secret: no such key file" in done.stderr


def test_tcp_sources_split_over_two_worker_processes_are_refused_naming_the_workers(folder):
    data = line(port=5601)
    make_keys(folder / "keys", ["cam2"])
    data["sources"].append({**data["sources"][0], "id": "cam2", "port": 5602,
                            "key": "keys/cam2.key"})
    data["sources"].append({"id": "local", "kind": "synthetic", "fps": 10})
    data["workers"] = [{"id": "w0", "sources": ["cam", "local"]}, {"id": "w1", "sources": ["cam2"]}]
    message = error_of(folder, data)
    assert "workers:" in message and "w0, w1" in message and "network.hello_port" in message
    data["workers"] = [{"id": "w0", "sources": ["cam", "cam2"]}, {"id": "w1", "sources": ["local"]}]
    assert [w.sources for w in load(folder, data).workers] == [["cam", "cam2"], ["local"]]


def test_default_workers_put_every_tcp_source_in_the_first_worker(folder):
    from edge.pool import default_workers

    data = line(port=5601)
    make_keys(folder / "keys", ["cam2"])
    data["sources"] += [{"id": f"local{i}", "kind": "synthetic", "fps": 10} for i in range(3)]
    data["sources"].append({**data["sources"][0], "id": "cam2", "port": 5602,
                            "key": "keys/cam2.key"})
    workers = default_workers(load(folder, data), gpus=2)
    assert [w.sources for w in workers] == [["cam", "cam2", "local0", "local2"], ["local1"]]
    assert [w.device for w in workers] == ["cuda:0", "cuda:1"]
