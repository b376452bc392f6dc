"""User-facing errors: one line that names the problem and what to do about it."""


class TrackerError(Exception):
    """A problem the user can fix (bad input, missing weights, ...).

    The CLI prints it without a traceback and exits with code 2; the web app
    shows it in the page. Anything else escaping is a bug.
    """


class VideoError(TrackerError):
    """The video cannot be read or written."""


class PromptError(TrackerError):
    """A click, box or prompts file does not fit the video."""


class WeightsError(TrackerError):
    """A checkpoint is missing, incomplete or not in the expected layout."""


class Cancelled(TrackerError):
    """The user stopped the job; whatever was written is removed."""
