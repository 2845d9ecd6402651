"""Bad-record accounting shared by the dataset loaders, and the loaded-dataset container.

Real datasets have broken lines, missing images and empty conversations. A
loader skips each bad record, counts it by reason and warns with the file and
line, so a run on messy data still starts and the log says exactly what was
left out. ``strict=True`` turns the first bad record into a :class:`DataError`
instead (for checking a dataset before a long run).
"""

from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence

from ..packing import Sample

MAX_WARNINGS = 20  # per loader call; the rest are only counted


class DataError(ValueError):
    """A dataset file or record GhostVis cannot read (names the file and line)."""


class DataWarning(UserWarning):
    """A bad record was skipped."""


@dataclass
class BadRecords:
    """Skipped records of one load: ``count``, ``by_reason`` and ``records`` (``"file:line: reason"``)."""

    strict: bool = False
    records: list[str] = field(default_factory=list)
    by_reason: Counter = field(default_factory=Counter)

    @property
    def count(self) -> int:
        return len(self.records)

    def skip(self, file: str, line: int | str, reason: str, kind: str) -> None:
        """Record a bad record at ``file:line``; raises :class:`DataError` in strict mode.

        ``kind`` is a short category ("missing image", "broken json", ...) for the counts.
        """
        where = f"{file}:{line}: {reason}"
        if self.strict:
            raise DataError(f"{where} (strict mode: the first bad record is an error)")
        self.records.append(where)
        self.by_reason[kind] += 1
        if len(self.records) <= MAX_WARNINGS:
            warnings.warn(f"skipped bad record {where}", DataWarning, stacklevel=3)

    def summary(self) -> str:
        """One line: how many records were skipped and why."""
        if not self.records:
            return "no bad records"
        reasons = ", ".join(f"{n} {k}" for k, n in self.by_reason.most_common())
        return f"skipped {self.count} bad records ({reasons})"

    def warn_summary(self, source: str) -> None:
        """A final warning with the totals, if anything was skipped."""
        if self.records:
            more = f"; first {MAX_WARNINGS} listed above" if self.count > MAX_WARNINGS else ""
            warnings.warn(f"{source}: {self.summary()}{more}", DataWarning, stacklevel=3)


class SampleSet(Sequence):
    """Loaded samples plus what was skipped: ``samples``, ``lengths``, ``skipped`` (a :class:`BadRecords`)."""

    def __init__(self, samples: list[Sample], skipped: BadRecords | None = None):
        self.samples = samples
        self.skipped = skipped if skipped is not None else BadRecords()

    @property
    def lengths(self) -> list[int]:
        return [len(s.ids) for s in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i):
        return self.samples[i]

    def __repr__(self) -> str:
        return f"SampleSet({len(self.samples)} samples, {self.skipped.summary()})"
