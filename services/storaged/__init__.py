"""The storaged service."""
