"""Strategic merge patch in the emulator, against apimachinery's strategicpatch rules
with the built-in types' own patch strategies (from Kubernetes' OpenAPI definitions)."""

from __future__ import annotations

from kube.strategic import kind_schema, strategic_merge

POD = kind_schema("", "v1", "Pod")
JOB = kind_schema("batch", "v1", "Job")


def pod(**spec):
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "finalizers": ["a"]},
            "spec": {"containers": [{"name": "w", "image": "i1", "args": ["x", "y"],
                                     "env": [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}]}], **spec}}


def test_kinds_come_from_the_openapi_definitions():
    assert POD is not None and JOB is not None
    assert kind_schema("vbatch.dev", "v1alpha1", "Batch") is None


def test_lists_with_a_merge_key_merge_and_others_are_replaced():
    out = strategic_merge(pod(), {"spec": {"containers": [
        {"name": "w", "args": ["z"], "env": [{"name": "B", "value": "3"}, {"name": "C", "value": "4"}]},
        {"name": "side", "image": "i2"}]}}, POD)
    by_name = {c["name"]: c for c in out["spec"]["containers"]}
    assert by_name["w"]["image"] == "i1"  # kept: the container merged by name
    assert by_name["w"]["args"] == ["z"]  # args has no strategy: replaced
    assert by_name["w"]["env"] == [{"name": "A", "value": "1"}, {"name": "B", "value": "3"}, {"name": "C", "value": "4"}]
    assert by_name["side"]["image"] == "i2"


def test_finalizers_are_a_set_a_strategic_patch_adds_to():
    out = strategic_merge(pod(), {"metadata": {"finalizers": ["b", "a"]}}, POD)
    assert out["metadata"]["finalizers"] == ["a", "b"]
    out = strategic_merge(pod(), {"metadata": {"$deleteFromPrimitiveList/finalizers": ["a"]}}, POD)
    assert out["metadata"]["finalizers"] == []


def test_delete_and_replace_directives():
    out = strategic_merge(pod(), {"spec": {"containers": [{"name": "w", "env": [{"name": "A", "$patch": "delete"}]}]}},
                          POD)
    assert out["spec"]["containers"][0]["env"] == [{"name": "B", "value": "2"}]
    out = strategic_merge(pod(nodeSelector={"a": "1", "b": "2"}), {"spec": {"nodeSelector": {"$patch": "replace", "c": "3"}}},
                          POD)
    assert out["spec"]["nodeSelector"] == {"c": "3"}
    out = strategic_merge(pod(), {"spec": {"containers": [{"name": "w", "$patch": "delete"}]}}, POD)
    assert out["spec"]["containers"] == []
    assert strategic_merge(pod(), {"metadata": {"labels": None}}, POD)["metadata"] == pod()["metadata"]


def test_job_conditions_merge_by_type():
    job = {"status": {"conditions": [{"type": "SuccessCriteriaMet", "status": "True"}]}}
    out = strategic_merge(job, {"status": {"conditions": [{"type": "Complete", "status": "True"}]}}, JOB)
    assert [c["type"] for c in out["status"]["conditions"]] == ["SuccessCriteriaMet", "Complete"]


def test_without_a_schema_every_list_is_replaced():
    assert strategic_merge({"a": [1, 2]}, {"a": [3]}, None) == {"a": [3]}
