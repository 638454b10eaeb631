"""The gateway's abuse limits are chart values: rendered into the VBATCH_* variables
the gateway reads, the chart's defaults equal to the code's, and validated by the
values schema."""

from __future__ import annotations

import pytest
from test_chart import chart, one, render  # noqa: F401 (fixture)
from vbatch.core.config import Settings

# chart value -> Settings field
FIELDS = {
    "maxJsonBodyBytes": "max_json_body_bytes",
    "headerTimeoutSeconds": "header_timeout_seconds",
    "maxHeaderBytes": "max_header_bytes",
    "bodyIdleTimeoutSeconds": "body_idle_timeout_seconds",
    "bodyMinBytesPerSecond": "body_min_bytes_per_second",
    "maxConcurrentUploads": "max_concurrent_uploads",
    "maxConcurrentUploadsPerProject": "max_concurrent_uploads_per_project",
    "retryAfterSeconds": "retry_after_seconds",
    "tmpMaxAgeSeconds": "tmp_max_age_seconds",
    "tmpCleanupIntervalSeconds": "tmp_cleanup_interval_seconds",
}


def gateway_settings(objects) -> Settings:
    container = one(objects, "Deployment", "-gateway")["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    return Settings(**{f: env[f"VBATCH_{f.upper()}"] for f in FIELDS.values()})


def test_the_chart_defaults_are_the_code_defaults(chart) -> None:  # noqa: F811
    objects, _ = render(chart)
    rendered, defaults = gateway_settings(objects), Settings()
    for field in FIELDS.values():
        assert getattr(rendered, field) == getattr(defaults, field), field


def test_limits_set_in_values_reach_the_gateway(chart) -> None:  # noqa: F811
    values = {"maxJsonBodyBytes": 8192, "headerTimeoutSeconds": 12.5, "maxHeaderBytes": 32768,
              "bodyIdleTimeoutSeconds": 7, "bodyMinBytesPerSecond": 0, "maxConcurrentUploads": 40,
              "maxConcurrentUploadsPerProject": 10, "retryAfterSeconds": 2, "tmpMaxAgeSeconds": 86400,
              "tmpCleanupIntervalSeconds": 0}
    objects, _ = render(chart, {"gateway": {"limits": values}})
    rendered = gateway_settings(objects)
    for key, field in FIELDS.items():
        assert getattr(rendered, field) == values[key], field


@pytest.mark.parametrize("bad", [{"maxJsonBodyBytes": "big"}, {"maxConcurrentUploads": 0}, {"typo": 1}])
def test_the_values_schema_refuses_bad_limits(chart, bad) -> None:  # noqa: F811
    with pytest.raises(Exception, match="(?i)schema|limits|validat"):
        render(chart, {"gateway": {"limits": bad}})


@pytest.mark.parametrize("project", ["a/b", "../x", "-x"])
def test_the_values_schema_refuses_an_odd_generated_key_project(chart, project) -> None:  # noqa: F811
    with pytest.raises(Exception, match="(?i)schema|project|validat"):
        render(chart, {"apiKeys": {"generate": {"project": project}}})
