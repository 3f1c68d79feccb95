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


# What users read when the token is missing or refused (docs/troubleshooting.md quotes both).
NO_TOKEN = "no Hetzner Cloud API token: pass token=, set HCLOUD_TOKEN or hetzner.token"
TOKEN_REFUSED = "the Hetzner Cloud API token was refused (unauthorized)"
TOKEN_READONLY = (
    "the Hetzner Cloud API token is a read-only token (token_readonly): generate a Read & Write "
    "token in the Hetzner Cloud Console (Security, API tokens)"
)
# Never with the token itself: an HTTP library would refuse the header and print it.
BAD_TOKEN = "the Hetzner Cloud API token contains whitespace or control characters (a pasted line break?)"


def token_refused(e: CloudError) -> Exception:
    """A refused token (401) as the ``ConfigError`` users read; any other error as it is."""
    if e.code in ("unauthorized", 401):
        return ConfigError(TOKEN_REFUSED)
    return e
