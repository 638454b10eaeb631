"""Authentication and RBAC authorization, as kube-apiserver does them.

- Authentication: bearer tokens. `issue_token` plays the TokenRequest API: a token
  names a ServiceAccount (user `system:serviceaccount:<ns>:<name>`, groups
  `system:serviceaccounts`, `system:serviceaccounts:<ns>`, `system:authenticated`) and
  stops working when that ServiceAccount is deleted; other tokens may name a plain
  user with groups (the admin's is in `system:masters`). No token: `system:anonymous`.
  An unknown token: 401.
- Request attributes: k8s.io/apiserver/pkg/endpoints/request/requestinfo.go — verb
  from the method (get/list/watch/create/update/patch/delete/deletecollection),
  resource/subresource/name/namespace from the path (`/api/v1/namespaces/x` is the
  Namespace x *in* namespace x), a list or watch with `fieldSelector=metadata.name=N`
  is about the object N.
- Authorization: plugin/pkg/auth/authorizer/rbac/rbac.go over the Roles, ClusterRoles,
  RoleBindings and ClusterRoleBindings in the store: ClusterRoleBindings grant
  everywhere, RoleBindings (to a Role of their namespace or a ClusterRole) only in
  their namespace; rules match verbs, apiGroups, resources (`pods/status` must be
  named, `*/status` matches every status), resourceNames and nonResourceURLs (a
  trailing `*` is a prefix), as pkg/apis/rbac/v1/evaluation_helpers.go does.
  ClusterRoles with an aggregationRule get the rules of the ClusterRoles they select.
- The bootstrap policy every cluster has (plugin/pkg/auth/authorizer/rbac/bootstrappolicy):
  cluster-admin for system:masters, discovery for system:authenticated, health and
  version for everyone.
- Denials: 403 with the API server's Status body and message.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

import kmock

from .store import Store

RBAC_GROUP = "rbac.authorization.k8s.io"
ROLES = kmock.resource(RBAC_GROUP, "v1", "roles")
CLUSTER_ROLES = kmock.resource(RBAC_GROUP, "v1", "clusterroles")
ROLE_BINDINGS = kmock.resource(RBAC_GROUP, "v1", "rolebindings")
CLUSTER_ROLE_BINDINGS = kmock.resource(RBAC_GROUP, "v1", "clusterrolebindings")
SERVICE_ACCOUNTS = kmock.resource("", "v1", "serviceaccounts")

ANONYMOUS = "system:anonymous"
MASTERS = "system:masters"
AUTHENTICATED = "system:authenticated"
UNAUTHENTICATED = "system:unauthenticated"
_NAMESPACE_SUBRESOURCES = {"status", "finalize"}


@dataclass(frozen=True)
class UserInfo:
    name: str
    groups: tuple[str, ...] = ()
    # Set for service accounts: the token dies with the account.
    service_account: tuple[str, str] | None = None


def service_account_user(namespace: str, name: str) -> UserInfo:
    return UserInfo(f"system:serviceaccount:{namespace}:{name}",
                    ("system:serviceaccounts", f"system:serviceaccounts:{namespace}", AUTHENTICATED),
                    service_account=(namespace, name))


@dataclass(frozen=True)
class Attributes:
    """authorizer.Attributes: who asks to do what to which object."""

    user: UserInfo
    verb: str
    resource_request: bool
    path: str
    api_group: str = ""
    api_version: str = ""
    resource: str = ""
    subresource: str = ""
    namespace: str = ""
    name: str = ""


def request_attributes(method: str, path: str, query: str | Mapping[str, str], user: UserInfo) -> Attributes:
    """requestinfo.go's RequestInfoFactory.NewRequestInfo, for the paths clients use."""
    params = parse_qs(query) if isinstance(query, str) else {k: [v] for k, v in query.items()}
    parts = [p for p in path.strip("/").split("/") if p]
    method = method.upper()
    plain = Attributes(user=user, verb=method.lower(), resource_request=False, path=path)
    if not parts or parts[0] not in ("api", "apis"):
        return plain
    if parts[0] == "apis":
        if len(parts) < 3:
            return plain
        group, version, rest = parts[1], parts[2], parts[3:]
    else:
        if len(parts) < 2:
            return plain
        group, version, rest = "", parts[1], parts[2:]
    if not rest:
        return plain  # /api/v1, /apis/g/v: discovery documents
    verb = {"POST": "create", "GET": "get", "HEAD": "get", "PUT": "update", "PATCH": "patch",
            "DELETE": "delete"}.get(method, "")
    if rest[0] == "watch":  # the legacy /watch/ prefix
        verb, rest = "watch", rest[1:]
    namespace = ""
    if rest and rest[0] == "namespaces":
        if len(rest) > 1:
            namespace = rest[1]
            if len(rest) > 2 and rest[2] not in _NAMESPACE_SUBRESOURCES:
                rest = rest[2:]
    resource = rest[0] if rest else ""
    name = rest[1] if len(rest) > 1 else ""
    subresource = rest[2] if len(rest) > 2 else ""
    if not name and verb == "get":
        watch = (params.get("watch") or [""])[0].lower() in ("true", "1", "t")
        verb = "watch" if watch or verb == "watch" else "list"
        for selector in params.get("fieldSelector") or []:
            terms = dict(t.split("=", 1) for t in selector.replace("==", "=").split(",") if "=" in t and "!=" not in t)
            name = terms.get("metadata.name", name)
    if not name and verb == "delete":
        verb = "deletecollection"
    return Attributes(user=user, verb=verb, resource_request=True, path=path, api_group=group,
                      api_version=version, resource=resource, subresource=subresource,
                      namespace=namespace, name=name)


