"""Saving an ROI into a real config file: comments kept, what the line would refuse refused
(and the file left as it was)."""

from __future__ import annotations

import pytest

from edge.config import ConfigError, load_config
from station.roi import save_roi

CONFIG = """\
# plant line 3 -- do not edit without the shift lead
run_dir: run
model:
  path: model.pt   # retrained 2026-11
sources:
  - id: cam0
    kind: synthetic
    fps: 10
  - id: cam1       # the side camera
    kind: synthetic
    fps: 10
    roi: [0, 0, 64, 64]
"""


def test_save_roi_sets_that_sources_roi_and_keeps_every_comment_when_valid(tmp_path):
    path = tmp_path / "edge.yaml"
    path.write_text(CONFIG)
    old, key = save_roi(path, "cam1", [10, 20, 200, 120])
    assert old == [0, 0, 64, 64] and key == "edge.yaml sources[1].roi"
    text = path.read_text()
    assert "roi: [10, 20, 200, 120]" in text
    for comment in ("# plant line 3", "# retrained 2026-11", "# the side camera"):
        assert comment in text
    assert load_config(path).sources[1].roi == [10, 20, 200, 120]
    assert load_config(path).sources[0].roi is None
    save_roi(path, "cam1", None)                        # cleared: the whole frame again
    assert load_config(path).sources[1].roi is None


@pytest.mark.parametrize("source, roi, message", [
    ("cam0", [50, 20, 10, 120], "x0 < x1"), ("cam9", [0, 0, 5, 5], "no source 'cam9'")])
def test_save_roi_refuses_and_leaves_the_file_as_it_was_when_the_line_would_refuse_it(
        tmp_path, source, roi, message):
    path = tmp_path / "edge.yaml"
    path.write_text(CONFIG)
    with pytest.raises(ConfigError, match=message):
        save_roi(path, source, roi)
    assert path.read_text() == CONFIG
    assert [p.name for p in tmp_path.iterdir()] == ["edge.yaml"]      # no temporary left
