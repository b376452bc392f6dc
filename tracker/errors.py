"""User-facing errors: one line that names the problem and what to do about it."""
import math
import numbers


class TrackerError(Exception):
    """A problem the user can fix (bad input, missing weights, ...).

    The CLI prints it without a traceback and exits with code 2; the web app
    shows it in the page. Anything else escaping is a bug.
    """


class VideoError(TrackerError):
    """The video cannot be read or written."""


class PromptError(TrackerError):
    """A click, box or prompts file does not fit the video."""


class ClickDropped(PromptError):
    """A click that came from a video no longer loaded: the page has moved on, so nothing is said."""


class WeightsError(TrackerError):
    """A checkpoint is missing, incomplete or not in the expected layout."""


class Cancelled(TrackerError):
    """The user stopped the job; whatever was written is removed."""


def whole_number(value: object, what: str, error: type[TrackerError] = TrackerError) -> int:
    """`value` as an int when it is a whole number (2 or 2.0, not 2.5, "2", True or infinity); else `error`
    naming `what`: API callers pass Python values that argparse and JSON parsing never see."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or \
            not (isinstance(value, numbers.Integral) or float(value).is_integer()):
        raise error(f"{what} must be a whole number, not {value!r}")
    return int(value)


def real_number(value: object, what: str, error: type[TrackerError] = TrackerError) -> float:
    """`value` as a finite float (an int or a float, not a string, True or NaN); else `error` naming `what`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise error(f"{what} must be a finite number, not {value!r}")
    return float(value)
