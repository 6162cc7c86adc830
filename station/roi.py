"""Saving a region of interest drawn on the station into the line's config file.

The file is edited in place with ruamel.yaml's round trip, so the operator's comments and
layout survive; the edited text is loaded and validated like any config (`load_config`)
before it replaces the file (atomically, from a temporary file beside it). The running line
keeps the ROI it started with; the next start uses the new one.
"""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedSeq

from edge.config import ConfigError, load_config


def save_roi(config_path: str | os.PathLike, source_id: str,
             roi: list[int] | None) -> tuple[list[int] | None, str]:
    """Set ``sources[i].roi`` of the source `source_id`; returns (the old ROI, the key)."""
    path = Path(config_path)
    yaml = YAML()                    # round trip: comments and order kept
    yaml.preserve_quotes = True
    data = yaml.load(path.read_text())
    sources = data.get("sources") or []
    index = next((i for i, s in enumerate(sources) if str(s.get("id")) == source_id), None)
    if index is None:
        raise ConfigError(f"{path}: no source {source_id!r} under sources")
    old = sources[index].get("roi")
    old = None if old is None else [int(v) for v in old]
    if roi is None:
        sources[index].pop("roi", None)
    else:
        seq = CommentedSeq([int(v) for v in roi])
        seq.fa.set_flow_style()                # roi: [x0, y0, x1, y1]
        sources[index]["roi"] = seq
    out = io.StringIO()
    yaml.dump(data, out)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".yaml", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(out.getvalue())
        load_config(tmp)                       # refuses what the line would refuse
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return old, f"{path.name} sources[{index}].roi"
