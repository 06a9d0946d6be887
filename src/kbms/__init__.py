"""kbms: conversation ingestion service."""

__version__ = "0.1.0"
