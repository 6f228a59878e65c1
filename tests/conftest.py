"""Shared fixtures: the tests start the real servers they need on free ports, in a temporary state folder."""

from __future__ import annotations

import json
import os
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import pytest
from google.cloud import bigquery
from google.cloud.bigquery.retry import DEFAULT_RETRY

from cdc.clients import bigquery_client
from cdc.mappings import load_mappings
from cdc.settings import STATE_DIR
from local_stack.bigquery_emulator import BigQueryEmulatorServer
from local_stack.postgres import PostgresServer
from local_stack.processes import free_port
from local_stack.stack import LocalStack
from tests.support.commands import run_cdc
from tests.support.webhook import Receiver


def pytest_configure(config: pytest.Config) -> None:
    """The test processes take the interrupt signals' default actions even when started from a background job
    (which ignores SIGINT and SIGQUIT): Dagster maps SIGTERM to SIGINT's handler after each execution on the main
    thread (`dagster._utils.interrupts`), so an ignored SIGINT became an ignored SIGTERM, inherited by every process a
    test started afterwards - Dagster's compute-log `tail` processes then outlived their run, whose end waited a
    minute for them."""
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    for number in (signal.SIGTERM, signal.SIGQUIT):
        if signal.getsignal(number) == signal.SIG_IGN:
            signal.signal(number, signal.SIG_DFL)


# Set by the meta-test that proves each conformance test fails on the unpatched emulator.
STOCK_EMULATOR = os.environ.get("CDC_TEST_BIGQUERY_STOCK") == "1"
TEST_PROJECT = "test-project"


def bigquery_scope(fixture_name: str, config: pytest.Config) -> Literal["session", "function"]:
    """One BigQuery server for the session; under the meta-test one per test, so that a test which wedges the stock
    server fails alone and every other test fails (or not) on its own deviation."""
    return "function" if STOCK_EMULATOR else "session"


@pytest.fixture(scope=bigquery_scope)
def bigquery_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BigQueryEmulatorServer]:
    server = BigQueryEmulatorServer(
        rest_port=free_port(),
        grpc_port=free_port(),
        project=TEST_PROJECT,
        root=tmp_path_factory.mktemp("bigquery"),
        stock=STOCK_EMULATOR,
    )
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope=bigquery_scope)
def bq(bigquery_server: BigQueryEmulatorServer) -> bigquery.Client:
    return bigquery_client(bigquery_server.project, endpoint=bigquery_server.endpoint)


@pytest.fixture
def dataset(bq: bigquery.Client) -> Iterator[str]:
    name = f"ds_{uuid.uuid4().hex[:10]}"
    bq.create_dataset(name)
    yield name
    # Bounded: a server a test left wedged must fail the teardown, not hang the suite.
    bq.delete_dataset(
        name, delete_contents=True, not_found_ok=True, retry=DEFAULT_RETRY.with_deadline(30), timeout=30
    )


@pytest.fixture
def work_dir(tmp_path: Path) -> Path:
    return tmp_path


@pytest.fixture(scope="session")
def local_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    """The whole local platform (6 MariaDB clusters, moto, BigQuery server) on free ports, for the session."""
    state = tmp_path_factory.mktemp("state")
    env = {STATE_DIR: str(state)}
    run_cdc("stack", "up", "--free-ports", env=env)
    stack = LocalStack(load_mappings(), state_dir=state)
    yield stack
    run_cdc("stack", "down", env=env)


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A private PostgreSQL (Debian's package, run as its `postgres` user) for Dagster instance storage."""
    import shutil
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="cdc-test-postgres-"))  # under /tmp: the postgres user must reach it
    server = PostgresServer(port=free_port(), root=root)
    server.start()
    yield server
    server.stop()
    shutil.rmtree(root, ignore_errors=True)


FAULT_REPORT: list[dict[str, Any]] = []


@pytest.fixture(scope="session")
def fault_report() -> list[dict[str, Any]]:
    """Rows of the fault table (tests/test_faults.py), printed at the end of the run and written as JSON to
    $CDC_FAULTS_JSON when set."""
    return FAULT_REPORT


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not FAULT_REPORT:
        return
    columns = ["fault", "rows", "missing", "duplicated", "transactions", "fault_s", "recovered_s", "message"]
    terminalreporter.section(
        "faults: BigQuery vs source after each fault (fault: injection and any remedy; recovered: from its end "
        "and the load's to equality)"
    )
    terminalreporter.write_line(
        f"{'fault':<44} {'rows':>6} {'missing':>7} {'dupl.':>5} {'tx':>4} {'fault':>6} {'recovered':>9}  message"
    )
    for row in FAULT_REPORT:
        terminalreporter.write_line(
            f"{row['fault']:<44} {row['rows']:>6} {row['missing']:>7} {row['duplicated']:>5} "
            f"{row['transactions']:>4} {row['fault_s']:>5.1f}s {row['recovered_s']:>8.1f}s  {row['message'][:90]}"
        )
    target = os.environ.get("CDC_FAULTS_JSON")
    if target:
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        Path(target).write_text(json.dumps([{k: r.get(k) for k in columns} for r in FAULT_REPORT], indent=2))


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    receiver = Receiver()
    yield receiver
    receiver.server.shutdown()


@pytest.fixture(autouse=True)
def _no_receiver_outlives_its_test() -> Iterator[None]:
    """A sensor tick of a test may start the continuous receiver (a thread): it stops with the test."""
    yield
    from sensors import receiver

    receiver.stop_all()
