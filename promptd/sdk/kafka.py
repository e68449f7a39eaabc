"""The Kafka side of the sender thread: an aiokafka producer with bounded operations.

Imported only inside the sender thread, so ``import promptd`` never loads aiokafka.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from aiokafka import AIOKafkaProducer

from promptd.sdk.config import SdkConfig
from promptd.sdk.encode import Record
from promptd.sdk.stats import Counters


def producer_options(config: SdkConfig) -> dict[str, Any]:
    """aiokafka producer options for the SDK (acks=all, bounded requests)."""
    options: dict[str, Any] = {
        "bootstrap_servers": config.bootstrap_servers,
        "client_id": config.client_id,
        "acks": "all",
        # Off by default only because the development broker lacks it; turn it on
        # (PROMPTD_KAFKA_ENABLE_IDEMPOTENCE=true) for real Kafka clusters.
        "enable_idempotence": config.enable_idempotence,
        "linger_ms": 5,
        "request_timeout_ms": max(1000, int(config.send_timeout_s * 1000)),
        "security_protocol": config.security_protocol,
        "max_request_size": 1_048_576,
    }
    if config.sasl_mechanism:
        options["sasl_mechanism"] = config.sasl_mechanism
        options["sasl_plain_username"] = config.sasl_username
        options["sasl_plain_password"] = config.sasl_password
    return options


class KafkaSink:
    """Connects, sends batches and closes, each step bounded in time and never raising."""

    def __init__(self, config: SdkConfig) -> None:
        self.config = config
        self.connected = False
        self._producer: Any = None

    async def connect(self, counters: Counters, timeout_s: float) -> bool:
        """Start a producer; False (counted) when the broker does not answer in time."""
        await self.close(counters, timeout_s)
        producer = AIOKafkaProducer(**producer_options(self.config))
        self._producer = producer
        try:
            await asyncio.wait_for(producer.start(), timeout_s)
        except Exception as exc:
            counters.error("connect", exc)
            await self.close(counters, timeout_s)
            return False
        self.connected = True
        return True

    async def send(self, records: list[Record], counters: Counters) -> bool:
        """Send records and wait for every ack; retries, then False (counted)."""
        for attempt in range(self.config.send_retries + 1):
            if attempt:
                await asyncio.sleep(min(0.1 * 2**attempt, 1.0))
            try:
                await asyncio.wait_for(self._send_all(records), self.config.send_timeout_s)
            except Exception as exc:
                counters.error("send", exc)
                continue
            return True
        # The broker is probably gone: reconnect before the next batch.
        self.connected = False
        return False

    async def _send_all(self, records: list[Record]) -> None:
        producer = self._producer
        futures = [await producer.send(topic, value, key=key) for topic, key, value in records]
        await asyncio.gather(*futures)

    async def close(self, counters: Counters, timeout_s: float) -> None:
        """Stop the producer (flushing what it holds) within ``timeout_s``."""
        producer, self._producer = self._producer, None
        self.connected = False
        if producer is None:
            return
        try:
            await asyncio.wait_for(producer.stop(), timeout_s)
        except Exception:
            counters.error("close")
        with contextlib.suppress(Exception):
            # A stop cut short leaves the client's connections open; close them.
            await asyncio.wait_for(producer.client.close(), 0.5)
