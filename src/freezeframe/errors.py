"""Typed errors. Each message says what went wrong and what the user can do about it."""

from __future__ import annotations


class FreezeframeError(Exception):
    """Base of every error the CLI turns into one line and an exit code."""

    exit_code = 1


class NotFound(FreezeframeError):
    exit_code = 2


class InstanceNotFound(NotFound):
    pass


class SetNotFound(NotFound):
    pass


class InvalidRequest(FreezeframeError):
    exit_code = 3


class InstanceBusy(FreezeframeError):
    """Another freezeframe operation on the same instance is in flight."""

    exit_code = 4


class PreflightFailed(FreezeframeError):
    exit_code = 5


class ConsistencyUnavailable(FreezeframeError):
    """--require was given and the requested level cannot be reached."""

    exit_code = 6


class CaptureFailed(FreezeframeError):
    exit_code = 7


class FreezeWindowExceeded(CaptureFailed):
    pass


class RepositoryFull(CaptureFailed):
    """The repository ran out of space during the copy (after preflight found enough)."""


class HypervisorError(FreezeframeError):
    exit_code = 8


class AgentUnavailable(HypervisorError):
    """The guest agent is missing, not connected or did not answer in time."""


class InsufficientSpace(PreflightFailed):
    pass


class CatalogError(FreezeframeError):
    exit_code = 9
