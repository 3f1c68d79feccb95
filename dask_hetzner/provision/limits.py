"""The account's server limit: Hetzner shows it only when a create fails.

New accounts may hold 5 to 10 servers; past that ``POST /servers`` answers ``403
resource_limit_exceeded`` (docs/simulator.md, "Deliberate behaviours"), and the API has no
endpoint that tells the limit beforehand. ``hetzner.server-limit`` lets a user who knows it
be refused up front (``settings.check_server_limit``); here, what a create that meets it
becomes: one error that names the limit, what was asked and where to raise it.
"""

from __future__ import annotations

from ..cloud import CloudError

WHERE_TO_RAISE = "raise it in the Hetzner Cloud Console (Limits)"


class ServerLimitReached(CloudError):
    """A create answered ``resource_limit_exceeded``: the account holds all it may."""

    def __init__(self, what: str, api_message: str, created: int) -> None:
        super().__init__(what, "resource_limit_exceeded", api_message)
        self.created = created  # this cluster's servers when it struck

    def starting(self, cluster: str, workers: int) -> ServerLimitReached:
        """The error a cluster's start raises: what was asked, what fit, what to do."""
        what = (
            f"starting cluster {cluster} needs {workers + 1} servers (the scheduler and {workers} "
            f"workers), but the Hetzner account's server limit stopped it after {self.created} of "
            f"them were created; {WHERE_TO_RAISE}, use fewer, larger servers, or set "
            "hetzner.allow-fewer-workers to go on with the workers that fit"
        )
        return ServerLimitReached(what, self.api_message, self.created)


def is_limit(e: CloudError) -> bool:
    return e.code == "resource_limit_exceeded"
