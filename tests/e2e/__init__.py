"""End-to-end tests: real server processes, real HTTP, real files."""
