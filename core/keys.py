"""API keys: stored as SHA-256 hashes only, one line per key.

The key file holds lines `sha256:<hex> <project> [revoked]`. The same format
serves single-node mode (a file under the data dir, written by `vbatch keys
create`) and clusters (a file mounted from a Secret). Keys are 256-bit random
tokens, so a plain SHA-256 is the right hash: there is nothing to brute-force.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import threading
from pathlib import Path

from vbatch.core.errors import PermissionDenied
from vbatch.core.projects import InvalidProjectId, check_project_id, is_project_id

KEY_PREFIX = "vb-"
log = logging.getLogger(__name__)


class InvalidKeyFile(ValueError):
    """The key file has a line that grants an id outside the project-id grammar."""


def _bad_id(project: str) -> str:
    try:
        check_project_id(project)
    except InvalidProjectId as exc:
        return str(exc)
    return ""


def hash_key(api_key: str) -> str:
    return "sha256:" + hashlib.sha256(api_key.encode("utf-8")).hexdigest()


class KeyStore:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._mtime: float | None = None
        self._grants: dict[str, tuple[str, bool]] = {}  # hash -> (project, revoked)

    def _reload_if_changed(self) -> None:
        # Re-read when the file changes, so keys created by `vbatch keys create`
        # (or a rotated Secret) apply without a restart.
        try:
            mtime = self.path.stat().st_mtime_ns
        except FileNotFoundError:
            self._grants, self._mtime = {}, None
            return
        if mtime == self._mtime:
            return
        grants: dict[str, tuple[str, bool]] = {}
        for lineno, raw in enumerate(self.path.read_text(encoding="utf-8").splitlines(), 1):
            parts = raw.split()
            if len(parts) < 2 or not parts[0].startswith("sha256:"):
                continue
            if not is_project_id(parts[1]):
                # Refused, never used: such an id could name another project's storage.
                # (`check` makes this a start-up error; a file rotated later only logs.)
                log.error("%s line %d: %s; the key is ignored", self.path, lineno, _bad_id(parts[1]))
                continue
            grants[parts[0]] = (parts[1], "revoked" in parts[2:])
        self._grants, self._mtime = grants, mtime

    def check(self) -> None:
        """Raise InvalidKeyFile naming every line whose project id breaks the grammar."""
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return
        problems = []
        for lineno, raw in enumerate(lines, 1):
            parts = raw.split()
            if len(parts) >= 2 and parts[0].startswith("sha256:") and not is_project_id(parts[1]):
                problems.append(f"line {lineno}: {_bad_id(parts[1])}")
        if problems:
            raise InvalidKeyFile(
                f"API key file {self.path}: " + "; ".join(problems[:5])
                + ". Re-create those keys with a valid --project and remove the lines."
            )

    def create(self, project: str) -> str:
        check_project_id(project)  # InvalidProjectId (a ValueError) names the rule
        api_key = KEY_PREFIX + secrets.token_urlsafe(32)
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            with os.fdopen(fd, "a", encoding="utf-8") as out:
                out.write(f"{hash_key(api_key)} {project}\n")
                out.flush()
                os.fsync(out.fileno())
        return api_key

    def revoke(self, api_key: str) -> bool:
        digest = hash_key(api_key)
        with self._lock:
            if not self.path.exists():
                return False
            lines = self.path.read_text(encoding="utf-8").splitlines()
            changed = False
            for i, raw in enumerate(lines):
                parts = raw.split()
                if parts and parts[0] == digest and "revoked" not in parts[2:]:
                    lines[i] = raw + " revoked"
                    changed = True
            if changed:
                tmp = self.path.with_suffix(".tmp")
                tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
                os.replace(tmp, self.path)
        return changed

    def authenticate(self, api_key: str, project: str) -> None:
        digest = hash_key(api_key)
        with self._lock:
            self._reload_if_changed()
            # Look the hash up, then compare in constant time anyway: the lookup
            # key is a hash of the secret, and the compare keeps timing flat.
            grant = self._grants.get(digest)
        expected = grant[0] if grant else "\x00"
        project_matches = hmac.compare_digest(expected.encode(), project.encode())
        if grant is None or grant[1] or not project_matches:
            raise PermissionDenied(
                "Invalid API key, or the key is not granted for this project.",
                code="invalid_api_key",
            )
