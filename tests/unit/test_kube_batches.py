"""The driver's Batch-resource store: its markers and failure survive the round trip
through status, and a step failure shows as a condition (pure: a dict-backed API)."""

from __future__ import annotations

from vbatch.core import state
from vbatch.core.config import Settings
from vbatch.core.ids import batch_object_name
from vbatch.core.schemas import BatchStatus, StepFailure
from vbatch.operator.builders import build_batch_resource
from vbatch.operator.kube_batches import KubeAnnouncer, KubeBatches


class DictKube:
    namespace = "ns"

    def __init__(self) -> None:
        self.objects: dict[str, dict] = {}
        self.events: list[tuple[str, str, str]] = []

    def get_batch(self, name):
        return self.objects.get(name)

    def patch_batch_status(self, name, revision, status):
        obj = self.objects[name]
        assert revision == obj["metadata"]["resourceVersion"]
        merged = {**obj.get("status", {}), **status}
        obj["status"] = {k: v for k, v in merged.items() if v is not None}  # merge patch: null deletes
        obj["metadata"]["resourceVersion"] = str(int(revision) + 1)
        return obj

    def patch_batch_spec(self, name, spec):
        self.objects[name]["spec"].update(spec)
        self.objects[name]["metadata"]["resourceVersion"] = str(int(self.objects[name]["metadata"]["resourceVersion"]) + 1)
        return self.objects[name]

    def post_event(self, obj, reason, message, type="Normal"):
        self.events.append((reason, type, message))


def test_markers_and_failures_round_trip_through_status():
    kube = DictKube()
    record = state.new_batch(project="p", input_file_id="file-x", endpoint="/v1/chat/completions",
                             completion_window="24h", metadata=None, total=3, model="m", window_seconds=60, now=100)
    obj = build_batch_resource(record, "ns")
    obj["metadata"].update(resourceVersion="1", uid="u")
    kube.objects[obj["metadata"]["name"]] = obj
    batches = KubeBatches(kube, Settings())
    got = batches.get("p", record.id)
    assert got is not None and not got.cleanup_pending and got.step_failure is None
    assert batches.get("other-project", record.id) is None
    got.cleanup_pending = True
    got.step_failure = StepFailure(action="wait", kind="transient", code="storage_unavailable", message="down",
                                   attempts=2, first_at=100.0, last_at=101.5, retry_at=103.5)
    batches.save(got)
    status = kube.objects[batch_object_name(record.id)]["status"]
    assert status["jobName"] == f"{batch_object_name(record.id)}-shards"
    condition = {c["type"]: c for c in status["conditions"]}["StepFailed"]
    assert condition["status"] == "True" and condition["reason"] == "StorageUnavailable" and "2 time(s)" in condition["message"]
    again = batches.get("p", record.id)
    assert again.cleanup_pending and again.step_failure == got.step_failure
    again.cleanup_pending, again.step_failure = False, None
    batches.save(again)
    status = kube.objects[batch_object_name(record.id)]["status"]
    assert "jobName" not in status and "stepFailure" not in status
    assert [c["type"] for c in status["conditions"]] == ["Succeeded"]


def test_the_announcer_posts_a_warning_per_failed_step_and_an_event_per_phase():
    kube = DictKube()
    record = state.new_batch(project="p", input_file_id="file-x", endpoint="/v1/chat/completions",
                             completion_window="24h", metadata=None, total=3, model="m", window_seconds=60, now=100)
    obj = build_batch_resource(record, "ns")
    obj["metadata"]["uid"] = "u"
    kube.objects[obj["metadata"]["name"]] = obj
    announce = KubeAnnouncer(kube)
    failing = record.model_copy(update={"step_failure": StepFailure(
        action="launch", kind="transient", code="timeout", message="slow", attempts=1, last_at=5.0, retry_at=6.0)})
    announce(record, failing)
    announce(failing, failing)  # the same failure saved again (e.g. counts moved): no second event
    finalizing = state.transition(record, BatchStatus.FINALIZING, 200)
    announce(record, finalizing)
    assert kube.events == [("StepFailed", "Warning", "launch failed (attempt 1, transient timeout): slow; retrying in 1.0 s"),
                           ("Finalizing", "Normal", "finalizing: 0 completed, 0 failed of 3")]
