"""Bad-input reporting for the data pipeline: `DataError` (file:line messages) and the skip-and-count policy."""

from __future__ import annotations

from dataclasses import dataclass, field


class DataError(ValueError):
    """Bad input data; the message names the file, the line (or record) and the problem."""


class RowProblem(ValueError):
    """What is wrong with one row; whoever knows the row's file:line turns it into a DataError (or counts it)."""


@dataclass
class BadRows:
    """Raise on the first bad row, or (with `skip`) count bad rows and keep a few examples for the report."""

    skip: bool = False
    count: int = 0
    examples: list[str] = field(default_factory=list)

    def report(self, where: str, problem: str) -> None:
        message = f"{where}: {problem}"
        if not self.skip:
            raise DataError(message + " (or skip and count such rows with skip_bad_rows)")
        self.count += 1
        if len(self.examples) < 3:
            self.examples.append(message)