# --- rules (pkg/apis/rbac/v1/evaluation_helpers.go) ------------------------------------


def _verb_matches(rule: Mapping[str, Any], verb: str) -> bool:
    return any(v in ("*", verb) for v in rule.get("verbs") or [])


def _group_matches(rule: Mapping[str, Any], group: str) -> bool:
    return any(g in ("*", group) for g in rule.get("apiGroups") or [])


def _resource_matches(rule: Mapping[str, Any], resource: str, subresource: str) -> bool:
    combined = f"{resource}/{subresource}" if subresource else resource
    for wanted in rule.get("resources") or []:
        if wanted in ("*", combined) or (subresource and wanted == f"*/{subresource}"):
            return True
    return False


def _name_matches(rule: Mapping[str, Any], name: str) -> bool:
    names = rule.get("resourceNames") or []
    return not names or name in names


def _url_matches(rule: Mapping[str, Any], path: str) -> bool:
    for wanted in rule.get("nonResourceURLs") or []:
        if wanted == "*" or wanted == path or (wanted.endswith("*") and path.startswith(wanted[:-1])):
            return True
    return False


def rule_allows(attrs: Attributes, rule: Mapping[str, Any]) -> bool:
    if attrs.resource_request:
        return (_verb_matches(rule, attrs.verb) and _group_matches(rule, attrs.api_group)
                and _resource_matches(rule, attrs.resource, attrs.subresource)
                and _name_matches(rule, attrs.name))
    return _verb_matches(rule, attrs.verb) and _url_matches(rule, attrs.path)


def _applies_to(subject: Mapping[str, Any], user: UserInfo, binding_namespace: str) -> bool:
    kind = subject.get("kind")
    if kind == "User":
        return subject.get("name") == user.name
    if kind == "Group":
        return subject.get("name") in user.groups
    if kind == "ServiceAccount":
        namespace = subject.get("namespace") or binding_namespace
        return bool(namespace) and f"system:serviceaccount:{namespace}:{subject.get('name')}" == user.name
    return False


# --- the authorizer ------------------------------------------------------------------------


@dataclass
class Decision:
    allowed: bool
    reason: str = ""


@dataclass
class RBACAuthorizer:
    store: Store

    def _objects(self, resource: kmock.resource, namespace: str | None = None) -> list[dict[str, Any]]:
        return self.store.list(resource, namespace, lambda obj: True)

    def _cluster_role_rules(self, name: str, seen: frozenset[str] = frozenset()) -> list[dict[str, Any]] | None:
        roles = {r["metadata"]["name"]: r for r in self._objects(CLUSTER_ROLES)}
        role = roles.get(name)
        if role is None:
            return None
        rules = list(role.get("rules") or [])
        # What the clusterrole-aggregation controller would have written into `rules`.
        for selector in (role.get("aggregationRule") or {}).get("clusterRoleSelectors") or []:
            wanted = selector.get("matchLabels") or {}
            for other_name, other in roles.items():
                labels = other["metadata"].get("labels") or {}
                if other_name != name and other_name not in seen and wanted \
                        and all(labels.get(k) == v for k, v in wanted.items()):
                    rules.extend(self._cluster_role_rules(other_name, seen | {name}) or [])
        return rules

    def _role_rules(self, ref: Mapping[str, Any], namespace: str) -> list[dict[str, Any]] | None:
        if ref.get("kind") == "ClusterRole":
            return self._cluster_role_rules(ref.get("name", ""))
        if ref.get("kind") == "Role":
            try:
                return list(self.store.get(ROLES, namespace, ref.get("name", "")).get("rules") or [])
            except kmock.KubernetesError:
                return None
        return None

    def _bindings(self, namespace: str) -> Iterable[tuple[dict[str, Any], str]]:
        for binding in self._objects(CLUSTER_ROLE_BINDINGS):
            yield binding, ""
        if namespace:
            for binding in self._objects(ROLE_BINDINGS, namespace):
                yield binding, namespace

    def authorize(self, attrs: Attributes) -> Decision:
        errors: list[str] = []
        for binding, namespace in self._bindings(attrs.namespace):
            if not any(_applies_to(s, attrs.user, namespace) for s in binding.get("subjects") or []):
                continue
            rules = self._role_rules(binding.get("roleRef") or {}, namespace)
            if rules is None:
                ref = binding.get("roleRef") or {}
                kind = "clusterrole" if ref.get("kind") == "ClusterRole" else "role"
                errors.append(f'{kind}.rbac.authorization.k8s.io "{ref.get("name")}" not found')
                continue
            if any(rule_allows(attrs, rule) for rule in rules):
                return Decision(True)
        return Decision(False, f"RBAC: [{', '.join(errors)}]" if errors else "")


