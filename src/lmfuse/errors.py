"""The one exception type users see: what is wrong, where, and how to fix it."""

from __future__ import annotations


class LmfuseError(Exception):
    """A problem with the user's input or environment, phrased for the user.

    Args:
        what: What is wrong.
        where: The file, block, model or config field concerned.
        fix: What the user can do about it.
    """

    def __init__(self, what: str, where: str | None = None, fix: str | None = None):
        self.what, self.where, self.fix = what, where, fix
        parts = [what]
        if where:
            parts.append(f"  where: {where}")
        if fix:
            parts.append(f"  fix:   {fix}")
        super().__init__("\n".join(parts))
