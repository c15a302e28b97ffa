"""The one exception type that the CLI turns into a one-line message and exit code 2."""


class ProbeError(Exception):
    """Bad input or a bad file: the message says what is wrong and how to fix it."""
