"""The runtimed service."""
