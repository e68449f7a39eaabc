"""Sliding windows, alert rules and their lifecycle, alert sinks, Prometheus metrics."""
