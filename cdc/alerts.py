"""Posting an alert: a Slack-compatible incoming webhook (`text` plus `blocks`; Mattermost, Teams workflows and
Google Chat accept `text` too). Used by the capture and by the Dagster alert sensors. The URL is a secret
(CDC_ALERT_WEBHOOK_URL, environment only); without one, alerts are only logged."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import requests

from cdc import settings


@dataclass(frozen=True)
class Webhook:
    url: str = field(default="", repr=False)
    timeout_s: float = 10.0

    def post(self, title: str, lines: list[str], log: Any) -> bool:
        """Log the alert and post it; True when posted. A webhook that refuses it raises, naming the variable."""
        text = f"*{title}*\n" + "\n".join(f"• {line}" for line in lines)
        log.warning(f"alert: {title}: {' | '.join(lines)}")
        if not self.url:
            return False
        payload: dict[str, Any] = {
            "text": text,
            "blocks": [{"type": "section", "text": {"type": "mrkdwn", "text": text[:2900]}}],
        }
        response = requests.post(self.url, json=payload, timeout=self.timeout_s)
        if response.status_code >= 300:
            raise RuntimeError(
                f"alert webhook answered {response.status_code}: {response.text[:200]}; "
                f"check {settings.ALERT_WEBHOOK_URL}"
            )
        return True
