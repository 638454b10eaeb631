"""List pagination as the API server does it: `limit` and `continue`.

- Items come in key order (namespace, name).
- A page that leaves items behind carries `metadata.continue`: an opaque token (here, as
  in the API server, base64 JSON of the list's resourceVersion and the last key served).
- Every page of one list shows the collection as it was when the first page was read
  (a consistent snapshot at that resourceVersion), whatever changed in between; the
  pages' `metadata.resourceVersion` is that version.
- A token older than the last compaction answers 410 Expired, as etcd's does;
  a malformed one 400.
- `remainingItemCount` is set only for lists without selectors (as the API server does:
  with a selector the remainder is unknown without reading it).
"""

from __future__ import annotations

import base64
import binascii
import json
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

from .store import ResourceSpec, Store, error

Snapshot = list[dict[str, Any]]
MAX_SNAPSHOTS = 64


class Snapshots(OrderedDict):
    """(resource, namespace, selectors, resourceVersion) -> the objects of that list then,
    in key order (a continued list must keep its selectors, as the API server requires)."""

    def keep(self, key: tuple, items: Snapshot) -> None:
        self[key] = items
        self.move_to_end(key)
        while len(self) > MAX_SNAPSHOTS:
            self.popitem(last=False)


def _key(obj: dict[str, Any]) -> str:
    return f"{obj['metadata'].get('namespace') or ''}/{obj['metadata']['name']}"


def encode_token(revision: int, last_key: str) -> str:
    raw = json.dumps({"v": "meta.k8s.io/v1", "rv": revision, "start": last_key + "\x00"}).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_token(token: str) -> tuple[int, str]:
    try:
        data = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        return int(data["rv"]), str(data["start"]).removesuffix("\x00")
    except (binascii.Error, ValueError, KeyError, TypeError):
        raise error(400, "BadRequest", f"continue key is not valid: {token[:40]!r}") from None


def list_page(store: Store, snapshots: Snapshots, spec: ResourceSpec, ns: str | None,
              match: Callable[[dict[str, Any]], bool], params: Mapping[str, str]) -> dict[str, Any]:
    try:
        limit = int(params.get("limit") or 0)
    except ValueError:
        raise error(400, "BadRequest", f"limit must be an integer: {params.get('limit')!r}") from None
    token = params.get("continue") or ""
    selectors = (params.get("labelSelector") or "", params.get("fieldSelector") or "")
    if token:
        revision, after = decode_token(token)
        items = snapshots.get((spec.resource, ns, selectors, revision))
        if items is None or revision < store.compacted:
            raise error(410, "Expired", "The provided continue parameter is too old to display a consistent list "
                        "result. You can start a new list without the continue parameter.")
        items = [o for o in items if _key(o) > after]
    else:
        revision = store.revision
        items = store.list(spec.resource, ns, match)
    page = items[:limit] if limit else items
    metadata: dict[str, Any] = {"resourceVersion": str(revision)}
    if limit and len(items) > limit:
        snapshots.keep((spec.resource, ns, selectors, revision), items)
        metadata["continue"] = encode_token(revision, _key(page[-1]))
        if not any(selectors):
            metadata["remainingItemCount"] = len(items) - limit
    return {"apiVersion": spec.api_version, "kind": f"{spec.kind}List", "metadata": metadata, "items": page}
