"""The netd service."""
