"""rere: a reproducible pipeline for LLM-based generative recommendation with ReRe RL."""

__version__ = "0.1.0"


class RereError(Exception):
    """A user's mistake (bad config, bad file, missing input): printed without a traceback.

    The message says what is wrong (file, line, key or value) and what to do about it.
    """
