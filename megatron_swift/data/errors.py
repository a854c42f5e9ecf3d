"""Bad-input reporting for the data pipeline: `DataError` (file:line messages) and the skip-and-count policy."""

from __future__ import annotations

from dataclasses import dataclass, field


class DataError(ValueError):
    """Bad input data; the message names the file, the line (or record) and the problem."""


class BadRowError(DataError):
    """A bad row met while not skipping; keeps its location and problem so a caller can name its own option."""

    def __init__(self, where: str, problem: str, option: str):
        self.where, self.problem = where, problem
        super().__init__(f"{where}: {problem} (or skip and count such rows with {option})")


class RowProblem(ValueError):
    """What is wrong with one row; whoever knows the row's file:line turns it into a DataError (or counts it)."""


@dataclass
class BadRows:
    """Raise on the first bad row, or (with `skip`) count bad rows and keep a few examples for the report."""

    skip: bool = False
    count: int = 0
    examples: list[str] = field(default_factory=list)
    option: str = "skip_bad_rows"  # how the caller's user turns skipping on, named in the error

    def report(self, where: str, problem: str) -> None:
        if not self.skip:
            raise BadRowError(where, problem, self.option)
        self.count += 1
        if len(self.examples) < 3:
            self.examples.append(f"{where}: {problem}")
