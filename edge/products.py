"""Does each source still see the product its config names? A unified model's run-time check.

A unified model (one checkpoint for several products, `grad.whitening`) whitens every frame
with the statistics of the product it looks most like, and the rules compare the score with
the threshold of the product the source's config names (`sources[].product`). When the two
disagree (the line changed over and its config did not, a camera was re-aimed, the wrong
source was named) a score on one product's scale is judged by another's threshold: parts
pass or are rejected by the wrong yardstick, and nothing else would say so.

`ProductCheck` is one of the worker's observers. It asks the runner which product the first
frame of each such source looks like, and every `every`-th frame after it: one more backbone
pass (about 10 ms on a CPU, so 0.1 ms a frame at the default of 100). A frame routed to
another product is confirmed on the source's next frames before a `product_mismatch` alarm
(ERROR log, the reject sinks' alarm, the defect log), so that one odd part does not raise
it; the alarm comes once per source, and the source's return to its product is logged.
"""

from __future__ import annotations

import logging

from edge.worker import crop

log = logging.getLogger(__name__)


class ProductCheck:
    """`route(frames) -> groups or None` is the runner's (`deploy.runner.Runner.route`);
    `groups` names each group (`ModelCard.product_groups`); `sources` maps a source id to
    (its configured product, its ROI); `alarm(kind, source_id, message)` is the worker's."""

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
        self.mismatched: dict[str, str] = {}    # source -> product its frames look like
        self._votes: dict[str, int] = {}        # consecutive checks routed elsewhere

    def observe(self, frame, result, decision) -> None:
        sid = frame.source_id
        if sid not in self.sources or result.raw_score is None:
            return                               # unnamed product, or no result to trust
        n = self.seen[sid] = self.seen.get(sid, 0) + 1
        if (n - 1) % self.every and sid not in self._votes:
            return
        product, roi = self.sources[sid]
        try:
            groups = self.route(crop(frame.image, roi)[0][None])
        except Exception:
            self.errors += 1
            if self.errors == 1:     # once: a check that cannot run is not worth a log flood
                log.exception("product check failed on %s seq %d; the line goes on",
                              sid, frame.seq)
            return
        if groups is None:
            return
        looks_like = self.groups[int(groups[0])]
        self.checks[sid] = self.checks.get(sid, 0) + 1
        if looks_like == product:
            self._votes.pop(sid, None)
            if self.mismatched.pop(sid, None) is not None:
                log.warning("source %s: frames look like %s again, the product its config "
                            "names (seq %d)", sid, product, frame.seq)
            return
        self.elsewhere[sid] = self.elsewhere.get(sid, 0) + 1
        votes = self._votes[sid] = self._votes.get(sid, 0) + 1
        if votes < self.confirm:
            return                               # check the source's next frame too
        del self._votes[sid]
        if sid not in self.mismatched:
            self.mismatched[sid] = looks_like
            self.alarm("product_mismatch", sid, (
                f"PRODUCT MISMATCH: {sid} is configured as {product!r}, but its last "
                f"{self.confirm} checked frames (to seq {frame.seq}) look like {looks_like!r} "
                f"to the unified model: they are judged by {product!r}'s threshold on "
                f"{looks_like!r}'s scale. Fix sources[].product in the line config (or the "
                f"camera), or train the products as separate models"))

    @classmethod
    def for_line(cls, runner, sources, alarm, every: int) -> "ProductCheck | None":
        """The check for a line's sources (`SourceSetup`s), or None when there is nothing
        to check: no source names a product, the model serves one, or `every` is 0."""
        named = {s.source_id: (s.product, s.roi) for s in sources if s.product is not None}
        groups = runner.card.product_groups if runner.card is not None else None
        if not named or groups is None or every < 1:
            return None
        if getattr(runner, "inference", None) is None:
            log.warning("the %s backend cannot tell a unified model's products apart at run "
                        "time: sources' products (%s) are not checked", runner.backend,
                        ", ".join(sorted(named)))
            return None
        log.info("product check: %s, every %d frames", ", ".join(
            f"{sid} is {product}" for sid, (product, _) in sorted(named.items())), every)
        return cls(runner.route, groups, named, alarm, every=every)
