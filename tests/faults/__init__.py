"""Fault injection against real server processes (issue 4)."""
