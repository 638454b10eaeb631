"""Which failures of the Kubernetes API the gateway's batch store answers with a 503
(+ Retry-After, as for storage) and which stay errors of their own."""

from __future__ import annotations

import pytest
import urllib3
from kubernetes.client.rest import ApiException
from vbatch.core.batch_store import StaleRecord
from vbatch.core.errors import StorageError
from vbatch.operator.cr_store import api_unavailable, unavailable_as_storage_error

POOL = urllib3.HTTPConnectionPool("127.0.0.1", 1)


@pytest.mark.parametrize("exc", [
    ApiException(status=500), ApiException(status=503), ApiException(status=504), ApiException(status=429),
    ApiException(status=0, reason="SSLError"),
    urllib3.exceptions.MaxRetryError(POOL, "/apis", reason=ConnectionRefusedError()),
    urllib3.exceptions.ProtocolError("Connection aborted.", ConnectionResetError()),
    urllib3.exceptions.ReadTimeoutError(POOL, "/apis", "read timed out"),
    ConnectionResetError(), TimeoutError(),
])
def test_an_unavailable_api_server_is_a_retryable_503(exc):
    assert api_unavailable(exc)
    with pytest.raises(StorageError) as raised, unavailable_as_storage_error("read the batch"):
        raise exc
    assert raised.value.status_code == 503 and raised.value.retryable
    assert raised.value.code == "batch_store_unavailable" and "read the batch" in raised.value.message


@pytest.mark.parametrize("exc", [ApiException(status=403), ApiException(status=404), ApiException(status=422),
                                 ValueError("bad json"), KeyError("metadata")])
def test_other_failures_are_not_disguised_as_unavailability(exc):
    assert not api_unavailable(exc)
    with pytest.raises(type(exc)), unavailable_as_storage_error("read the batch"):
        raise exc


def test_conflicts_after_every_retry_are_a_retryable_503():
    with pytest.raises(StorageError) as raised, unavailable_as_storage_error("cancel the batch"):
        raise StaleRecord("batch-x")
    assert raised.value.code == "batch_store_contended" and raised.value.retryable
