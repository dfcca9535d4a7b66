"""Failures the user can act on.

An engine stage raises a subclass of :class:`ReportedFailure` when it ran but the result is a
failure whose message already says what went wrong and where (which cases, which files). The
command line prints the message without a traceback and exits with status 1.
"""


class ReportedFailure(Exception):
    """A stage failed for reasons its message explains; no traceback is needed."""
