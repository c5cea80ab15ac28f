"""Typed errors a user can act on; the CLI turns them into one line and exit code 2."""


class SpecError(ValueError):
    """A matrix spec (or an override) is invalid. The message names the key and what is allowed."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}" if key else message)
        self.key = key
