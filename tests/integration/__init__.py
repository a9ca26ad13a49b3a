"""Integration tests against real broker / S3 / Prometheus processes (helpers: `from .conftest import ...`)."""
