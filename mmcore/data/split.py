"""One split's validated rows (:class:`Split`), whatever they were read from: a CSV
(:mod:`mmcore.data.csvs`) or WebDataset shards (:mod:`mmcore.data.webdataset`); the label
spellings both accept, and how both list problems.
"""

from __future__ import annotations

from pathlib import Path

import attrs
import numpy as np

TRUE_LABELS = {"true": 1, "1": 1, "1.0": 1}
FALSE_LABELS = {"false": 0, "0": 0, "0.0": 0}
MAX_LISTED = 10


@attrs.frozen
class Split:
    """One CSV's validated rows: resolved image paths, texts and labels (None when unlabeled)."""

    csv: Path
    paths: tuple[Path, ...]
    texts: tuple[str, ...]
    labels: tuple[int, ...] | None
    rows: tuple[int, ...]
    raw_paths: tuple[str, ...]
    #: the ``stat`` (a FileStat) of each path taken while reading the CSV (None when not checked, or after
    #: :meth:`subset`): the run's image checks reuse it, so a warm start stats each file once
    stats: tuple | None = attrs.field(default=None, eq=False, repr=False)

    def __len__(self):
        return len(self.paths)

    def label_array(self):
        return np.asarray(self.labels, dtype=np.int64)

    def spread(self, count):
        """At most ``count`` rows spread over the split in file order (:func:`spread_positions`, each
        label its share): a split sorted by label still gives rows of both."""
        return self.subset(spread_positions(len(self), count, self.labels))

    def subset(self, keep):
        """Only the rows at positions ``keep`` (e.g. dropping bad images)."""
        keep = list(keep)
        pick = lambda seq: tuple(seq[i] for i in keep)  # noqa: E731
        return attrs.evolve(
            self,
            paths=pick(self.paths),
            texts=pick(self.texts),
            labels=pick(self.labels) if self.labels is not None else None,
            rows=pick(self.rows),
            raw_paths=pick(self.raw_paths),
            stats=None,
        )


def parse_label(value):
    """True/False, 1/0, true/false (any case) -> 1/0, or None when it is none of these."""
    text = str(value).strip().lower()
    if text in TRUE_LABELS:
        return 1
    if text in FALSE_LABELS:
        return 0
    return None


def limited(problems, what, csv):
    """At most :data:`MAX_LISTED` of ``problems``, then one line counting the rest."""
    if len(problems) > MAX_LISTED:
        more = len(problems) - MAX_LISTED
        return problems[:MAX_LISTED] + [f"{csv}: ... and {more} more {what}"]
    return problems


def spread_positions(total, count, labels=None):
    """Positions of ``count`` of ``total`` rows, in file order, spread evenly over them; with
    ``labels`` each label value gets its share of ``count`` (largest remainders; at least one each
    where ``count`` allows) spread evenly over its own rows. All rows when ``count >= total``.

    >>> spread_positions(10, 3)
    [1, 5, 8]
    >>> spread_positions(6, 2, labels=[1, 1, 1, 1, 0, 0])
    [2, 5]
    """
    if count >= total:
        return list(range(total))
    groups = {}
    for position in range(total):
        groups.setdefault(0 if labels is None else labels[position], []).append(position)
    members = [groups[key] for key in sorted(groups)]
    exact = [count * len(group) / total for group in members]
    shares = [int(value) for value in exact]
    if count >= len(members):  # every label is seen once before any gets a second
        shares = [max(share, 1) for share in shares]
    by_remainder = sorted(range(len(members)), key=lambda i: (exact[i] - int(exact[i]), len(members[i])), reverse=True)
    while sum(shares) > count:  # a label raised to one took a row from the largest share
        shares[max(range(len(shares)), key=lambda i: shares[i])] -= 1
    while sum(shares) < count:  # the largest remainders first, then any label with rows left
        room = [i for i in by_remainder if shares[i] < len(members[i])]
        shares[next((i for i in room if shares[i] <= exact[i]), room[0])] += 1
    picked = []
    for group, share in zip(members, shares):
        picked += [group[int((i + 0.5) * len(group) / share)] for i in range(share)]
    return sorted(picked)
