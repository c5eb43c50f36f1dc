"""The one exception type users see: a message naming the file or key and what was expected."""


class PipelineError(Exception):
    """Bad input or configuration. Entry points print it on one line and exit non-zero."""
