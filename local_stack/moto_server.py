"""The local S3 + SQS server: moto's `moto_server`, with its SQS clock made cheap.

moto 5.2.5 works out "now" through timezone-aware datetimes (~6 us a call) and its SQS asks for it for every message
in the queue, several times per call: receiving 10 messages took 38 ms from a queue of 100, 0.3 s from 1,000 and
0.9 s from 3,000 unacknowledged messages (measured here). Real SQS does not slow down as it fills; a local queue
that does makes the pipeline fall behind once it is behind. This launcher gives moto's SQS the same clock from
`time.time()` (identical values: epoch seconds and milliseconds); nothing else is changed.

    python -m local_stack.moto_server -H 127.0.0.1 -p PORT     (the same arguments as moto_server)
"""

from __future__ import annotations

import datetime as dt
import sys
import time


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


def main(argv: list[str] | None = None) -> None:
    patch_sqs_clock()
    from moto.server import main as moto_main

    moto_main(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
