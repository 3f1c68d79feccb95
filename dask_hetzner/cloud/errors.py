"""What the cloud layer raises: an API call that failed, and a user choice that is not valid."""

from __future__ import annotations


class CloudError(Exception):
    """An API call failed; the message says what was being done."""

    def __init__(self, what: str, code: str | int | None = None, message: str = "") -> None:
        self.what = what
        self.code = code
        self.api_message = message
        text = f"{what} failed"
        if code is not None:
            text += f": {code}"
        if message:
            text += f" ({message})"
        super().__init__(text)


class Unreachable(CloudError):
    """No answer came back (connection refused or reset, client timeout): always worth a retry.

    ``code`` names the kind of failure (``ConnectionError``, ``ReadTimeout``, ...).
    """


class ActionFailed(CloudError):
    """An action (e.g. create_server) ended in error; its resource may still exist."""


class ConfigError(ValueError):
    """A user choice (type, location, image, token, ...) is not valid; raised before creating anything."""
