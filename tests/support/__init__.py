"""Helpers shared by the suites that run real ingestor servers (e2e, crash, fault)."""
