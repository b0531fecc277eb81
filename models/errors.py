"""The two exception types the CLI turns into a one-line message and exit status 2: bad input, a failed job."""


class ConfigError(Exception):
    """Bad user input: a missing file, a layer out of range, an unreachable hub id, ...

    The message names the argument and what was expected; it is printed as is.
    """


class JobError(Exception):
    """A long job (a Ray Train run, a sweep) failed for good; the message says where its logs are."""
