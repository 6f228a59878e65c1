"""The local S3 + SQS server: moto's `moto_server`, with its SQS clock made cheap.

moto 5.2.5 works out "now" through timezone-aware datetimes (~6 us a call) and its SQS asks for it for every message
in the queue, several times per call: receiving 10 messages took 38 ms from a queue of 100, 0.3 s from 1,000 and
0.9 s from 3,000 unacknowledged messages (measured here). Real SQS does not slow down as it fills; a local queue
that does makes the pipeline fall behind once it is behind. This launcher gives moto's SQS the same clock from
`time.time()` (identical values: epoch seconds and milliseconds).

For the same reason a queue's attributes are worked out only when asked for: moto computes all of them (three of
them count the messages in the queue) for every message sent - each S3 event - and every message received, to read
one setting (`ContentBasedDeduplication`, `MessageRetentionPeriod`). The values are moto's own; nothing else is
changed.

moto's dispatcher also lists its own package folder (a stat per entry) for every request, under a global lock, to
ask whether the request's host names one of its modules: the list is made once.

And S3 lists a prefix by walking only the keys under it: moto walks every key of the bucket for each listing, and a
landing bucket gains a file per table per flush (a day of the demo: over a million keys, each load's listing of its
table then costing seconds). Each bucket keeps its key names sorted; a listing takes the names under its prefix
from there and answers as moto does (the same code after that walk).

    python -m local_stack.moto_server -H 127.0.0.1 -p PORT     (the same arguments as moto_server)
"""

from __future__ import annotations

import datetime as dt
import json
import sys
import time
from collections.abc import Iterator, Mapping
from typing import Any


def unix_time(when: dt.datetime | None = None) -> float:
    """moto's `unix_time`: epoch seconds of a naive UTC datetime, or of now."""
    if when is None:
        return time.time()
    return (when - dt.datetime(1970, 1, 1)).total_seconds()


def unix_time_millis(when: dt.datetime | None = None) -> float:
    return unix_time(when) * 1000.0


def patch_sqs_clock() -> None:
    from moto.core import utils
    from moto.sqs import models

    for module in (utils, models):
        setattr(module, "unix_time", unix_time)  # noqa: B010 - the names moto's SQS calls, replaced
        setattr(module, "unix_time_millis", unix_time_millis)  # noqa: B010


class LazyQueueAttributes(Mapping[str, Any]):
    """moto's `Queue.attributes` dict, each value computed when read (same keys, same values)."""

    def __init__(self, queue: Any) -> None:
        self.queue = queue
        names = list(queue.BASE_ATTRIBUTES)
        if queue.fifo_queue:
            names += queue.FIFO_ATTRIBUTES
        if queue.kms_master_key_id:
            names += queue.KMS_ATTRIBUTES
        if queue.policy:
            names.append("Policy")
        if queue.redrive_policy:
            names.append("RedrivePolicy")
        self.names = list(dict.fromkeys(names))

    def __getitem__(self, name: str) -> Any:
        from moto.core.utils import camelcase_to_underscores

        if name not in self.names:
            raise KeyError(name)
        if name == "Policy":
            value = self.queue.policy
        elif name == "RedrivePolicy":
            value = json.dumps(self.queue.redrive_policy)
        else:
            value = getattr(self.queue, camelcase_to_underscores(name))
        return str(value).lower() if isinstance(value, bool) else value

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def patch_queue_attributes() -> None:
    import functools

    from moto.sqs import models

    current = models.Queue.__dict__["attributes"]
    if isinstance(current, property) and current.fget is LazyQueueAttributes:
        return  # patched already
    models.Queue.attributes = property(LazyQueueAttributes)  # type: ignore[assignment,method-assign]
    original = models.SQSBackend.get_queue_attributes

    @functools.wraps(original)
    def get_queue_attributes(self: Any, queue_name: str, attribute_names: list[str]) -> dict[str, Any]:
        return dict(original(self, queue_name, attribute_names))  # the answer is a plain dict, as before

    models.SQSBackend.get_queue_attributes = get_queue_attributes  # type: ignore[method-assign]


