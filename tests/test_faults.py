"""The fault suite's quick rows (`make faults` runs them all): a real cluster on this machine's
RabbitMQ and PostgreSQL, one fault injected with jobs in flight, and every accepted job must end
exactly once, none lost, none stranded, none run twice."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest

from bench import faults
from tests.conftest import need_service

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def broker() -> Iterator[None]:
    need_service("RabbitMQ", 5672)
    need_service("PostgreSQL", 5432)
    if not shutil.which("rabbitmqctl") and not shutil.which("/usr/sbin/rabbitmqctl"):
        pytest.skip("rabbitmqctl is needed to give the suite a vhost of its own")
    faults.prepare_broker()
    yield


@pytest.mark.parametrize("fault", ["worker-hung", "purge"])
def test_no_accepted_job_is_lost_stranded_or_run_twice(fault):
    row = faults.FAULTS[fault]()
    assert row.submitted >= 4 and row.clean, faults.table([row])
