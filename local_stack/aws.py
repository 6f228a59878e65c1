"""The local stand-in for AWS: a moto server with the landing bucket, the event queue and its dead-letter queue.

Wiring as in production: every object created under the landing prefix sends an S3 event to the queue; a
message received more than ``max_receive_count`` times moves to the dead-letter queue. moto keeps nothing
across restarts, so `configure` is run on every `cdc stack up` and is idempotent.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import botocore.config

from local_stack.processes import ServerProcess, StackError

REGION = "us-east-1"
ACCESS_KEY = "local"
SECRET_KEY = "local"  # moto accepts any credentials; these are not secrets


@dataclass(frozen=True)
class AwsNames:
    bucket: str
    prefix: str
    queue: str
    dead_letter_queue: str
    max_receive_count: int
    visibility_timeout_s: int


@dataclass(frozen=True)
class MotoServer:
    port: int
    root: Path

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def process(self) -> ServerProcess:
        return ServerProcess("moto (S3+SQS)", self.port, self.root / "moto.pid", self.root / "moto.log")

    def _ready(self) -> bool:
        with urllib.request.urlopen(f"{self.endpoint_url}/moto-api/", timeout=1) as response:
            return bool(response.status == 200)

    def start(self) -> None:
        if importlib.util.find_spec("moto.server") is None:
            raise StackError(
                "moto[server] is not installed: pip install -e '.[local]' (make demo does this)."
            )
        self.process.start(  # moto_server, with its SQS clock made cheap (local_stack/moto_server.py)
            [sys.executable, "-m", "local_stack.moto_server", "-H", "127.0.0.1", "-p", str(self.port)],
            ready=self._ready,
            timeout=30,
        )

    def stop(self) -> bool:
        return self.process.stop()

    def client(self, service: str) -> Any:
        return boto3.client(  # type: ignore[call-overload]
            service,
            endpoint_url=self.endpoint_url,
            region_name=REGION,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            config=botocore.config.Config(retries={"max_attempts": 2}),
        )

    def configure(self, names: AwsNames) -> dict[str, str]:
        """Create bucket, queues and the S3 -> SQS notification; returns the queue URLs."""
        s3 = self.client("s3")
        sqs = self.client("sqs")
        existing = {bucket["Name"] for bucket in s3.list_buckets().get("Buckets", [])}
        if names.bucket not in existing:
            s3.create_bucket(Bucket=names.bucket)
        dlq_url = sqs.create_queue(QueueName=names.dead_letter_queue)["QueueUrl"]
        dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["QueueArn"])["Attributes"][
            "QueueArn"
        ]
        queue_url = sqs.create_queue(QueueName=names.queue)["QueueUrl"]
        queue_arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])["Attributes"][
            "QueueArn"
        ]
        sqs.set_queue_attributes(
            QueueUrl=queue_url,
            Attributes={
                "VisibilityTimeout": str(names.visibility_timeout_s),
                "RedrivePolicy": json.dumps(
                    {"deadLetterTargetArn": dlq_arn, "maxReceiveCount": str(names.max_receive_count)}
                ),
                "Policy": json.dumps(
                    {
                        "Version": "2012-10-17",
                        "Statement": [
                            {
                                "Effect": "Allow",
                                "Principal": {"Service": "s3.amazonaws.com"},
                                "Action": "sqs:SendMessage",
                                "Resource": queue_arn,
                                "Condition": {"ArnLike": {"aws:SourceArn": f"arn:aws:s3:::{names.bucket}"}},
                            }
                        ],
                    }
                ),
            },
        )
        s3.put_bucket_notification_configuration(
            Bucket=names.bucket,
            NotificationConfiguration={
                "QueueConfigurations": [
                    {
                        "Id": "cdc-landing-object-created",
                        "QueueArn": queue_arn,
                        "Events": ["s3:ObjectCreated:*"],
                        "Filter": {
                            "Key": {
                                "FilterRules": [{"Name": "prefix", "Value": names.prefix.rstrip("/") + "/"}]
                            }
                        },
                    }
                ]
            },
        )
        return {"queue_url": queue_url, "dlq_url": dlq_url}

    def health(self, names: AwsNames) -> str:
        if not self.process.is_running():
            return "stopped"
        try:
            s3 = self.client("s3")
            s3.head_bucket(Bucket=names.bucket)
            sqs = self.client("sqs")
            url = sqs.get_queue_url(QueueName=names.queue)["QueueUrl"]
            depth = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["ApproximateNumberOfMessages"])
            dlq = sqs.get_queue_url(QueueName=names.dead_letter_queue)["QueueUrl"]
            dlq_depth = sqs.get_queue_attributes(QueueUrl=dlq, AttributeNames=["ApproximateNumberOfMessages"])
        except Exception as exc:
            return f"unhealthy: {exc}"
        return (
            f"healthy (bucket {names.bucket}, queue depth {depth['Attributes']['ApproximateNumberOfMessages']}, "
            f"dead letters {dlq_depth['Attributes']['ApproximateNumberOfMessages']})"
        )
