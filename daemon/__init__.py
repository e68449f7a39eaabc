"""The daemon process: settings, CLI, lifecycle, ingestion, HTTP API, embedded broker."""
