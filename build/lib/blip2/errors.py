"""The one exception every "your input is wrong" error derives from: a bad config, dataset, image, checkpoint or
argument. The CLI prints these as one line naming the cause and what to do; anything else is a bug and keeps its
traceback."""


class InputError(ValueError):
    """The user's input (a file, a value, an argument) is wrong; the message says what and how to fix it."""
