"""The pytest plugin (entry point `pytest11: qsnap`): the session-scoped `qsnap` fixture.

A session-scoped golden and a fork per test, in a conftest.py:

    @pytest.fixture(scope="session")
    def golden(qsnap: Qsnap) -> Golden:
        return qsnap.golden(ARGV, ready=console_prints("login:"))

    @pytest.fixture
    def vm(golden: Golden) -> Iterator[Vm]:
        with golden.fork() as vm:
            yield vm
"""

from __future__ import annotations

import shutil
from typing import Iterator

import pytest

from .client import Qsnap


@pytest.fixture(scope="session")
def qsnap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Qsnap]:
    """A `Qsnap` on a temporary store of this session, running the `qsnap` found on PATH.
    Every VM it made is stopped and removed when the session ends, also after failures."""
    binary = shutil.which("qsnap")
    if binary is None:
        pytest.fail("pytest-qsnap: no `qsnap` on PATH (install qsnap: cargo install --path cli)", pytrace=False)
    qs = Qsnap(tmp_path_factory.mktemp("qsnap-store"), binary=binary)
    try:
        yield qs
    finally:
        qs.close()
