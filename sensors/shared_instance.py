"""One Dagster instance per process for every sensor tick. For a sensor with resources (ours all have), Dagster opens
the instance from its reference at every tick (`SensorEvaluationContext.instance`) and disposes of it after; with
SQLite storage (the local platform) opening it reads every schema migration script to check the database's
revision, which in the local code server's profile cost more CPU than the sensors' own work, five sensors ticking
every few seconds. `install()` (called by definitions.py) makes a tick use the process's instance of that reference,
opened once. docs/design.md, "Sensor"."""

from __future__ import annotations

import threading
from typing import Any

import dagster as dg
from dagster._core.definitions.sensor_definition import SensorEvaluationContext
from dagster._core.instance.ref import InstanceRef
from dagster_shared.serdes import serialize_value

_INSTANCES: dict[str, dg.DagsterInstance] = {}
_LOCK = threading.Lock()


def shared_instance(ref: InstanceRef) -> dg.DagsterInstance:
    """This process's instance of `ref`, opened at the first call (DagsterInstance is used from many threads)."""
    key = serialize_value(ref)
    with _LOCK:
        if key not in _INSTANCES:
            _INSTANCES[key] = dg.DagsterInstance.from_ref(ref)
        return _INSTANCES[key]


def install() -> None:
    """Make every sensor tick of this process use `shared_instance` (idempotent)."""
    stock: Any = SensorEvaluationContext.__dict__["instance"]  # the property object
    if getattr(stock.fget, "_cdc_shared", False):
        return

    def instance(self: Any) -> dg.DagsterInstance:
        if not self._instance and self._instance_ref:
            self._instance = shared_instance(self._instance_ref)
        return stock.fget(self)  # type: ignore[no-any-return]

    instance._cdc_shared = True  # type: ignore[attr-defined]
    SensorEvaluationContext.instance = property(instance)  # type: ignore[method-assign,assignment]
