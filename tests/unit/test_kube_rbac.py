"""The emulator's RBAC authorizer, against the Kubernetes semantics it follows
(requestinfo.go, rbac/v1 evaluation helpers, the RBAC authorizer, the Forbidden body)."""

from __future__ import annotations

import pytest
from kube.crds import builtin_specs
from kube.rbac import (
    RBACAuthorizer,
    TokenAuthenticator,
    UserInfo,
    bootstrap_policy,
    forbidden,
    request_attributes,
    rule_allows,
    service_account_user,
)
from kube.store import Store

SA = service_account_user("ns1", "op")


def store_with(*objects: dict) -> Store:
    store = Store()
    for spec in builtin_specs():
        store.register(spec)
    for obj in list(bootstrap_policy()) + list(objects):
        spec = next(s for s in store.specs.values() if s.kind == obj["kind"] and s.api_version == obj["apiVersion"])
        store.create(spec.resource, obj["metadata"].get("namespace") if spec.namespaced else None, obj)
    return store


def role(name, rules, namespace=None, kind="Role"):
    meta = {"name": name} | ({"namespace": namespace} if namespace else {})
    return {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": kind, "metadata": meta, "rules": rules}


def binding(name, role_name, subjects, namespace=None, role_kind="Role"):
    kind = "RoleBinding" if namespace else "ClusterRoleBinding"
    meta = {"name": name} | ({"namespace": namespace} if namespace else {})
    return {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": kind, "metadata": meta,
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": role_kind, "name": role_name},
            "subjects": subjects}


SA_SUBJECT = [{"kind": "ServiceAccount", "name": "op", "namespace": "ns1"}]


def allowed(store, method, path, query="", user=SA) -> bool:
    return RBACAuthorizer(store).authorize(request_attributes(method, path, query, user)).allowed


@pytest.mark.parametrize(("method", "path", "query", "expected"), [
    ("GET", "/api/v1/namespaces/ns1/pods", "", ("list", "", "pods", "", "ns1", "")),
    ("GET", "/api/v1/namespaces/ns1/pods", "watch=true", ("watch", "", "pods", "", "ns1", "")),
    ("GET", "/api/v1/watch/namespaces/ns1/pods", "", ("watch", "", "pods", "", "ns1", "")),
    ("GET", "/api/v1/namespaces/ns1/pods", "fieldSelector=metadata.name%3Dp1", ("list", "", "pods", "", "ns1", "p1")),
    ("GET", "/api/v1/namespaces/ns1/pods/p1", "", ("get", "", "pods", "", "ns1", "p1")),
    ("PATCH", "/apis/vbatch.dev/v1alpha1/namespaces/ns1/batches/b1/status", "",
     ("patch", "vbatch.dev", "batches", "status", "ns1", "b1")),
    ("DELETE", "/apis/batch/v1/namespaces/ns1/jobs", "", ("deletecollection", "batch", "jobs", "", "ns1", "")),
    ("DELETE", "/apis/batch/v1/namespaces/ns1/jobs/j", "", ("delete", "batch", "jobs", "", "ns1", "j")),
    ("POST", "/api/v1/namespaces/ns1/events", "", ("create", "", "events", "", "ns1", "")),
    ("PUT", "/api/v1/namespaces/ns1/finalize", "", ("update", "", "namespaces", "finalize", "ns1", "ns1")),
    # The Namespace object itself is "in" its own namespace, for RoleBindings there.
    ("GET", "/api/v1/namespaces/ns1", "", ("get", "", "namespaces", "", "ns1", "ns1")),
    ("GET", "/api/v1/namespaces", "", ("list", "", "namespaces", "", "", "")),
    ("GET", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", "",
     ("list", "apiextensions.k8s.io", "customresourcedefinitions", "", "", "")),
])
def test_request_attributes_follow_requestinfo(method, path, query, expected):
    a = request_attributes(method, path, query, SA)
    assert a.resource_request
    assert (a.verb, a.api_group, a.resource, a.subresource, a.namespace, a.name) == expected


@pytest.mark.parametrize("path", ["/api", "/apis", "/apis/vbatch.dev", "/apis/vbatch.dev/v1alpha1", "/version",
                                  "/healthz"])
def test_discovery_and_health_are_non_resource_requests(path):
    a = request_attributes("GET", path, "", SA)
    assert not a.resource_request and a.verb == "get" and a.path == path


def test_rule_matching_needs_the_subresource_named():
    attrs = request_attributes("PATCH", "/apis/vbatch.dev/v1alpha1/namespaces/ns1/batches/b1/status", "", SA)
    base = {"apiGroups": ["vbatch.dev"], "verbs": ["patch"]}
    assert not rule_allows(attrs, base | {"resources": ["batches"]})
    assert rule_allows(attrs, base | {"resources": ["batches/status"]})
    assert rule_allows(attrs, base | {"resources": ["*/status"]})
    assert rule_allows(attrs, base | {"resources": ["*"]})
    assert not rule_allows(attrs, base | {"resources": ["batches/status"], "apiGroups": [""]})
    assert not rule_allows(attrs, base | {"resources": ["batches/status"], "verbs": ["update"]})
    assert rule_allows(attrs, base | {"resources": ["batches/status"], "verbs": ["*"]})


def test_resource_names_limit_to_those_objects_and_cannot_grant_list_or_create():
    rule = {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list", "create"],
            "resourceNames": ["cfg"]}
    store = store_with(role("r", [rule], "ns1"), binding("b", "r", SA_SUBJECT, "ns1"))
    assert allowed(store, "GET", "/api/v1/namespaces/ns1/configmaps/cfg")
    assert not allowed(store, "GET", "/api/v1/namespaces/ns1/configmaps/other")
    assert not allowed(store, "GET", "/api/v1/namespaces/ns1/configmaps")
    assert allowed(store, "GET", "/api/v1/namespaces/ns1/configmaps", "fieldSelector=metadata.name=cfg")
    assert not allowed(store, "POST", "/api/v1/namespaces/ns1/configmaps")


def test_a_role_binding_grants_only_in_its_namespace_and_only_to_its_subjects():
    rule = {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["get"]}
    store = store_with(role("r", [rule], "ns1"), binding("b", "r", SA_SUBJECT, "ns1"))
    assert allowed(store, "GET", "/apis/batch/v1/namespaces/ns1/jobs/j")
    assert not allowed(store, "GET", "/apis/batch/v1/namespaces/ns2/jobs/j")
    assert not allowed(store, "GET", "/apis/batch/v1/jobs")  # all namespaces: a cluster-scope request
    assert not allowed(store, "GET", "/apis/batch/v1/namespaces/ns1/jobs/j", user=service_account_user("ns1", "gw"))
    assert not allowed(store, "GET", "/apis/batch/v1/namespaces/ns1/jobs/j", user=service_account_user("ns2", "op"))


def test_a_role_binding_to_a_cluster_role_grants_it_in_the_binding_namespace_only():
    rule = {"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]}
    store = store_with(role("reader", [rule], kind="ClusterRole"),
                       binding("b", "reader", SA_SUBJECT, "ns1", role_kind="ClusterRole"))
    assert allowed(store, "GET", "/api/v1/namespaces/ns1/pods")
    assert not allowed(store, "GET", "/api/v1/namespaces/ns2/pods")
    assert not allowed(store, "GET", "/api/v1/pods")


def test_cluster_role_bindings_grant_everywhere_and_match_groups():
    rule = {"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]}
    store = store_with(role("reader", [rule], kind="ClusterRole"),
                       binding("b", "reader", [{"kind": "Group", "name": "system:serviceaccounts:ns1"}],
                               role_kind="ClusterRole"))
    assert allowed(store, "GET", "/api/v1/pods") and allowed(store, "GET", "/api/v1/namespaces/x/pods")
    assert not allowed(store, "GET", "/api/v1/pods", user=service_account_user("ns2", "op"))


def test_a_binding_to_a_missing_role_grants_nothing_and_says_why():
    store = store_with(binding("b", "nope", SA_SUBJECT, "ns1"))
    decision = RBACAuthorizer(store).authorize(request_attributes("GET", "/api/v1/namespaces/ns1/pods", "", SA))
    assert not decision.allowed and 'role.rbac.authorization.k8s.io "nope" not found' in decision.reason


def test_aggregated_cluster_roles_collect_the_selected_rules():
    rule = {"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]}
    part = role("part", [rule], kind="ClusterRole")
    part["metadata"]["labels"] = {"agg": "yes"}
    whole = role("whole", [], kind="ClusterRole")
    whole["aggregationRule"] = {"clusterRoleSelectors": [{"matchLabels": {"agg": "yes"}}]}
    store = store_with(part, whole, binding("b", "whole", SA_SUBJECT, role_kind="ClusterRole"))
    assert allowed(store, "GET", "/api/v1/namespaces/x/pods/p")


def test_bootstrap_policy_admins_discovery_and_anonymous():
    store = store_with()
    admin = UserInfo("kubernetes-admin", ("system:masters", "system:authenticated"))
    anonymous = UserInfo("system:anonymous", ("system:unauthenticated",))
    assert allowed(store, "DELETE", "/api/v1/namespaces/x", user=admin)
    assert allowed(store, "GET", "/apis", user=SA) and allowed(store, "GET", "/apis/batch/v1", user=SA)
    assert not allowed(store, "GET", "/api/v1/namespaces/ns1/pods", user=SA)
    assert allowed(store, "GET", "/version", user=anonymous)
    assert not allowed(store, "GET", "/apis", user=anonymous)
    assert not allowed(store, "GET", "/api/v1/namespaces", user=anonymous)


def test_forbidden_messages_are_the_api_servers():
    a = request_attributes("GET", "/api/v1/namespaces", "", SA)
    assert forbidden(a).message == ('namespaces is forbidden: User "system:serviceaccount:ns1:op" cannot list '
                                    'resource "namespaces" in API group "" at the cluster scope')
    a = request_attributes("PATCH", "/apis/vbatch.dev/v1alpha1/namespaces/ns1/batches/b1/status", "", SA)
    e = forbidden(a)
    assert (e.status, e.reason) == (403, "Forbidden")
    assert e.message == ('batches.vbatch.dev "b1" is forbidden: User "system:serviceaccount:ns1:op" cannot patch '
                         'resource "batches/status" in API group "vbatch.dev" in the namespace "ns1"')
    assert e.details == {"name": "b1", "group": "vbatch.dev", "kind": "batches"}
    a = request_attributes("GET", "/apis", "", UserInfo("system:anonymous"))
    assert forbidden(a).message == 'forbidden: User "system:anonymous" cannot get path "/apis"'


def test_tokens_name_service_accounts_and_die_with_them():
    sa = {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "op", "namespace": "ns1"}}
    store = store_with(sa)
    authn = TokenAuthenticator(store)
    token = authn.issue_for_service_account("ns1", "op")
    user = authn.authenticate(f"Bearer {token}")
    assert user is not None and user.name == "system:serviceaccount:ns1:op"
    assert set(user.groups) == {"system:serviceaccounts", "system:serviceaccounts:ns1", "system:authenticated"}
    assert authn.authenticate("Bearer made-up") is None
    assert authn.authenticate(None).name == "system:anonymous"
    store.delete(next(s.resource for s in store.specs.values() if s.kind == "ServiceAccount"), "ns1", "op")
    assert authn.authenticate(f"Bearer {token}") is None
