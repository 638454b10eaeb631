"""The Kubernetes API emulator: kmock's KubernetesScaffold plus a real API-server core.

kmock 0.8 contributes the HTTP server, discovery documents (/api, /apis, /apis/g/v from
`resources`), the Status error envelope and its request DSL (tests may still inject
reactions such as `emulator['list batches'] << 500`). Its own `KubernetesEmulator` keeps
objects as plain merged dicts, with no resourceVersion, no conflicts, no subresources,
no selectors and no garbage collection, so this class replaces that layer with `Store`
and serves CRUD, patches, watches and server-side tables (for `kubectl get`) itself.

Every request is authenticated (bearer tokens: the admin's, ServiceAccounts') and
authorized through the RBAC objects in the store before it is served (rbac.py), and
recorded in `audit`; the server speaks HTTPS only (tls.py), as client-go sends tokens
over TLS only.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp.web
import attrs
import kmock
from kmock._internal import enums, parsing, rendering

from . import paging, semantics
from .crds import builtin_specs, load_yaml_documents
from .rbac import (
    MASTERS,
    Attributes,
    RBACAuthorizer,
    TokenAuthenticator,
    UserInfo,
    bootstrap_policy,
    forbidden,
    request_attributes,
    unauthorized,
)
from .selectors import SelectorError, field_selector, label_selector
from .store import ResourceSpec, Store, WatchEvent, error
from .strategic import kind_schema

VERBS = {"create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"}


@attrs.frozen
class AuditEvent:
    """One request as the API server's audit log records it: who, what, allowed or not."""

    request_id: int
    user: UserInfo | None  # None: the token was not accepted (401)
    attributes: Attributes | None
    allowed: bool
    user_agent: str


def parse_k8s_path(path: str) -> parsing.ParsedPath:
    """URL -> group/version/namespace/plural/name/subresource.

    kmock 0.8's parser crashes on `/api/v1/namespaces` and reads `/api/v1/namespaces/x`
    as a namespace instead of the Namespace named x; kopf and kubectl use both.
    """
    parts = [p for p in path.strip("/").split("/") if p]
    if len(parts) >= 2 and parts[0] == "api":
        group, version, rest = "", parts[1], parts[2:]
    elif len(parts) >= 2 and parts[0] == "apis":
        group, version, rest = parts[1], (parts[2] if len(parts) > 2 else None), parts[3:]
    else:
        return parsing.ParsedPath()
    namespace = None
    if len(rest) >= 3 and rest[0] == "namespaces" and rest[2] not in ("status", "finalize"):
        namespace, rest = rest[1], rest[2:]
    return parsing.ParsedPath(
        group=group,
        version=version,
        plural=rest[0] if rest else None,
        namespace=namespace,
        name=rest[1] if len(rest) > 1 else None,
        subresource="/".join(rest[2:]) or None,
    )


async def parse_request(raw: aiohttp.web.BaseRequest, *, id: int) -> rendering.Request:
    body = await raw.read()
    text = body.decode("utf-8", errors="replace")
    try:
        data = json.loads(text) if text else None
    except ValueError:
        data = None
    k8s = parse_k8s_path(raw.path)
    resource = None if k8s.group is None else kmock.resource(group=k8s.group, version=k8s.version, plural=k8s.plural)
    method = enums.method(raw.method)
    return rendering.Request(
        id=id, raw_request=raw, url=raw.url, method=raw.method, params=dict(raw.query),
        headers=dict(raw.headers), cookies=dict(raw.cookies), data=data, body=body, text=text,
        action=parsing.guess_k8s(k8s, method, dict(raw.query)), resource=resource,
        namespace=k8s.namespace, name=k8s.name, subresource=k8s.subresource,
    )


