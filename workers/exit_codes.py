"""The process exit codes of ``sluice``, and the start-up errors that choose them.

One table for systemd, Kubernetes and humans; README.md's "Exit codes" table lists the
same codes (a unit test compares them). The codes follow BSD ``sysexits.h`` where one
fits (70 EX_SOFTWARE, 75 EX_TEMPFAIL) and the shell's 128 + signal convention for 130 and
143, so a supervisor can tell "retry" from "do not retry" without parsing logs:

- retry: 1, 3, 70, 75 (and 143, an operator's forced stop);
- do not retry: 2 (the same configuration or model will fail the same way).

Start-up failures are raised as :class:`StartupError` subclasses; :data:`STARTUP_ERRORS`
maps each type to its code in one place, instead of catching broad exception families.
This module imports nothing heavy: the CLI uses it before pydantic, numpy or librdkafka
are loaded.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """Every exit status ``sluice`` (``run``, ``demo`` and the other commands) may end with."""

    #: Drained and committed (``run``), or the command did what it was asked.
    OK = 0
    #: The drain deadline passed or the last commit failed: the open transaction was aborted.
    #: Also a command that failed its own check (``models check``, ``demo``'s exactly-once check).
    FAILURE = 1
    #: Bad configuration, command line or model: retrying with the same input will not help.
    CONFIG = 2
    #: The producer was fenced (another process with this replica id) or hit a fatal error.
    FENCED = 3
    #: An unexpected error (a bug, a scoring process that died or hung): aborted, please report.
    SOFTWARE = 70
    #: Cannot start for now, or the cluster failed us (unreachable, topic missing, offsets
    #: unreadable): a restart may succeed.
    TEMPFAIL = 75
    #: Interrupted by SIGINT (Ctrl-C) in a command that does not drain (``demo``, ``produce``, ...).
    INTERRUPTED = 130
    #: A second SIGTERM/SIGINT forced the stop: the open transaction was aborted.
    FORCED_STOP = 143


class StartupError(Exception):
    """The worker cannot start; the subclass says why and :data:`STARTUP_ERRORS` how to exit."""


class ConfigError(StartupError, ValueError):
    """Configuration that cannot run; the message names the key and the fix."""


class ModelLoadError(StartupError):
    """The model folder, its manifest or the configured backend/device cannot be used."""


class MetricsPortError(StartupError):
    """The metrics server cannot bind its address (port taken, address not local)."""


class BrokerUnavailable(StartupError):
    """The cluster could not be reached or did not answer at start (metadata, init_transactions)."""


class TopicMissing(StartupError):
    """An input topic does not exist, or an output topic could not be created."""


class AuthenticationFailed(ConfigError):
    """The cluster refused the credentials of ``[kafka] client`` (SASL): retrying cannot help."""


class NotAuthorized(ConfigError):
    """An ACL is missing (topic, group, transactional id, cluster): retrying cannot help.
    Raised at start or while running; the worker aborts its open transaction and exits 2."""


class ScoringStartFailed(StartupError):
    """A scoring process died or hung while loading its model: a bug or a broken backend, not config."""


#: The one place that says how each start-up failure exits.
STARTUP_ERRORS: dict[type[StartupError], ExitCode] = {
    ConfigError: ExitCode.CONFIG,
    AuthenticationFailed: ExitCode.CONFIG,
    NotAuthorized: ExitCode.CONFIG,
    ModelLoadError: ExitCode.CONFIG,
    MetricsPortError: ExitCode.CONFIG,
    BrokerUnavailable: ExitCode.TEMPFAIL,
    TopicMissing: ExitCode.TEMPFAIL,
    ScoringStartFailed: ExitCode.SOFTWARE,
}


def exit_code_for(exc: BaseException) -> ExitCode:
    """The exit code of a start-up failure: its type's entry in :data:`STARTUP_ERRORS`.

    Anything else, being unexpected, is :attr:`ExitCode.SOFTWARE`.
    """
    for cls in type(exc).__mro__:
        if cls in STARTUP_ERRORS:
            return STARTUP_ERRORS[cls]
    return ExitCode.SOFTWARE
