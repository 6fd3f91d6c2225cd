"""Errors the CLI reports in one line, without a traceback (config errors live in oodlab.config)."""


class StageFailed(RuntimeError):
    """A stage stopped by an error that a retry would repeat (a NaN loss): Ray does not retry it."""