@attrs.define(kw_only=True)
class KubeEmulator(kmock.KubernetesScaffold):
    store: Store = attrs.field(factory=Store, init=False)
    kubernetes_version: tuple[int, int] = (1, 32)
    _changed: asyncio.Event | None = attrs.field(default=None, init=False)
    _snapshots: paging.Snapshots = attrs.field(factory=paging.Snapshots, init=False)
    # Authentication and RBAC, on by default as on any real cluster; `admin_token` is in
    # system:masters (what a kubeconfig from `kind` or a cloud console carries).
    authorization: bool = True
    authenticator: TokenAuthenticator = attrs.field(init=False)
    authorizer: RBACAuthorizer = attrs.field(init=False)
    admin_token: str = attrs.field(init=False)
    audit: list[AuditEvent] = attrs.field(factory=list, init=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.store.on_register.append(self._declare)
        self.store.on_change.append(self._wake)
        for spec in builtin_specs():
            self.store.register(spec)
        self.store.create(kmock.resource("", "v1", "namespaces"), None, {"metadata": {"name": "default"}})
        for obj in bootstrap_policy():
            self.apply(obj)
        self.authenticator = TokenAuthenticator(self.store)
        self.authorizer = RBACAuthorizer(self.store)
        self.admin_token = self.authenticator.issue(UserInfo("kubernetes-admin", (MASTERS, "system:authenticated")))
        # The official client asks for `/apis/` and `/api/`; the API server ignores the slash.
        self.fallback["get /apis/"] << self._serve_apis
        self.fallback["get /api/"] << self._serve_api
        # Lowest priority of all: user reactions and kmock's discovery documents come first.
        self.fallback[lambda request: request.resource is not None and request.resource.plural is not None] \
            << self._dispatch

    @property
    def objects(self) -> kmock.ObjectsArray:
        return self.store.objects

    # --- setup -------------------------------------------------------------------

    def _declare(self, spec: ResourceSpec) -> None:
        self.resources[spec.resource] = kmock.ResourceInfo(
            kind=spec.kind, singular=spec.singular, namespaced=spec.namespaced, verbs=VERBS,
            shortnames=spec.shortnames, categories=spec.categories,
            subresources={"status"} if spec.status_subresource else set(),
        )

    def load_crds(self, path: str) -> list[dict[str, Any]]:
        """Create every CRD of a YAML file, which registers its resources (as the API server does)."""
        crd = kmock.resource("apiextensions.k8s.io", "v1", "customresourcedefinitions")
        return [self.store.create(crd, None, doc) for doc in load_yaml_documents(path)
                if doc.get("kind") == "CustomResourceDefinition"]

    def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Create any object of a known kind, as `kubectl create -f` (an admin) would."""
        api_version, kind = obj["apiVersion"], obj["kind"]
        spec = next((s for s in self.store.specs.values() if s.api_version == api_version and s.kind == kind), None)
        if spec is None:
            raise KeyError(f"unknown kind {api_version} {kind}")
        namespace = (obj.get("metadata") or {}).get("namespace") if spec.namespaced else None
        return self.store.create(spec.resource, namespace, obj)

    def _authorize(self, request: rendering.Request) -> kmock.KubernetesError | None:
        """Authenticate, then authorize through RBAC (None: go ahead), and audit it."""
        raw = request._raw_request
        agent = request.headers.get("User-Agent", "")
        if not self.authorization or raw is None:
            return None
        user = self.authenticator.authenticate(request.headers.get("Authorization"))
        if user is None:
            self.audit.append(AuditEvent(request.id, None, None, False, agent))
            return unauthorized()
        attributes = request_attributes(raw.method, raw.path, raw.query_string, user)
        decision = self.authorizer.authorize(attributes)
        self.audit.append(AuditEvent(request.id, user, attributes, decision.allowed, agent))
        return None if decision.allowed else forbidden(attributes, decision.reason)

    @staticmethod
    def _status_response(exc: kmock.KubernetesError) -> aiohttp.web.Response:
        # The Status body kube-apiserver writes (kmock's own would add a traceback).
        body: dict[str, Any] = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                                "message": exc.message, "reason": exc.reason, "code": exc.status}
        if exc.details:
            body["details"] = exc.details
        return aiohttp.web.json_response(body, status=exc.status, headers={"X-Content-Type-Options": "nosniff"})

    def _wake(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    def _change_event(self) -> asyncio.Event:
        if self._changed is None:
            self._changed = asyncio.Event()
        return self._changed

    # --- HTTP --------------------------------------------------------------------

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        # Same as RawHandler.__call__, but with a request parser that understands namespaces.
        try:
            request = await parse_request(raw_request, id=len(self._requests))
            self._requests.append(request)
            denied = self._authorize(request)
            if denied is not None:
                return self._status_response(denied)
            return await self._handle(request)
        except rendering.StreamingError as e:
            response = e.args[0]
            await self._stream_error(e.__cause__ or e, response)
            await response.write_eof()
            return response
        except Exception as e:
            if self._errors:
                self._errors[-1].append(e)
            return await self._render_error(e)

    async def _serve_server_version(self, request: rendering.Request) -> rendering.Payload:
        major, minor = self.kubernetes_version
        return {"major": str(major), "minor": str(minor), "gitVersion": f"v{major}.{minor}.0-vbatch-emulator",
                "gitCommit": "", "gitTreeState": "clean", "buildDate": "2025-01-01T00:00:00Z",
                "goVersion": "go1.23", "compiler": "gc", "platform": "linux/amd64"}

    async def _serve_version(self, request: rendering.Request) -> rendering.Payload:
        # kmock repeats short names on `batches/status` entries; kubectl then warns that
        # `vb` is ambiguous. The API server lists subresources without names or categories.
        doc = await super()._serve_version(request)
        for entry in doc["resources"]:
            if "/" in entry["name"]:
                entry["shortNames"], entry["categories"] = [], []
        return doc

    async def _dispatch(self, request: rendering.Request) -> rendering.Payload:
        # Always a Response with an explicit status: kmock 0.8 copies a returned Response's
        # status onto the (shared) reaction, so one 201 would otherwise stick to every later reply.
        try:
            result = await self._serve(request)
            return result if isinstance(result, kmock.Response) else kmock.Response(status=200, payload=result)
        except semantics.PatchError as exc:
            raise error(422, "Invalid", str(exc)) from exc
        except SelectorError as exc:
            raise error(400, "BadRequest", str(exc)) from exc
        except NotImplementedError as exc:  # kmock would read this as "no reaction here"
            raise error(415, "UnsupportedMediaType", str(exc)) from exc

    async def _serve(self, request: rendering.Request) -> rendering.Payload:
        assert request.resource is not None
        spec = self.store.spec(request.resource)
        ns = request.namespace if spec.namespaced else None
        params = request.params
        method = request.method
        if method == enums.method.GET:
            if params.get("watch", "").lower() in ("true", "1", "t"):  # Go's ParseBool; the client sends True
                return self._watch(request, spec, ns)
            if request.name is not None:
                obj = self.store.get(spec.resource, ns, request.name)
                return self._table(request, spec, [obj]) if self._wants_table(request) else obj
            return self._list(request, spec, ns)
        if method == enums.method.POST and request.name is None:
            return kmock.Response(status=201, payload=self.store.create(spec.resource, ns, request.data))
        if method == enums.method.PUT and request.name is not None:
            body = request.data
            return self.store.update(spec.resource, ns, request.name, lambda old: body,
                                     subresource=request.subresource)
        if method == enums.method.PATCH and request.name is not None:
            ctype = request.headers.get("Content-Type", "application/merge-patch+json")
            patch = request.data
            builtin_schema = None if spec.custom else kind_schema(spec.group, spec.version, spec.kind)
            if spec.custom and ctype.split(";")[0].strip().lower() == "application/strategic-merge-patch+json":
                # Custom resources have no Go types to carry patch strategies (apiserver patch.go).
                raise error(415, "UnsupportedMediaType", "the body of the request was in an unknown format - "
                            "accepted media types include: application/json-patch+json, "
                            "application/merge-patch+json, application/apply-patch+yaml")
            return self.store.update(spec.resource, ns, request.name,
                                     lambda old: semantics.apply_patch(ctype, old, patch, builtin_schema),
                                     subresource=request.subresource)
        if method == enums.method.DELETE:
            options = request.data if isinstance(request.data, dict) else {}
            propagation = params.get("propagationPolicy") or options.get("propagationPolicy")
            precondition = (options.get("preconditions") or {}).get("resourceVersion")
            if request.name is not None:
                return self.store.delete(spec.resource, ns, request.name,
                                         propagation=propagation, precondition_rv=precondition)
            listing = self._list(request, spec, ns)
            for obj in listing["items"]:
                self.store.delete(spec.resource, obj["metadata"].get("namespace"), obj["metadata"]["name"],
                                  propagation=propagation)
            return listing
        raise error(405, "MethodNotAllowed", f"{method} is not supported on {request.url.path}")

    # --- reading -----------------------------------------------------------------

    @staticmethod
    def _wants_table(request: rendering.Request) -> bool:
        return "as=Table" in request.headers.get("Accept", "")

    def _matcher(self, request: rendering.Request):
        labels = label_selector(request.params.get("labelSelector"))
        fields = field_selector(request.params.get("fieldSelector"))
        name = request.name
        return lambda obj: labels(obj) and fields(obj) and (name is None or obj["metadata"]["name"] == name)

    def _table(self, request: rendering.Request, spec: ResourceSpec, items: list[dict]) -> dict[str, Any]:
        return semantics.build_table(items, spec.printer_columns, str(self.store.revision))

    def _list(self, request: rendering.Request, spec: ResourceSpec, ns: str | None) -> dict[str, Any]:
        if self._wants_table(request):
            return self._table(request, spec, self.store.list(spec.resource, ns, self._matcher(request)))
        return paging.list_page(self.store, self._snapshots, spec, ns, self._matcher(request), request.params)

    async def _watch(self, request: rendering.Request, spec: ResourceSpec, ns: str | None) -> AsyncIterator[Any]:
        match = self._matcher(request)
        params = request.params
        loop = asyncio.get_running_loop()
        timeout = float(params["timeoutSeconds"]) if params.get("timeoutSeconds") else None
        deadline = None if timeout is None else loop.time() + timeout
        since_param = params.get("resourceVersion")
        initial = params.get("sendInitialEvents") == "true" or since_param in (None, "", "0")
        yield b""  # send the headers now: a quiet watch is still an open stream
        if initial:
            since = self.store.revision
            for obj in self.store.list(spec.resource, ns, match):
                yield {"type": "ADDED", "object": obj}
            if params.get("sendInitialEvents") == "true" and params.get("allowWatchBookmarks") == "true":
                yield {"type": "BOOKMARK", "object": {
                    "apiVersion": spec.api_version, "kind": spec.kind,
                    "metadata": {"resourceVersion": str(since),
                                 "annotations": {"k8s.io/initial-events-end": "true"}}}}
        else:
            since = int(since_param)
        transport = request._raw_request.transport if request._raw_request is not None else None
        while True:
            changed = self._change_event()
            try:
                events = self.store.events_after(since, spec.resource)
            except kmock.KubernetesError as exc:
                yield {"type": "ERROR", "object": {"apiVersion": "v1", "kind": "Status", "metadata": {},
                                                   "status": "Failure", "code": exc.status,
                                                   "reason": exc.reason, "message": exc.message}}
                return
            for event in events:
                since = event.revision
                out = self._as_seen(event, ns, match)
                if out is not None:
                    yield out
            if (deadline is not None and loop.time() >= deadline) or (transport is not None and transport.is_closing()):
                return
            wait = 1.0 if deadline is None else max(0.0, min(1.0, deadline - loop.time()))
            try:
                await asyncio.wait_for(changed.wait(), timeout=wait)
            except TimeoutError:
                pass

    @staticmethod
    def _as_seen(event: WatchEvent, ns: str | None, match) -> dict[str, Any] | None:
        """The event as a filtered watch sees it: leaving the selection looks like a deletion."""
        if ns is not None and event.obj["metadata"].get("namespace") != ns:
            return None
        now = match(event.obj)
        before = event.old is not None and match(event.old)
        if event.type == "MODIFIED" and now != before:
            return {"type": "ADDED" if now else "DELETED", "object": event.obj}
        return {"type": event.type, "object": event.obj} if now else None
