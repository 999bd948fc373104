"""One digits pipeline run shared by the pipeline and subcommand tests (the expensive part)."""

from __future__ import annotations

import pytest

from tests.pipeline.runs import config, run


@pytest.fixture(scope="package")
def first_run(tmp_path_factory):
    """(folder of the configs, run directory) of one uninterrupted run of `runs.CONFIG`."""
    tmp = tmp_path_factory.mktemp("pipeline")
    out = tmp / "run"
    assert set(run(config(tmp), out).values()) == {"ran"}
    return tmp, out
