"""Imported once by the local code server's fork server (sitecustomize.PRELOAD), so that every run worker forked
from it starts with this work done: the code location's module imported and the S3 and SQS service models parsed
into the process's shared botocore loader (cdc.clients.aws_session). Then all that is frozen out of the garbage
collector's scans: a scan writes to the header of every object it visits, which copies each page the fork server
shares with a run worker into that worker (docs/local-stack.md, "Dagster")."""

import gc

import definitions  # noqa: F401  (imported for its imports)
from cdc.clients import preload_aws_models

preload_aws_models()
gc.collect()
gc.freeze()
