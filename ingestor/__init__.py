"""billing-ingestor: durable, exactly-once usage metering for billing."""

__all__ = ["__version__"]

__version__ = "0.1.0"
