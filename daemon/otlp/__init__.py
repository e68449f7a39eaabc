"""OpenTelemetry spans as a second source of calls and feedback.

- :mod:`.wire`: OTLP trace records as the OpenTelemetry Collector's Kafka exporter frames
  them (``otlp_proto``, ``otlp_json``), decoded and encoded with the official protobuf
  definitions (``opentelemetry-proto``);
- :mod:`.conventions`: the attribute names read, per convention and version;
- :mod:`.mapping`: one span to a call and its feedback (pure);
- :mod:`.decoder`: the ingest decoder of the OTLP topic (record to rows).

Only the daemon imports this package: ``import promptd`` never loads protobuf.
"""
