"""Errors a job raises. The orchestrator maps them to exit codes (DESIGN.md §9)."""


class JobInputError(Exception):
    """Bad input (file, row, column, parameter): one clear message, exit code 2.

    The message names the file, row, job or field at fault.
    """


class JobCancelled(Exception):
    """The job saw a cancellation request and stopped cleanly."""
