"""The emulator's state: objects, resource versions, the event log, deletion semantics.

Synchronous and single-threaded by design: the emulator calls it from its event loop
only, so every operation is atomic without locks. Objects live in kmock's
`ObjectsArray`, so tests keep kmock's history assertions
(`emulator.objects['vbatch.dev/v1alpha1/batches', 'ns', 'n', :]`).
"""

from __future__ import annotations

import collections
import copy
import datetime
import random
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import kmock

from . import semantics
from .selectors import Predicate

Key = tuple[kmock.resource, str | None, str]
_NAME_CHARS = "bcdfghjklmnpqrstvwxz2456789"  # the API server's generateName alphabet
FOREGROUND = "foregroundDeletion"  # metav1.FinalizerDeleteDependents


def error(code: int, reason: str, message: str, **details: Any) -> kmock.KubernetesError:
    # Never empty: kmock fills empty details with a server-side traceback.
    return kmock.KubernetesError(status=code, reason=reason, message=message, details=details or {"causes": []})


def now_rfc3339() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class ResourceSpec:
    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool = True
    singular: str = ""
    shortnames: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()
    status_subresource: bool = False
    schema: dict[str, Any] | None = None  # openAPIV3Schema (CRDs only)
    printer_columns: list[dict[str, Any]] | None = None
    # Deleting without a propagationPolicy orphans dependents for some legacy kinds (Jobs).
    default_propagation: str = "Background"
    # Served from a CRD: no strategic merge patch (the API server answers 415).
    custom: bool = False

    @property
    def resource(self) -> kmock.resource:
        return kmock.resource(self.group, self.version, self.plural)

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version


@dataclass
class WatchEvent:
    revision: int
    resource: kmock.resource
    type: str  # ADDED, MODIFIED, DELETED
    obj: dict[str, Any]
    old: dict[str, Any] | None = None


