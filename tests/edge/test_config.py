"""`edge.yaml` loading: the repo's own file, and every way a person can get one wrong."""

from __future__ import annotations

import copy
import dataclasses
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml

from edge.config import ConfigError, LineConfig, SourceKind, describe, load_config
from edge.protocol import DropPolicy

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def repo_yaml() -> dict:
    return yaml.safe_load((REPO / "edge.yaml").read_text())


def write(tmp_path: Path, data, name: str = "line.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def error_of(tmp_path: Path, data, name: str = "line.yaml") -> str:
    path = write(tmp_path, data, name)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message, message      # every error names the file
    assert "\n" not in message                # ... on one line
    return message


def edited(data: dict, change) -> dict:
    data = copy.deepcopy(data)
    change(data)
    return data


# --- the repo's file ---------------------------------------------------------------------------

def test_load_config_reads_the_repo_edge_yaml_when_unchanged():
    cfg = load_config(REPO / "edge.yaml")
    assert isinstance(cfg, LineConfig)
    (src,) = cfg.sources
    assert src.id == "line1" and src.kind is SourceKind.SYNTHETIC
    assert src.drop_policy is DropPolicy.EVERY_FRAME and src.frames == 300
    assert cfg.worker.max_batch == 8 and cfg.reject.camera_to_ejector_counts == 1000
    assert cfg.source_file == str(REPO / "edge.yaml") and len(cfg.config_hash) == 16
    # Relative paths are the repo's, not the test's working folder.
    assert cfg.run_dir == str(REPO / "runs" / "demo")
    assert cfg.defect_log.url == f"sqlite:///{REPO / 'runs' / 'demo' / 'defects.db'}"


def all_keys(cls=LineConfig, prefix: str = "") -> list[str]:
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get("internal"):
            continue
        keys.append(prefix + f.name)
        tp = hints[f.name]
        inner = [a for a in (tp, *typing.get_args(tp)) if dataclasses.is_dataclass(a)]
        if inner:
            sep = {list: "[].", dict: ".<id>."}.get(typing.get_origin(tp), ".")
            keys.extend(all_keys(inner[0], prefix + f.name + sep))
    return keys


DESCRIBED = re.compile(r"^(\S+) \(([^()]*)\): (.+)$")


def test_describe_lists_every_key_with_type_default_and_description_when_asked():
    lines = describe()
    parsed = [DESCRIBED.match(line) for line in lines]
    assert all(parsed), [line for line, m in zip(lines, parsed) if not m]
    described = {m[1]: (m[2], m[3]) for m in parsed}
    keys = all_keys()
    assert set(described) == set(keys)
    assert {"worker.max_batch", "sources[].drop_policy", "sources[].encoder.counts_per_frame",
            "rules.per_source.<id>.threshold", "reject.sinks[].endpoint", "station.bind",
            "keep.band", "metrics.port"} <= set(described)
    assert all(described[k][1].strip() for k in keys)
    assert described["worker.max_batch"][0] == "int, default 8"
    assert described["sources[].drop_policy"][0] == "every_frame | latest, default every_frame"
    assert described["rules.default.threshold"][0] == "float or null, default null"
    assert described["model.path"][0] == "string, required"
    assert described["station.bind"][0] == "string, default 127.0.0.1"


def test_cli_run_describe_config_prints_every_key_when_asked(tmp_path):
    r = subprocess.run([sys.executable, "-m", "edge.cli", "run", "--describe-config"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    printed = {line.split(" (", 1)[0] for line in r.stdout.splitlines()}
    assert set(all_keys()) <= printed


# --- unknown keys ------------------------------------------------------------------------------

def test_load_config_rejects_an_unknown_key_when_it_is_at_the_top_level(tmp_path, repo_yaml):
    message = error_of(tmp_path, edited(repo_yaml, lambda d: d.update(wokrer={"max_batch": 2})))
    assert "wokrer" in message and "unknown key" in message
    assert "worker" in message          # what it could have been
    assert ": :" not in message         # no empty key path


def test_load_config_names_the_key_path_when_an_unknown_key_is_nested(tmp_path, repo_yaml):
    message = error_of(tmp_path, edited(repo_yaml, lambda d: d["worker"].update(max_bach=4)))
    assert "worker.max_bach" in message and "unknown key" in message
    assert "max_batch" in message


def test_load_config_names_the_list_index_when_an_unknown_key_is_inside_a_list(
        tmp_path, repo_yaml):
    message = error_of(tmp_path, edited(repo_yaml, lambda d: d["sources"][0].update(colour="red")))
    assert "sources[0].colour" in message and "unknown key" in message


# --- bad values --------------------------------------------------------------------------------

def test_load_config_lists_the_choices_when_an_enum_value_is_misspelt(tmp_path, repo_yaml):
    message = error_of(tmp_path, edited(
        repo_yaml, lambda d: d["sources"][0].update(drop_policy="lates")))
    assert "sources[0].drop_policy" in message and "'lates'" in message
    assert "every_frame" in message and "latest" in message


def test_load_config_rejects_a_value_of_the_wrong_type_when_a_number_is_a_word(
        tmp_path, repo_yaml):
    message = error_of(tmp_path, edited(repo_yaml, lambda d: d["worker"].update(max_batch="eight")))
    assert "worker.max_batch" in message and "int" in message and "eight" in message


def test_load_config_rejects_a_boolean_when_an_integer_is_expected(tmp_path, repo_yaml):
    message = error_of(tmp_path, edited(repo_yaml, lambda d: d["worker"].update(max_batch=True)))
    assert "worker.max_batch" in message


def test_load_config_rejects_a_negative_product_check_interval(tmp_path, repo_yaml):
    message = error_of(tmp_path, edited(
        repo_yaml, lambda d: d["worker"].update(product_check_every=-1)))
    assert "worker.product_check_every" in message and "0 = never" in message
    cfg = load_config(write(tmp_path, edited(
        repo_yaml, lambda d: d["worker"].update(product_check_every=0))))
    assert cfg.worker.product_check_every == 0


def test_load_config_names_a_missing_required_key_when_a_source_has_no_kind(tmp_path, repo_yaml):
    message = error_of(tmp_path, edited(repo_yaml, lambda d: d["sources"][0].pop("kind")))
    assert "sources[0].kind" in message and "required" in message


def test_load_config_rejects_duplicate_source_ids_when_two_sources_share_one(tmp_path, repo_yaml):
    def dup(d):
        d["sources"].append(dict(d["sources"][0], seed=1))
    message = error_of(tmp_path, edited(repo_yaml, dup))
    assert "duplicate" in message and "line1" in message


def test_load_config_rejects_per_source_rules_when_they_name_a_missing_source(tmp_path, repo_yaml):
    message = error_of(tmp_path, edited(
        repo_yaml, lambda d: d["rules"].update(per_source={"line2": {"k": 1}})))
    assert "rules.per_source.line2" in message and "line1" in message


def test_load_config_accepts_per_source_rules_when_they_name_a_real_source(tmp_path, repo_yaml):
    cfg = load_config(write(tmp_path, edited(
        repo_yaml, lambda d: d["rules"].update(per_source={"line1": {"threshold": 2.5}}))))
    assert cfg.rules.per_source["line1"].threshold == 2.5
    assert cfg.rules.per_source["line1"].k == 1          # the rest from the defaults


def test_load_config_names_the_missing_field_when_a_sink_lacks_it(tmp_path, repo_yaml):
    message = error_of(tmp_path, edited(
        repo_yaml, lambda d: d["reject"]["sinks"].append({"kind": "zmq_pub"})))
    assert "reject.sinks[1].endpoint" in message and "zmq_pub" in message


def test_load_config_rejects_an_unknown_sink_kind_when_misspelt(tmp_path, repo_yaml):
    message = error_of(tmp_path, edited(
        repo_yaml, lambda d: d["reject"]["sinks"].append({"kind": "modbu", "host": "plc"})))
    assert "reject.sinks[1].kind" in message and "modbus" in message


def test_load_config_rejects_a_roi_when_its_corners_are_swapped(tmp_path, repo_yaml):
    message = error_of(tmp_path, edited(
        repo_yaml, lambda d: d["sources"][0].update(roi=[100, 0, 50, 64])))
    assert "sources[0].roi" in message


# --- paths and files ---------------------------------------------------------------------------

def test_load_config_resolves_relative_paths_against_the_config_folder_when_run_elsewhere(
        tmp_path, repo_yaml, monkeypatch):
    folder = tmp_path / "plant" / "line7"
    folder.mkdir(parents=True)
    data = edited(repo_yaml, lambda d: (
        d["rules"]["default"].update(roi_mask="masks/roi.png"),
        d["sources"].append({"id": "cam2", "kind": "video", "path": "clips/a.avi"})))
    path = write(folder, data)
    monkeypatch.chdir(tmp_path)            # somewhere else entirely
    cfg = load_config(Path("plant/line7/line.yaml"))
    assert cfg.run_dir == str(folder / "runs" / "demo")
    assert cfg.model.path == str(folder / "runs" / "demo" / "model.pt")
    assert cfg.defect_log.url == f"sqlite:///{folder / 'runs' / 'demo' / 'defects.db'}"
    assert cfg.defect_log.images == str(folder / "runs" / "demo" / "images")
    assert cfg.reject.sinks[0].path == str(folder / "runs" / "demo" / "rejects.jsonl")
    assert cfg.sources[1].path == str(folder / "clips" / "a.avi")
    assert cfg.rules.default.roi_mask == str(folder / "masks" / "roi.png")
    assert path.is_file()


def test_load_config_keeps_absolute_paths_and_urls_when_given(tmp_path, repo_yaml):
    data = edited(repo_yaml, lambda d: (
        d.update(run_dir="/var/lib/grad-edge/run"),
        d["defect_log"].update(url="postgresql://db.example/line")))
    cfg = load_config(write(tmp_path, data))
    assert cfg.run_dir == "/var/lib/grad-edge/run"
    assert cfg.defect_log.url == "postgresql://db.example/line"


def test_load_config_reports_invalid_yaml_with_the_file_name_when_it_does_not_parse(tmp_path):
    path = write(tmp_path, "model:\n  path: [unclosed\nsources: {\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value) and "YAML" in str(info.value)


def test_load_config_says_so_when_the_file_does_not_exist(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "nope.yaml")


def test_load_config_rejects_a_file_when_it_is_not_a_mapping(tmp_path):
    message = error_of(tmp_path, "- just\n- a list\n")
    assert "mapping" in message


# --- the command line --------------------------------------------------------------------------

def test_cli_run_exits_2_with_one_error_line_when_the_config_has_an_unknown_key(
        tmp_path, repo_yaml):
    path = write(tmp_path, edited(repo_yaml, lambda d: d["worker"].update(max_bach=4)), "bad.yaml")
    r = subprocess.run([sys.executable, "-m", "edge.cli", "run", str(path)], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr
    assert "worker.max_bach" in lines[0] and "bad.yaml" in lines[0]
    assert not (tmp_path / "runs").exists()     # nothing started


def test_cli_run_exits_2_with_one_error_line_when_the_yaml_does_not_parse(tmp_path):
    path = write(tmp_path, "model:\n  path: [unclosed\nsources: {\n", "broken.yaml")
    r = subprocess.run([sys.executable, "-m", "edge.cli", "run", str(path)], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "broken.yaml" in lines[0], r.stderr


def test_load_config_reads_the_product_each_source_sees_when_a_model_serves_several(
        tmp_path, repo_yaml):
    cfg = load_config(write(tmp_path, edited(repo_yaml,
                                             lambda d: d["sources"][0].update(product="tile"))))
    assert cfg.sources[0].product == "tile"
    assert load_config(REPO / "edge.yaml").sources[0].product is None
