"""The labels the operator puts on a Batch applied without them (kubectl), so the CR
store's labelled lists find it."""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st
from vbatch.core.projects import PROJECT_ID_PATTERN
from vbatch.operator.builders import LABEL_BATCH, LABEL_PROJECT, missing_labels, project_label

LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def test_a_batch_without_labels_gets_both():
    assert missing_labels("batch-1", {"project": "team-a"}, None) == {LABEL_PROJECT: "team-a", LABEL_BATCH: "batch-1"}


def test_right_labels_need_nothing_and_a_wrong_project_label_is_corrected():
    right = {LABEL_PROJECT: "team-a", LABEL_BATCH: "batch-1", "other": "x"}
    assert missing_labels("batch-1", {"project": "team-a"}, right) == {}
    assert missing_labels("batch-1", {"project": "team-a"}, right | {LABEL_PROJECT: "team-b"}) == {
        LABEL_PROJECT: "team-a"}


def test_a_project_needing_sanitising_gets_its_label_safe_value():
    project = "Team.B_" + "x" * 56 + "-"
    labels = missing_labels("batch-1", {"project": project}, {})
    assert labels[LABEL_PROJECT] == project_label(project) != project
    assert len(labels[LABEL_PROJECT]) <= 63 and LABEL_VALUE.match(labels[LABEL_PROJECT])


def test_no_project_no_project_label():
    assert missing_labels("batch-1", {}, None) == {LABEL_BATCH: "batch-1"}


@given(st.from_regex(PROJECT_ID_PATTERN, fullmatch=True), st.from_regex(PROJECT_ID_PATTERN, fullmatch=True))
def test_project_labels_are_valid_and_distinct(a, b):
    assert LABEL_VALUE.match(project_label(a)) and len(project_label(a)) <= 63
    if a != b:
        assert project_label(a) != project_label(b)
