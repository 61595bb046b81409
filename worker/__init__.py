"""agentless: the worker and the core shared with the callback API."""

__version__ = "0.1.0"