@dataclass
class Store:
    objects: kmock.ObjectsArray = field(default_factory=kmock.ObjectsArray)
    specs: dict[kmock.resource, ResourceSpec] = field(default_factory=dict)
    revision: int = 1
    log: collections.deque[WatchEvent] = field(default_factory=lambda: collections.deque(maxlen=10_000))
    # Watches from a revision at or below this one get 410 Gone (their events are lost).
    compacted: int = 0
    on_change: list[Callable[[], None]] = field(default_factory=list)
    on_register: list[Callable[[ResourceSpec], None]] = field(default_factory=list)

    # --- resources ---------------------------------------------------------------

    def register(self, spec: ResourceSpec) -> None:
        self.specs[spec.resource] = spec
        for hook in self.on_register:
            hook(spec)

    def spec(self, resource: kmock.resource) -> ResourceSpec:
        try:
            return self.specs[resource]
        except KeyError:
            raise error(404, "NotFound", f"the server could not find the requested resource {resource}") from None

    # --- reading -------------------------------------------------------------------

    def _live(self, key: Key) -> dict[str, Any] | None:
        if key not in self.objects or self.objects[key].deleted:
            return None
        return self.objects[key].raw

    def get(self, resource: kmock.resource, namespace: str | None, name: str) -> dict[str, Any]:
        spec = self.spec(resource)
        obj = self._live((resource, namespace if spec.namespaced else None, name))
        if obj is None:
            raise error(404, "NotFound", f'{spec.plural}.{spec.group} "{name}" not found',
                        name=name, group=spec.group, kind=spec.plural)
        return copy.deepcopy(obj)

    def iter_live(self, resource: kmock.resource | None = None) -> Iterator[tuple[Key, dict[str, Any]]]:
        for key in list(self.objects.keys()):
            if resource is None or key[0] == resource:
                obj = self._live(key)
                if obj is not None:
                    yield key, obj

    def list(self, resource: kmock.resource, namespace: str | None, match: Predicate) -> list[dict[str, Any]]:
        self.spec(resource)
        items = [
            copy.deepcopy(obj)
            for (_, ns, _), obj in self.iter_live(resource)
            if (namespace is None or ns == namespace) and match(obj)
        ]
        return sorted(items, key=lambda o: (o["metadata"].get("namespace") or "", o["metadata"]["name"]))

    # --- writing -------------------------------------------------------------------

    def _record(self, resource: kmock.resource, type_: str, obj: dict, old: dict | None = None) -> None:
        if len(self.log) == self.log.maxlen:
            self.compacted = self.log[0].revision
        self.log.append(WatchEvent(self.revision, resource, type_, copy.deepcopy(obj), old))
        for hook in self.on_change:
            hook()

    def _bump(self, obj: dict[str, Any]) -> None:
        self.revision += 1
        obj["metadata"]["resourceVersion"] = str(self.revision)

    def compact(self) -> None:
        """Forget the event log, as etcd compaction does: older watches then get 410 Gone."""
        self.log.clear()
        self.compacted = self.revision

    def _admit(self, spec: ResourceSpec, obj: dict[str, Any]) -> dict[str, Any]:
        """What the API server does to a CR body on every write: default, prune, validate."""
        if spec.schema is None:
            return obj
        obj = semantics.prune(spec.schema, semantics.apply_defaults(spec.schema, obj))
        problems = semantics.schema_errors(spec.schema, obj)
        if problems:
            name = obj.get("metadata", {}).get("name", "")
            raise error(422, "Invalid", f'{spec.kind}.{spec.group} "{name}" is invalid: ' + "; ".join(problems),
                        name=name, group=spec.group, kind=spec.kind)
        return obj

    def create(self, resource: kmock.resource, namespace: str | None, body: Any) -> dict[str, Any]:
        spec = self.spec(resource)
        if not isinstance(body, dict):
            raise error(400, "BadRequest", "the body must be a JSON object")
        obj = copy.deepcopy(body)
        meta = obj.setdefault("metadata", {})
        if spec.namespaced:
            namespace = namespace or meta.get("namespace")
            if meta.get("namespace", namespace) != namespace:
                raise error(400, "BadRequest", "the namespace of the object does not match the namespace in the URL")
            meta["namespace"] = namespace
        else:
            namespace = None
            meta.pop("namespace", None)
        if not meta.get("name"):
            if not meta.get("generateName"):
                raise error(422, "Invalid", "metadata.name or metadata.generateName is required")
            meta["name"] = meta["generateName"] + "".join(random.choices(_NAME_CHARS, k=5))
        key = (resource, namespace, meta["name"])
        if self._live(key) is not None:
            raise error(409, "AlreadyExists", f'{spec.plural}.{spec.group} "{meta["name"]}" already exists',
                        name=meta["name"], group=spec.group, kind=spec.plural)
        obj["apiVersion"], obj["kind"] = spec.api_version, spec.kind
        for server_owned in ("deletionTimestamp", "deletionGracePeriodSeconds", "resourceVersion"):
            meta.pop(server_owned, None)
        meta.update(uid=str(uuid.uuid4()), creationTimestamp=now_rfc3339(), generation=1)
        if spec.status_subresource:
            obj.pop("status", None)  # status is written through /status only
        obj = self._admit(spec, obj)
        self._bump(obj)
        if key in self.objects:
            self.objects[key].create(obj)
        else:
            self.objects[key] = obj
        self._record(resource, "ADDED", obj)
        if resource == kmock.resource("apiextensions.k8s.io", "v1", "customresourcedefinitions"):
            from .crds import spec_from_crd  # late: crds imports this module

            for crd_spec in spec_from_crd(obj):
                self.register(crd_spec)
        return copy.deepcopy(obj)

    def update(
        self,
        resource: kmock.resource,
        namespace: str | None,
        name: str,
        mutate: Callable[[dict[str, Any]], dict[str, Any]],
        *,
        subresource: str | None = None,
    ) -> dict[str, Any]:
        """Replace or patch: `mutate` maps the current body to the requested one."""
        spec = self.spec(resource)
        old = self.get(resource, namespace, name)
        wanted = mutate(copy.deepcopy(old))
        if not isinstance(wanted, dict):
            raise error(400, "BadRequest", "the result must be a JSON object")
        wanted_rv = (wanted.get("metadata") or {}).get("resourceVersion")
        if wanted_rv and wanted_rv != old["metadata"]["resourceVersion"]:
            raise error(409, "Conflict", f'Operation cannot be fulfilled on {spec.plural}.{spec.group} "{name}": '
                        "the object has been modified; please apply your changes to the latest version and try again",
                        name=name, group=spec.group, kind=spec.plural)
        if subresource == "status":
            new = copy.deepcopy(old)
            if "status" in wanted:
                new["status"] = wanted["status"]
            else:
                new.pop("status", None)
        elif subresource:
            raise error(404, "NotFound", f"the server could not find the requested resource ({subresource})")
        else:
            new = wanted
            if spec.status_subresource:
                new.pop("status", None)
                if "status" in old:
                    new["status"] = old["status"]
        self._protect_metadata(old, new)
        new["apiVersion"], new["kind"] = spec.api_version, spec.kind
        new = self._admit(spec, new)
        if new == old:
            return old  # a no-op write changes nothing, not even resourceVersion
        ignored = ("metadata", "status") if spec.status_subresource else ("metadata",)
        if {k: v for k, v in new.items() if k not in ignored} != {k: v for k, v in old.items() if k not in ignored}:
            new["metadata"]["generation"] = old["metadata"].get("generation", 1) + 1
        self._bump(new)
        key = (resource, new["metadata"].get("namespace"), name)
        self.objects[key].history.append(new)
        self._record(resource, "MODIFIED", new, old)
        if new["metadata"].get("deletionTimestamp") and not new["metadata"].get("finalizers"):
            return self._remove(spec, key, new)
        return copy.deepcopy(new)

    @staticmethod
    def _protect_metadata(old: dict[str, Any], new: dict[str, Any]) -> None:
        meta = new.setdefault("metadata", {})
        for owned in ("name", "namespace", "uid", "creationTimestamp", "generation", "resourceVersion",
                      "deletionTimestamp", "deletionGracePeriodSeconds"):
            if owned in old["metadata"]:
                meta[owned] = old["metadata"][owned]
            else:
                meta.pop(owned, None)
        if old["metadata"].get("deletionTimestamp"):
            # An object being deleted may lose finalizers but never gain new ones
            # (apimachinery's ValidateObjectMetaUpdate: 422, the write is refused).
            kept = set(old["metadata"].get("finalizers") or [])
            added = [f for f in meta.get("finalizers") or [] if f not in kept]
            if added:
                listed = ", ".join(f'"{f}"' for f in added)
                raise error(422, "Invalid", f'{old.get("kind", "object")} "{old["metadata"]["name"]}" is invalid: '
                            "metadata.finalizers: Forbidden: no new finalizers can be added if the object is being "
                            f"deleted, found new finalizers []string{{{listed}}}",
                            name=old["metadata"]["name"], kind=old.get("kind", ""))

    def delete(self, resource: kmock.resource, namespace: str | None, name: str,
               *, propagation: str | None = None, precondition_rv: str | None = None) -> dict[str, Any]:
        spec = self.spec(resource)
        obj = self.get(resource, namespace, name)
        if precondition_rv and precondition_rv != obj["metadata"]["resourceVersion"]:
            raise error(409, "Conflict", "Precondition failed: resourceVersion mismatch")
        key = (resource, obj["metadata"].get("namespace"), name)
        propagation = propagation or spec.default_propagation
        if propagation not in ("Orphan", "Foreground", "Background"):
            raise error(422, "Invalid", f'DeleteOptions.meta.k8s.io "" is invalid: propagationPolicy: Unsupported '
                        f'value: "{propagation}": supported values: "Foreground", "Background", "Orphan"')
        if propagation == "Orphan":
            self._orphan(obj["metadata"]["uid"])
        elif propagation == "Foreground" and not obj["metadata"].get("deletionTimestamp"):
            # The API server marks the owner with the foregroundDeletion finalizer; the
            # garbage collector deletes the dependents and removes the finalizer once no
            # dependent with blockOwnerDeletion is left (see _release_owners).
            old = copy.deepcopy(obj)
            finalizers = list(obj["metadata"].get("finalizers") or [])
            obj["metadata"]["finalizers"] = finalizers + [FOREGROUND] if FOREGROUND not in finalizers else finalizers
            obj["metadata"].update(deletionTimestamp=now_rfc3339(), deletionGracePeriodSeconds=0)
            self._bump(obj)
            self.objects[key].history.append(obj)
            self._record(resource, "MODIFIED", obj, old)
            self._cascade(obj["metadata"]["uid"], "Foreground")
            self._release_owner(obj["metadata"]["uid"])
            live = self._live(key)
            return copy.deepcopy(live if live is not None else obj)
        if obj["metadata"].get("finalizers"):
            if obj["metadata"].get("deletionTimestamp"):
                return obj
            old = copy.deepcopy(obj)
            obj["metadata"].update(deletionTimestamp=now_rfc3339(), deletionGracePeriodSeconds=0)
            self._bump(obj)
            self.objects[key].history.append(obj)
            self._record(resource, "MODIFIED", obj, old)
            return copy.deepcopy(obj)
        return self._remove(spec, key, obj)

    def _remove(self, spec: ResourceSpec, key: Key, obj: dict[str, Any]) -> dict[str, Any]:
        self.revision += 1
        obj = copy.deepcopy(obj)
        obj["metadata"]["resourceVersion"] = str(self.revision)
        self.objects[key].delete()
        self._record(spec.resource, "DELETED", obj)
        # Garbage collection, as kube-controller-manager does it (but at once).
        self._cascade(obj["metadata"]["uid"], "Background")
        for ref in obj["metadata"].get("ownerReferences") or []:
            if ref.get("blockOwnerDeletion"):
                self._release_owner(ref.get("uid"))
        return obj

    def _release_owner(self, owner_uid: str | None) -> None:
        """An owner in foreground deletion goes once no blocking dependent remains."""
        owner = next(((k, o) for k, o in self.iter_live() if o["metadata"].get("uid") == owner_uid), None)
        if owner is None:
            return
        (resource, namespace, name), obj = owner
        if FOREGROUND not in (obj["metadata"].get("finalizers") or []) or not obj["metadata"].get("deletionTimestamp"):
            return
        blocking = [key for key in self._dependents(owner_uid)
                    if any(r.get("uid") == owner_uid and r.get("blockOwnerDeletion")
                           for r in self._live(key)["metadata"].get("ownerReferences") or [])]
        if blocking:
            return

        def drop(current: dict[str, Any]) -> dict[str, Any]:
            current["metadata"]["finalizers"] = [f for f in current["metadata"]["finalizers"] if f != FOREGROUND]
            if not current["metadata"]["finalizers"]:
                del current["metadata"]["finalizers"]
            return current

        self.update(resource, namespace, name, drop)

    def _dependents(self, owner_uid: str) -> list[Key]:
        return [
            key for key, obj in self.iter_live()
            if any(ref.get("uid") == owner_uid for ref in obj["metadata"].get("ownerReferences") or [])
        ]

    def _cascade(self, owner_uid: str, propagation: str) -> None:
        for resource, namespace, name in self._dependents(owner_uid):
            if self._live((resource, namespace, name)) is not None:
                self.delete(resource, namespace, name, propagation=propagation)

    def _orphan(self, owner_uid: str) -> None:
        def drop_ref(obj: dict[str, Any]) -> dict[str, Any]:
            refs = [r for r in obj["metadata"].get("ownerReferences") or [] if r.get("uid") != owner_uid]
            obj["metadata"]["ownerReferences"] = refs or None
            if not refs:
                del obj["metadata"]["ownerReferences"]
            return obj

        for resource, namespace, name in self._dependents(owner_uid):
            self.update(resource, namespace, name, drop_ref)

    # --- watching ----------------------------------------------------------------

    def events_after(self, revision: int, resource: kmock.resource) -> list[WatchEvent]:
        if revision < self.compacted:
            raise error(410, "Expired", f"too old resource version: {revision} ({self.compacted})")
        return [e for e in self.log if e.revision > revision and e.resource == resource]
