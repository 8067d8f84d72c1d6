"""Reference-data tests fail, never skip, under CI when ../shared/reference is missing."""
import pytest

import conftest


def test_missing_reference_fails_under_ci_and_skips_elsewhere(monkeypatch, tmp_path):
    monkeypatch.setattr(conftest, "REFERENCE", tmp_path / "nowhere")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="reference data not found"):
        conftest.reference_path("dit_official", "tiny.json")
    monkeypatch.setenv("CI", "false")
    with pytest.raises(pytest.skip.Exception):
        conftest.reference_path("dit_official", "tiny.json")