def patch_module_list() -> None:
    """moto's `list_of_moto_modules`, listed once (the same names, in the same order)."""
    from moto import backends

    if getattr(backends.list_of_moto_modules, "_cdc_listed_once", False):
        return
    modules = tuple(backends.list_of_moto_modules())

    def list_of_moto_modules() -> tuple[str, ...]:
        return modules

    list_of_moto_modules._cdc_listed_once = True  # type: ignore[attr-defined]
    backends.list_of_moto_modules = list_of_moto_modules  # type: ignore[assignment]


def patch_s3_listing() -> None:
    import bisect
    import functools
    import threading

    from moto.s3 import models, utils

    store = utils._VersionedKeyStore
    if getattr(store, "_cdc_sorted_names", False):
        return  # patched already
    lock = threading.Lock()

    def sorted_names(keys: Any) -> list[str]:
        """The bucket's key names, sorted (built at the first listing, then kept up to date)."""
        names = keys.__dict__.get("_names")
        if names is None:
            with lock:
                names = keys.__dict__.setdefault("_names", sorted(dict.keys(keys)))
        return names  # type: ignore[no-any-return]

    def adding(method: Any) -> Any:
        @functools.wraps(method)
        def wrapper(self: Any, key: str, *args: Any, **kwargs: Any) -> Any:
            with lock:
                new = not dict.__contains__(self, key)
                result = method(self, key, *args, **kwargs)
                names = self.__dict__.get("_names")
                if new and names is not None and dict.__contains__(self, key):
                    bisect.insort(names, key)
                return result

        return wrapper

    original_pop = store.pop

    @functools.wraps(original_pop)
    def pop(self: Any, key: str) -> None:
        with lock:
            original_pop(self, key)
            names = self.__dict__.get("_names")
            if names is not None:
                at = bisect.bisect_left(names, key)
                if at < len(names) and names[at] == key:
                    del names[at]

    store.__setitem__ = adding(store.__setitem__)  # type: ignore[method-assign]
    store.setlist = adding(store.setlist)  # type: ignore[method-assign]
    store.pop = pop  # type: ignore[method-assign]
    store._cdc_sorted_names = True  # type: ignore[attr-defined]

    class UnderPrefix(dict):  # type: ignore[type-arg]
        """What moto's listing walks (`.items()`): the keys under one prefix only, the latest version of each."""

        def __init__(self, keys: Any, prefix: str) -> None:
            super().__init__()
            names = sorted_names(keys)
            at = bisect.bisect_left(names, prefix)
            while at < len(names) and names[at].startswith(prefix):
                versions = keys.getlist(names[at])
                if versions:
                    self[names[at]] = versions[-1]
                at += 1

    original_list = models.S3Backend.list_objects

    @functools.wraps(original_list)
    def list_objects(self: Any, bucket: Any, prefix: str | None, *args: Any, **kwargs: Any) -> Any:
        if not prefix or not isinstance(bucket.keys, store):
            return original_list(self, bucket, prefix, *args, **kwargs)
        view: Any = _BucketView(bucket, UnderPrefix(bucket.keys, prefix))
        return original_list(self, view, prefix, *args, **kwargs)

    models.S3Backend.list_objects = list_objects  # type: ignore[method-assign]


class _BucketView:
    """A bucket whose `keys` are the ones under a listing's prefix (everything else: the bucket's own)."""

    def __init__(self, bucket: Any, keys: dict[str, Any]) -> None:
        self.__dict__["_bucket"] = bucket
        self.__dict__["keys"] = keys

    def __getattr__(self, name: str) -> Any:
        return getattr(self._bucket, name)


def main(argv: list[str] | None = None) -> None:
    patch_sqs_clock()
    patch_queue_attributes()
    patch_s3_listing()
    patch_module_list()
    from moto.server import main as moto_main

    moto_main(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
