"""Kafka edges: client options, topic creation, and a producer whose sends time out.

aiokafka's ``send`` can wait forever for metadata of a topic that does not exist or a
broker that is gone; every send here is bounded by ``send_timeout_s`` and failures are
raised as :class:`KafkaSendError` for the caller to count and retry.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Any

import structlog
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.client import AIOKafkaClient, CoordinationType
from aiokafka.errors import KafkaError, NoError, TopicAlreadyExistsError, for_code
from aiokafka.protocol.group import LeaveGroupRequest

from promptd.daemon.settings import KafkaSettings

log = structlog.get_logger("promptd.kafka")

Headers = Sequence[tuple[str, bytes]]


class KafkaSendError(RuntimeError):
    """A record could not be delivered within the send timeout."""

    retriable = True

    def __init__(self, topic: str, reason: str) -> None:
        super().__init__(f"send to {topic!r} failed: {reason}")
        self.topic = topic
        self.reason = reason


def client_options(kafka: KafkaSettings, bootstrap: str) -> dict[str, Any]:
    """Connection options shared by every aiokafka client of the daemon."""
    options: dict[str, Any] = {
        "bootstrap_servers": bootstrap,
        "client_id": kafka.client_id,
        "request_timeout_ms": kafka.request_timeout_ms,
        "security_protocol": kafka.security_protocol,
    }
    if kafka.sasl_mechanism:
        options["sasl_mechanism"] = kafka.sasl_mechanism
        options["sasl_plain_username"] = kafka.sasl_username
        options["sasl_plain_password"] = kafka.sasl_password
    return options


async def ensure_topics(kafka: KafkaSettings, bootstrap: str, timeout_s: float = 15.0) -> list[str]:
    """Create the daemon's topics that are missing; returns the names created."""
    admin = AIOKafkaAdminClient(**client_options(kafka, bootstrap))
    try:
        # Inside the try: a start cut short (a timeout, a cancelled term) still closes
        # the connections it opened.
        await asyncio.wait_for(admin.start(), timeout_s)
        existing = set(await asyncio.wait_for(admin.list_topics(), timeout_s))
        wanted = [
            NewTopic(t, kafka.topic_partitions, kafka.replication_factor)
            for t in (
                kafka.metrics_topic,
                kafka.feedback_topic,
                kafka.dlq_topic,
                kafka.alerts_topic,
                kafka.optimization_topic,
                kafka.otlp_topic,
            )
            if t is not None and t not in existing
        ]
        if kafka.routing_topic not in existing:
            # Compacted: readers want the latest routing per prompt (the key).
            wanted.append(
                NewTopic(
                    kafka.routing_topic,
                    1,
                    kafka.replication_factor,
                    topic_configs={"cleanup.policy": "compact"},
                )
            )
        if not wanted:
            return []
        # Another instance may win the race; the topics exist, which is all we need.
        with contextlib.suppress(TopicAlreadyExistsError):
            await asyncio.wait_for(admin.create_topics(wanted), timeout_s)
        names = [t.name for t in wanted]
        log.info("topics_created", topics=names)
        return names
    finally:
        await admin.close()


async def group_members(
    kafka: KafkaSettings, bootstrap: str, timeout_s: float = 5.0
) -> list[tuple[str, str]] | None:
    """``(member_id, host)`` of each member of the daemon's consumer group, ``None`` when
    the group cannot be described (the test broker leaves hosts empty)."""
    admin = AIOKafkaAdminClient(**client_options(kafka, bootstrap))
    try:
        await asyncio.wait_for(admin.start(), timeout_s)
        answers = await asyncio.wait_for(
            admin.describe_consumer_groups([kafka.group_id]), timeout_s
        )
    except Exception as exc:
        log.info("describe_group_failed", error=repr(exc))
        return None
    finally:
        with contextlib.suppress(Exception):
            await admin.close()
    members = []
    for answer in answers:
        for group in getattr(answer, "groups", ()):
            # (error_code, group, state, protocol_type, protocol, members, …)
            for member in group[5]:
                members.append((str(member[0]), str(member[2])))
    return members


async def describe_group_members(
    kafka: KafkaSettings, bootstrap: str, timeout_s: float = 5.0
) -> list[str]:
    """The members of the daemon's consumer group as ``member_id@host``, best effort.

    Only to name them in an error: any failure (or a broker that leaves the fields
    empty, as the test broker does for hosts) gives what is known, possibly nothing.
    """
    members = await group_members(kafka, bootstrap, timeout_s) or []
    return [f"{member}@{host}" if host else member for member, host in members]


async def remove_group_member(
    kafka: KafkaSettings, bootstrap: str, member_id: str, timeout_s: float = 5.0
) -> None:
    """Make the broker drop ``member_id`` from the daemon's consumer group now (a
    LeaveGroup on its behalf), instead of when its session expires. Only for a member
    known to be dead: a live one is thrown out of the group and has to rejoin."""
    client = AIOKafkaClient(**client_options(kafka, bootstrap))
    try:
        await asyncio.wait_for(client.bootstrap(), timeout_s)
        node = await asyncio.wait_for(
            client.coordinator_lookup(CoordinationType.GROUP, kafka.group_id), timeout_s
        )
        response = await asyncio.wait_for(
            client.send(node, LeaveGroupRequest(kafka.group_id, member_id)), timeout_s
        )
    finally:
        await client.close()
    error = for_code(response.error_code)
    if error is not NoError:
        raise error(f"LeaveGroup for {member_id!r}")


class Producer:
    """An aiokafka producer with bounded sends, started and stopped with the daemon."""

    def __init__(self, kafka: KafkaSettings, bootstrap: str) -> None:
        self._kafka = kafka
        self._producer = AIOKafkaProducer(
            **client_options(kafka, bootstrap),
            acks="all",
            enable_idempotence=kafka.enable_idempotence,
            linger_ms=5,
            max_request_size=max(kafka.max_record_bytes * 2, 1_048_576),
        )

    async def start(self) -> None:
        """Connect to the cluster (raises aiokafka's errors when unreachable)."""
        await asyncio.wait_for(self._producer.start(), self._kafka.send_timeout_s)

    async def stop(self) -> None:
        """Flush and close."""
        try:
            await asyncio.wait_for(self._producer.stop(), self._kafka.send_timeout_s)
        except (TimeoutError, KafkaError) as exc:
            log.warning("producer_stop_failed", error=repr(exc))

    async def send(
        self,
        topic: str,
        value: bytes | None,
        key: bytes | None = None,
        headers: Headers | None = None,
    ) -> None:
        """Send one record and wait for the broker's ack, at most ``send_timeout_s``."""
        try:
            await asyncio.wait_for(
                self._producer.send_and_wait(topic, value, key=key, headers=list(headers or [])),
                self._kafka.send_timeout_s,
            )
        except TimeoutError:
            raise KafkaSendError(topic, "timed out") from None
        except KafkaError as exc:
            raise KafkaSendError(topic, repr(exc)) from exc

    async def send_many(
        self, topic: str, records: Sequence[tuple[bytes | None, bytes | None, Headers]]
    ) -> None:
        """Send ``(key, value, headers)`` records and wait for every ack, bounded in time."""
        if not records:
            return

        async def _send_all() -> None:
            futures = [
                await self._producer.send(topic, value, key=key, headers=list(headers))
                for key, value, headers in records
            ]
            await asyncio.gather(*futures)

        try:
            await asyncio.wait_for(_send_all(), self._kafka.send_timeout_s)
        except TimeoutError:
            raise KafkaSendError(topic, "timed out") from None
        except KafkaError as exc:
            raise KafkaSendError(topic, repr(exc)) from exc
