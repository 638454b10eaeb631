"""Project ids: one grammar everywhere (keys, key files, the CRD, storage keys).

Letters, digits, `.`, `_`, `-`; starting with a letter or digit; at most 64 chars.
No `/`, so a project id can never reach another project's storage prefix.
"""

from __future__ import annotations

import re

PROJECT_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
_PROJECT_ID = re.compile(PROJECT_ID_PATTERN)


class InvalidProjectId(ValueError):
    pass


def is_project_id(value: object) -> bool:
    return isinstance(value, str) and _PROJECT_ID.fullmatch(value) is not None


def check_project_id(value: str) -> str:
    """The id itself, or InvalidProjectId naming the rule (never echoing more than 80 chars)."""
    if not is_project_id(value):
        shown = value if len(value) <= 80 else value[:80] + "..."
        raise InvalidProjectId(
            f"invalid project id {shown!r}: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return value
