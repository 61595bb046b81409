"""The few errors agentless raises; each message says what to fix."""


class AgentlessError(Exception):
    """Base of every error agentless raises on purpose."""


class ConfigError(AgentlessError):
    """A setting is missing, malformed or points at something unreachable."""


class InvalidTask(AgentlessError):
    """A task message that can never be processed; the message says why."""


class EgressRefused(AgentlessError):
    """The egress policy forbids calling this address."""


class UsageError(AgentlessError):
    """A command was given something it cannot use; the message says what."""
