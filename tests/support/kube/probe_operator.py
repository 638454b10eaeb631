"""A tiny kopf operator used to prove kopf runs unmodified against the emulator.

Loaded by `kopf run` from a path, never imported by tests. Its create handler fails
once on purpose so that kopf has to persist handler progress between attempts, and
its delete handler makes kopf put (and later remove) its finalizer.
"""

import kopf


@kopf.on.login()
def login(**kwargs):
    # kopf's own kubeconfig reader honours $KUBECONFIG at call time; the `kubernetes`
    # client's reader froze it at import time, before the test pointed it at the emulator.
    return kopf.login_with_kubeconfig(**kwargs)


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_):
    settings.watching.server_timeout = 5  # reconnect often: exercises resourceVersion resumption
    settings.watching.client_timeout = 10
    # Both stores, so a test sees progress in annotations and in status.kopf (which the
    # CRD must keep through pruning, since the real operator may choose either).
    settings.persistence.progress_storage = kopf.MultiProgressStorage([
        kopf.AnnotationsProgressStorage(), kopf.StatusProgressStorage(),
    ])


@kopf.on.create("vbatch.dev", "v1alpha1", "batches")
def admit(name, body, retry, patch, **_):
    if retry == 0:
        raise kopf.TemporaryError("failing the first attempt on purpose", delay=0.2)
    patch.status["phase"] = "in_progress"
    patch.status["jobName"] = f"{name}-shards"
    patch.status["requestCounts"] = {"total": 3, "completed": 0, "failed": 0}
    patch.metadata.setdefault("labels", {})["probe.vbatch.dev/handled"] = "yes"
    kopf.info(body, reason="Admitted", message=f"attempt {retry}")


@kopf.on.update("vbatch.dev", "v1alpha1", "batches", field="spec.cancelRequested", new=True)
def cancel(patch, **_):
    patch.status["phase"] = "cancelling"


@kopf.on.delete("vbatch.dev", "v1alpha1", "batches")
def release(name, logger, **_):
    logger.info(f"releasing {name}")
