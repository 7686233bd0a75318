"""The sandbox's one exception for bad user input; no heavy import, so every face can catch it cheaply."""


class InputError(ValueError):
    """Bad user input (a file, a text, a config value). The message says what to do."""


class CheckpointError(InputError):
    """A training checkpoint that cannot be resumed. `problem` says what is wrong without the advice, because
    what to do depends on who resumes: a user is told `advice`; a study trains that run again from step 0."""

    def __init__(self, problem: str, advice: str):
        super().__init__(f"{problem}: {advice}")
        self.problem = problem
