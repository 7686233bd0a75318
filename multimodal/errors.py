"""The sandbox's one exception for bad user input; no heavy import, so every face can catch it cheaply."""


class InputError(ValueError):
    """Bad user input (a file, a text, a config value). The message says what to do."""
