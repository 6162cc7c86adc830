"""The demo model for the embedded default line: GRAD trained on synthetic normal parts.

`grad-edge run edge.yaml` on a fresh machine has no model yet; with
`model.train_demo_if_missing: true` the run command calls this once (about a minute on two CPU
cores), then the line starts. The parts come from `camera_sources.synthetic`, the same
generator the demo line's producer draws from, with a different seed so the line shows the
model parts it never saw.
"""

from __future__ import annotations

import logging
from pathlib import Path

from camera_sources.synthetic import write_dataset
from grad.config import get_config
from trainer.fit import fit
from trainer.train import TrainConfig

log = logging.getLogger(__name__)

DEMO_SEED = 1000  # the line's synthetic source uses small seeds; keep training parts distinct


def train_demo_model(out: str | Path, data_dir: str | Path, n_train: int = 140,
                     config: str = "edge", epochs: tuple[int, int] = (10, 20)) -> Path:
    log.info("no model at %s: training the demo model on %d synthetic normal parts "
             "(once; a few minutes on a CPU)", out, n_train)
    root = write_dataset(data_dir, n_train=n_train, n_test_good=0, n_test_defect=0,
                         seed=DEMO_SEED)
    result = fit(root.parent, [root.name], get_config(config),
                 # 15% of 140 holds 21 parts back: at least the 20 a threshold is fitted on
                 TrainConfig(epochs_abnormal=epochs[0], epochs_normal=epochs[1], holdout=0.15),
                 out)
    log.info("demo model ready: %s (threshold %.3f)", out, result.card.calibration.threshold)
    return Path(out)
