"""The one error class a user can act on: bad params, records, videos or model folders.

Every module's own input error (ConfigError, RecordError, VideoError, ...) derives from
`InputError`, and its message names the key, file or record to fix. `python -m vlm_rlaif`
prints such an error as one line and exits with status 2, so a wrapper (dvc, a cluster
scheduler) can tell fixable input from a crash, which keeps its traceback and status 1.
"""


class InputError(ValueError):
    """Input that cannot be used as given; the message names where it is."""
