"""The imaged service."""