def forbidden(attrs: Attributes, reason: str = "") -> kmock.KubernetesError:
    """responsewriters.Forbidden: the message and Status kube-apiserver sends on a denial."""
    user = attrs.user.name
    if not attrs.resource_request:
        message = f'User "{user}" cannot {attrs.verb} path "{attrs.path}"'
    else:
        resource = f"{attrs.resource}/{attrs.subresource}" if attrs.subresource else attrs.resource
        where = f'in the namespace "{attrs.namespace}"' if attrs.namespace else "at the cluster scope"
        message = f'User "{user}" cannot {attrs.verb} resource "{resource}" in API group "{attrs.api_group}" {where}'
    if reason:
        message = f"{message}: {reason}"
    qualified = f"{attrs.resource}.{attrs.api_group}" if attrs.api_group else attrs.resource
    if not attrs.resource_request:
        prefix = "forbidden"
    elif attrs.name:
        prefix = f'{qualified} "{attrs.name}" is forbidden'
    else:
        prefix = f"{qualified} is forbidden"
    details: dict[str, Any] = {}
    if attrs.name:
        details["name"] = attrs.name
    if attrs.api_group:
        details["group"] = attrs.api_group
    if attrs.resource_request:
        details["kind"] = attrs.resource
    return kmock.KubernetesError(status=403, reason="Forbidden", message=f"{prefix}: {message}", details=details)


def unauthorized() -> kmock.KubernetesError:
    return kmock.KubernetesError(status=401, reason="Unauthorized", message="Unauthorized", details={})


# --- authentication --------------------------------------------------------------------------


@dataclass
class TokenAuthenticator:
    store: Store
    tokens: dict[str, UserInfo] = field(default_factory=dict)

    def issue(self, user: UserInfo) -> str:
        token = secrets.token_urlsafe(24)
        self.tokens[token] = user
        return token

    def issue_for_service_account(self, namespace: str, name: str) -> str:
        """The TokenRequest API: a token for an existing ServiceAccount."""
        self.store.get(SERVICE_ACCOUNTS, namespace, name)  # 404 when there is no such account
        return self.issue(service_account_user(namespace, name))

    def authenticate(self, authorization: str | None) -> UserInfo | None:
        """The user, or None for a token nobody issued (401). No header: anonymous."""
        if not authorization:
            return UserInfo(ANONYMOUS, (UNAUTHENTICATED,))
        scheme, _, token = authorization.partition(" ")
        user = self.tokens.get(token.strip()) if scheme.lower() == "bearer" else None
        if user is None:
            return None
        if user.service_account is not None:
            try:
                self.store.get(SERVICE_ACCOUNTS, *user.service_account)
            except kmock.KubernetesError:
                return None  # the account is gone, so is its token
        return user


# --- the bootstrap policy ---------------------------------------------------------------------

_DISCOVERY_URLS = ["/api", "/api/*", "/apis", "/apis/*", "/healthz", "/livez", "/openapi", "/openapi/*",
                   "/readyz", "/version", "/version/"]
_PUBLIC_URLS = ["/healthz", "/livez", "/readyz", "/version", "/version/"]


def bootstrap_policy() -> list[dict[str, Any]]:
    """The default ClusterRoles/Bindings an RBAC cluster starts with (the subset that matters)."""

    def role(name: str, rules: list[dict[str, Any]]) -> dict[str, Any]:
        return {"apiVersion": f"{RBAC_GROUP}/v1", "kind": "ClusterRole",
                "metadata": {"name": name, "labels": {"kubernetes.io/bootstrapping": "rbac-defaults"}},
                "rules": rules}

    def binding(name: str, groups: list[str]) -> dict[str, Any]:
        return {"apiVersion": f"{RBAC_GROUP}/v1", "kind": "ClusterRoleBinding",
                "metadata": {"name": name, "labels": {"kubernetes.io/bootstrapping": "rbac-defaults"}},
                "roleRef": {"apiGroup": RBAC_GROUP, "kind": "ClusterRole", "name": name},
                "subjects": [{"apiGroup": RBAC_GROUP, "kind": "Group", "name": g} for g in groups]}

    return [
        role("cluster-admin", [{"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]},
                               {"nonResourceURLs": ["*"], "verbs": ["*"]}]),
        binding("cluster-admin", [MASTERS]),
        role("system:discovery", [{"nonResourceURLs": _DISCOVERY_URLS, "verbs": ["get"]}]),
        binding("system:discovery", [AUTHENTICATED]),
        role("system:public-info-viewer", [{"nonResourceURLs": _PUBLIC_URLS, "verbs": ["get"]}]),
        binding("system:public-info-viewer", [AUTHENTICATED, UNAUTHENTICATED]),
        role("system:basic-user", [{"apiGroups": ["authorization.k8s.io"],
                                    "resources": ["selfsubjectaccessreviews", "selfsubjectrulesreviews"],
                                    "verbs": ["create"]}]),
        binding("system:basic-user", [AUTHENTICATED]),
    ]
