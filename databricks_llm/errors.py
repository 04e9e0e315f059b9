"""The one exception type for problems with what the user gave us."""


class InputError(ValueError):
    """Bad flags, files, datasets or requests: reported as one line, exit code 2."""
