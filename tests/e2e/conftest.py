"""The ``cluster`` fixture for the end-to-end tests: real daemons (in lab hosts or on
loopback), every process stopped and every namespace removed afterwards, the daemons' logs
printed when the test failed."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from tests.e2e.harness import Cluster

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path


@pytest.fixture
def cluster(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Cluster]:
    made = Cluster(tmp_path)
    failures = request.session.testsfailed
    try:
        yield made
    finally:
        if request.session.testsfailed != failures:
            print(made.logs())  # pytest shows it under "Captured stdout teardown"
        made.close()
