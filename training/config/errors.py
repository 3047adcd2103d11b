"""The one error every config problem is reported through: all problems, one per line."""

from __future__ import annotations


class ConfigError(ValueError):
    """Every problem found in a run configuration, one per line."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))

    def report(self) -> str:
        lines = [f"invalid configuration ({len(self.problems)} problem(s)):"]
        lines += [f"  - {p}" for p in self.problems]
        return "\n".join(lines)

