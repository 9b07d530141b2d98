"""The ``steerserve`` command itself: --version, quiet dependencies, --json on ``info``."""

from __future__ import annotations

import json
import warnings

from typer.testing import CliRunner

from cli.main import app, quiet_dependencies, version


def test_version():
    r = CliRunner().invoke(app, ["--version"])
    assert r.exit_code == 0 and r.stdout.strip() == f"steerserve {version()}" and version() != "unknown"


def test_dependency_deprecations_are_filtered_but_not_our_errors(monkeypatch):
    import sys

    monkeypatch.setattr(sys, "warnoptions", [])
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet_dependencies()
        warnings.warn("old API", DeprecationWarning, stacklevel=1)
        warnings.warn("will change", FutureWarning, stacklevel=1)
        warnings.warn("a real problem", RuntimeWarning, stacklevel=1)
    assert [str(w.message) for w in seen] == ["a real problem"]


def test_transformers_deprecation_logs_are_dropped():
    import logging

    from transformers.utils import logging as hf_logging

    from cli.common import quiet_transformers

    quiet_transformers()
    root = hf_logging.get_logger("transformers")
    assert root.handlers

    def record(msg: str) -> logging.LogRecord:
        return logging.LogRecord("transformers.modeling_utils", logging.WARNING, __file__, 1, msg, None, None)

    for handler in root.handlers:
        assert not handler.filter(record("`torch_dtype` is deprecated! Use `dtype` instead!"))
        assert handler.filter(record("Some weights of the model were not initialized"))


def test_info_json(tiny_dir):
    r = CliRunner().invoke(app, ["info", "--model", str(tiny_dir), "--device", "cpu", "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["num_layers"] == 4 and data["hidden_size"] == 64 and data["device"] == "cpu"
