"""Does each source still see the product its config names? A unified model's run-time check.

A unified model (one checkpoint for several products, `grad.whitening`) whitens every frame
with the statistics of the product it looks most like, and the rules compare the score with
the threshold of the product the source's config names (`sources[].product`). When the two
disagree (the line changed over and its config did not, a camera was re-aimed, the wrong
source was named) a score on one product's scale is judged by another's threshold: parts
pass or are rejected by the wrong yardstick, and nothing else would say so.

`ProductCheck` watches the worker's judged frames (an observer) and marks a source's first
frame, and every `every`-th after it, for a check; the checks run once the whole batch is
judged and its rejects scheduled (`Worker.after_batch`), at most one per source and batch.
A check asks the runner which product the frame looks like: one more backbone pass (about
10 ms on a CPU: 0.1 ms a frame at the default of 100). A source's standing (its product, or
another) changes only after `confirm` checks in a row say so, the source's next frames
checked meanwhile, so one odd part neither raises nor clears anything. Turning to another
product raises one `product_mismatch` alarm (ERROR log, the reject sinks' alarm, the defect
log); turning back is logged.
"""

from __future__ import annotations

import logging

from edge.worker import crop

log = logging.getLogger(__name__)


class ProductCheck:
    """`route(frames) -> groups or None` is the runner's (`deploy.runner.Runner.route`);
    `groups` names each group (`ModelCard.product_groups`); `sources` maps a source id to
    (its configured product, one of `groups`, and its ROI); `alarm(kind, source_id,
    message)` is the worker's."""

    def __init__(self, route, groups: list[str], sources: dict[str, tuple[str, list | None]],
                 alarm, *, every: int = 100, confirm: int = 3):
        if every < 1 or confirm < 1:
            raise ValueError(f"every and confirm must be >= 1, got {every}, {confirm}")
        self.route = route
        self.groups = groups
        self.sources = sources
        self.alarm = alarm
        self.every = every
        self.confirm = confirm
        self.seen: dict[str, int] = {}          # judged frames per source
        self.checks: dict[str, int] = {}        # frames routed, per source
        self.elsewhere: dict[str, int] = {}     # ... of which to another product
        self.errors = 0
        self.mismatched: dict[str, str] = {}    # source -> the product its frames look like
        self._streak: dict[str, int] = {}       # checks in a row against the source's standing
        self._due: dict = {}                    # source -> a frame to check after this batch

    def observe(self, frame, result, decision) -> None:
        sid = frame.source_id
        if sid not in self.sources or result.raw_score is None:
            return                               # unnamed product, or no result to trust
        n = self.seen[sid] = self.seen.get(sid, 0) + 1
        if (n - 1) % self.every == 0 or sid in self._streak:
            self._due.setdefault(sid, frame)     # the batch's first due frame of the source

    def after_batch(self) -> None:
        """Run the checks this batch made due."""
        due, self._due = self._due, {}
        for sid, frame in due.items():
            self._check(sid, frame)

    def _check(self, sid: str, frame) -> None:
        product, roi = self.sources[sid]
        try:
            groups = self.route(crop(frame.image, roi)[0][None])
        except Exception:
            self.errors += 1
            self._streak.pop(sid, None)          # no retry on every frame of a failing check
            if self.errors == 1:     # once: a check that cannot run is not worth a log flood
                log.exception("product check failed on %s seq %d; the line goes on",
                              sid, frame.seq)
            return
        if groups is None:
            return
        looks_like = self.groups[int(groups[0])]
        self.checks[sid] = self.checks.get(sid, 0) + 1
        if looks_like != product:
            self.elsewhere[sid] = self.elsewhere.get(sid, 0) + 1
        if (looks_like != product) == (sid in self.mismatched):
            self._streak.pop(sid, None)          # agrees with the source's standing
            return
        streak = self._streak[sid] = self._streak.get(sid, 0) + 1
        if streak < self.confirm:
            return                               # check the source's next frame too
        del self._streak[sid]
        if sid in self.mismatched:
            del self.mismatched[sid]
            log.warning("source %s: frames look like %s again, the product its config names "
                        "(seq %d)", sid, product, frame.seq)
            return
        self.mismatched[sid] = looks_like
        self.alarm("product_mismatch", sid, (
            f"PRODUCT MISMATCH: {sid} is configured as {product!r}, but its last "
            f"{self.confirm} checked frames (to seq {frame.seq}) look like {looks_like!r} to "
            f"the unified model: their scores, on the scale of {looks_like!r}, are judged by "
            f"the threshold of {product!r}. Fix sources[].product in the line config (or the "
            f"camera), or train the products as separate models"))

    @classmethod
    def for_line(cls, runner, sources, alarm, every: int) -> "ProductCheck | None":
        """The check for a line's sources (`SourceSetup`s), or None when there is nothing
        to check: no source names a product, the model serves one, or `every` is 0."""
        named = {s.source_id: (s.product, s.roi) for s in sources if s.product is not None}
        groups = runner.card.product_groups if runner.card is not None else None
        if not named or groups is None or every < 1:
            return None
        # A product added by `grad-edge calibrate --product` after training has no
        # statistics of its own: its frames are whitened as the product they look like, and
        # its threshold was fitted on exactly those scores. Nothing to check against.
        untrained = sorted(sid for sid, (product, _) in named.items() if product not in groups)
        if untrained:
            log.info("product check: %s not checked: their products were calibrated, not "
                     "trained (the model learned %s)", ", ".join(untrained), ", ".join(groups))
        named = {sid: v for sid, v in named.items() if sid not in untrained}
        if not named:
            return None
        if getattr(runner, "inference", None) is None:
            log.warning("the %s backend cannot tell a unified model's products apart at run "
                        "time: sources' products (%s) are not checked", runner.backend,
                        ", ".join(sorted(named)))
            return None
        log.info("product check: %s, every %d frames", ", ".join(
            f"{sid} is {product}" for sid, (product, _) in sorted(named.items())), every)
        return cls(runner.route, groups, named, alarm, every=every)
