"""Exceptions with messages meant for users."""


class TokenmillError(Exception):
    """Base class of tokenmill's user-facing errors."""


class ModelLoadError(TokenmillError, ValueError):
    """A model path, file or checkpoint that cannot be loaded (the message says why)."""


class ChatTemplateError(TokenmillError, ValueError):
    """A chat template that is missing, broken, or raised an exception while rendering."""
