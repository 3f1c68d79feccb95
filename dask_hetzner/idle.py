"""Idle shutdown: a cluster nobody uses deletes itself, even when its client is gone.

This one file plays three parts, so that it can be copied to the scheduler's server as it
is (its top-level imports are the standard library only):

* on the client: :class:`IdleSettings` and :func:`install`, which copy this file, its
  settings and the API token (0600, over SFTP) to the scheduler's server and start the
  watchdog there;
* in the scheduler (``dask scheduler --preload ~/.dask-hetzner/lib/idle.py``): :func:`dask_setup`
  writes a heartbeat every second saying since when the scheduler has had no work and no
  client; it runs as the unprivileged dask user and never sees the token (root's 0600 file);
* on the server (``python3 ~/.dask-hetzner/lib/idle.py watch ~/.dask-hetzner/lib/idle.json``): the
  watchdog, run as root, plain ``python3`` + ``urllib``. When the heartbeat says idle for ``timeout``, or
  stops for that long (the scheduler died), it deletes everything carrying the cluster's
  label: the other servers first, then the shared resources, its own server last.

Why the token must live on the server at all, and what that costs: ``docs/security-idle.md``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import random
import signal
import ssl
import stat
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

LABEL_CLUSTER = "dask-hetzner/cluster"  # same as cloud.LABEL_CLUSTER (this file imports no package)
LABEL_ROLE = "dask-hetzner/role"  # cloud.LABEL_ROLE
LABEL_KEPT_UNTIL = "dask-hetzner/kept-until"  # cloud.LABEL_KEPT_UNTIL: when a kept server goes

# On the server, relative to root's home (the dask processes and SSH sessions start there).
# layout.REMOTE_DIR, which this file cannot import (it runs alone on the server): the
# scheduler's preload falls back to it; tests/test_idle.py checks that the two agree.
REMOTE_DIR = ".dask-hetzner"
# The scheduler (the dask user) imports this file and reads its settings: both in a
# directory it may list (layout.LIB_DIR); the token stays in root's 0600 file.
LIB_DIR = f"{REMOTE_DIR}/lib"
SOURCE_FILE = f"{LIB_DIR}/idle.py"
CONFIG_FILE = f"{LIB_DIR}/idle.json"
TOKEN_FILE = f"{REMOTE_DIR}/hcloud-token"
# Written by the scheduler, so in the dask user's own directory (layout.DASK_DIR).
STATE_FILE = f"{REMOTE_DIR}/dask/idle-state.json"
LOG_FILE = f"{REMOTE_DIR}/idle.log"
PID_FILE = f"{REMOTE_DIR}/idle.pid"
SCHEDULER_PID_FILE = f"{REMOTE_DIR}/scheduler.pid"  # written by nodes.SchedulerServer

HEARTBEAT = 1.0  # seconds between the scheduler's heartbeats
HANDLER = "dask_hetzner_idle"  # scheduler handler the cluster object calls
TRANSIENT_CODES = {
    "rate_limit_exceeded",
    "locked",
    "conflict",
    "server_error",
    "unavailable",
    "bad_gateway",
    "timeout",
    "unknown_error",
    "maintenance",
}

logger = logging.getLogger("dask_hetzner.idle")


# The client's side ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class IdleSettings:
    """What the scheduler's server needs to delete its cluster. The token never shows in a repr."""

    timeout: float | None  # idle_timeout; None: only the policies below
    endpoint: str
    token: str = dataclasses.field(repr=False)
    # Until the cluster object says its first workers are up (or this long has passed), the
    # cluster is busy: a slow start must not look idle.
    start_grace: float = 3600.0
    # Delete after this long without a connected client / this long after the watch began.
    no_client_timeout: float | None = None
    max_lifetime: float | None = None
    # Kept (paid, idle) servers past their ``kept-until`` label by this long are deleted here
    # too, should the client be gone (its own timer deletes them on time); None: none are kept.
    kept_grace: float | None = None

    def config(self, cluster: str, server_id: int) -> dict[str, Any]:
        """The settings file (no secret in it: the token goes to its own file)."""
        return {
            "cluster": cluster,
            "server_id": server_id,
            "endpoint": self.endpoint,
            "timeout": self.timeout,
            "no_client_timeout": self.no_client_timeout,
            "max_lifetime": self.max_lifetime,
            "start_grace": self.start_grace,
            "kept_grace": self.kept_grace,
            # Relative to the settings file's directory.
            "token_file": _relative(TOKEN_FILE),
            "state_file": _relative(STATE_FILE),
            "scheduler_pid_file": _relative(SCHEDULER_PID_FILE),
        }


def _relative(path: str) -> str:
    return os.path.relpath(path, LIB_DIR)


async def install(conn: Any, settings: IdleSettings, *, cluster: str, server_id: int) -> str:
    """Copy this file, the settings and the token to the scheduler's server; start the watchdog.

    ``conn`` is a :class:`dask_hetzner.remote.Remote`. Returns the ``--preload`` argument for
    ``dask scheduler``. The token travels over SFTP into root's 0600 file, never on a command
    line; the scheduler (the dask user) reads this file and the settings (no secret: 0644).
    """
    source = await asyncio.to_thread(Path(__file__).read_text)
    await conn.put(SOURCE_FILE, source, mode=0o644, dir_mode=0o755)
    config = json.dumps(settings.config(cluster, server_id), indent=1)
    await conn.put(CONFIG_FILE, config, mode=0o644, dir_mode=0o755)
    await conn.put(TOKEN_FILE, settings.token, mode=0o600)
    await conn.run(f"rm -f {STATE_FILE}", timeout=30)
    # The system's python3: the watchdog needs nothing of the dask environment.
    await conn.start_detached(
        f"exec python3 {SOURCE_FILE} watch {CONFIG_FILE}", log=LOG_FILE, pidfile=PID_FILE
    )
    return SOURCE_FILE


async def stop(conn: Any) -> None:
    """Stop the watchdog (before an orderly close, so it does not race the client's teardown)."""
    await conn.stop(PID_FILE, timeout=10)


# The scheduler's side: a preload that writes the heartbeat -------------------------------------


class _Idleness:
    """Since when the scheduler has had no task to run and no client."""

    def __init__(self, scheduler: Any, directory: Path) -> None:
        self.scheduler = scheduler
        config = json.loads((directory / Path(CONFIG_FILE).name).read_text())
        self.state_file = directory / config.get("state_file", Path(STATE_FILE).name)
        self.grace_until: float | None = time.time() + float(config.get("start_grace", 3600.0))
        self.idle_since: float | None = None
        self.no_client_since: float | None = None  # no Client connected since (after the start)
        self.transitions = -1

    def clients(self) -> int:
        return sum(1 for c in self.scheduler.clients if c != "fire-and-forget")

    def busy(self) -> bool:
        s = self.scheduler
        counter = getattr(s, "transition_counter", 0)
        changed, self.transitions = counter != self.transitions, counter
        if self.grace_until is not None:
            if time.time() < self.grace_until:
                return True
            self.grace_until = None
        return bool(
            changed
            or self.clients()
            or getattr(s, "_active_graph_updates", 0)
            or s.queued
            or s.unrunnable
            or any(ws.processing for ws in s.workers.values())
        )

    def beat(self) -> None:
        now = time.time()
        if self.busy():
            self.idle_since = None
        elif self.idle_since is None:
            self.idle_since = now
        if self.clients() or self.grace_until is not None:
            self.no_client_since = None
        elif self.no_client_since is None:
            self.no_client_since = now
        state = {
            "time": now,
            "idle_since": self.idle_since,
            "no_client_since": self.no_client_since,
            "starting": self.grace_until is not None,
            "clients": self.clients(),
            "workers": len(self.scheduler.workers),
        }
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state))  # a few bytes on local disk: no need for a thread
        os.replace(tmp, self.state_file)

    def handle(self, action: str = "status") -> dict[str, Any]:
        """``started``: the cluster object's first workers are up, idleness counts from now."""
        if action == "started":
            self.grace_until = None
            self.idle_since = None
            self.no_client_since = None
        return {"idle_since": self.idle_since, "clients": self.clients()}


def dask_setup(scheduler: Any) -> None:
    """Preload hook of ``dask scheduler --preload``."""
    from tornado.ioloop import PeriodicCallback

    # This file's own directory (root's: the dask user's home is elsewhere).
    directory = Path(os.environ.get("DASK_HETZNER_IDLE_DIR") or Path(__file__).resolve().parent)
    idleness = _Idleness(scheduler, directory)
    scheduler.handlers[HANDLER] = idleness.handle

    def beat() -> None:
        try:
            idleness.beat()
        except Exception:  # a heartbeat must never take the scheduler down
            logger.exception("dask-hetzner idle heartbeat failed")

    beat()
    # Started with the scheduler's other periodic callbacks, stopped when it closes.
    scheduler.periodic_callbacks["dask-hetzner-idle"] = PeriodicCallback(beat, HEARTBEAT * 1000)


# The watchdog: plain urllib against the API ----------------------------------------------------


class ApiError(Exception):
    def __init__(self, what: str, status: int, code: str, message: str = "") -> None:
        self.status, self.code = status, code
        super().__init__(f"{what}: {status} {code} {message}".rstrip())


def _token_wait(headers: Any) -> float | None:
    """Seconds until the rate-limit bucket holds one request: Reset is when it is full again."""
    try:
        limit = int(headers["RateLimit-Limit"])
        remaining = int(headers["RateLimit-Remaining"])
        reset = float(headers["RateLimit-Reset"])
    except (KeyError, TypeError, ValueError):
        return None
    per_token = max(0.0, reset - time.time()) / max(1, limit - remaining)
    return min(60.0, max(per_token, 0.2))


class Api:
    """The few Hetzner Cloud API calls the watchdog needs, with retries of transient faults."""

    def __init__(self, endpoint: str, token: str, *, timeout: float = 30.0) -> None:
        self.endpoint = endpoint.rstrip("/")
        self._token = token
        self.timeout = timeout
        self._ssl = ssl.create_default_context()
        bundle = "/etc/ssl/certs/ca-certificates.crt"  # Ubuntu's; standalone Pythons may miss it
        if os.path.exists(bundle):
            self._ssl.load_verify_locations(bundle)

    def __repr__(self) -> str:
        return f"Api({self.endpoint!r})"

    def _once(self, method: str, path: str, body: Any, query: dict[str, Any] | None) -> Any:
        url = self.endpoint + path
        if query:
            url += "?" + urllib.parse.urlencode(query, doseq=True)
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(url, data=data, method=method)
        request.add_header("Authorization", f"Bearer {self._token}")
        request.add_header("Accept", "application/json")
        request.add_header("User-Agent", "dask-hetzner-idle-watchdog")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        context = self._ssl if url.startswith("https:") else None
        with urllib.request.urlopen(request, timeout=self.timeout, context=context) as response:
            raw = response.read()
        return json.loads(raw) if raw else None

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        query: dict[str, Any] | None = None,
        *,
        deadline: float,
        retry: frozenset[str] = frozenset(),
    ) -> Any:
        """One call; transient faults (and the codes in ``retry``) are retried until ``deadline``."""
        what = f"{method} {path}"
        attempt = 0
        while True:
            try:
                return self._once(method, path, body, query)
            except urllib.error.HTTPError as e:
                try:
                    error = json.loads(e.read() or b"{}").get("error") or {}
                except ValueError:
                    error = {}
                err = ApiError(what, e.code, str(error.get("code", e.code)), str(error.get("message", "")))
                if not (err.code in TRANSIENT_CODES or err.code in retry or e.code >= 500):
                    raise err from None
                delay = _token_wait(e.headers) if e.code == 429 else None
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                err = ApiError(what, 0, type(e).__name__, "API not reachable")
                delay = None
            attempt += 1
            delay = delay if delay is not None else random.uniform(0.5, min(30.0, 2.0**attempt))
            if time.monotonic() + delay > deadline:
                raise err
            logger.info("%s: %s, retrying in %.1f s", what, err.code, delay)
            time.sleep(delay)  # the watchdog's own process: nothing else waits on it

    def list(self, kind: str, *, deadline: float, **query: Any) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        page: int | None = 1
        while page:
            answer = self.request(
                "GET", f"/{kind}", query={**query, "page": page, "per_page": 50}, deadline=deadline
            )
            items += answer[kind]
            page = ((answer.get("meta") or {}).get("pagination") or {}).get("next_page")
        return items

    def delete(self, kind: str, resource_id: int, *, deadline: float) -> None:
        """Delete one resource; gone already is fine, still in use is retried until ``deadline``."""
        try:
            self.request(
                "DELETE", f"/{kind}/{resource_id}", deadline=deadline, retry=frozenset({"resource_in_use"})
            )
        except ApiError as e:
            if e.code != "not_found":
                raise


def _ours(items: list[dict[str, Any]], cluster: str) -> list[dict[str, Any]]:
    # The selector already filtered; a second check costs nothing and guards the selector.
    return [i for i in items if (i.get("labels") or {}).get(LABEL_CLUSTER) == cluster]


def delete_cluster(api: Api, cluster: str, self_id: int | None, *, timeout: float = 600.0) -> None:
    """Delete what carries ``dask-hetzner/cluster=<cluster>``; the server ``self_id`` last.

    The shared resources cannot go while a server uses them, so this server leaves its
    firewall and placement group first; deleting the network detaches it by itself.
    """
    if not cluster:
        raise ValueError("refusing to delete by an empty cluster name")
    deadline = time.monotonic() + timeout
    sel = {"label_selector": f"{LABEL_CLUSTER}={cluster}"}
    servers = _ours(api.list("servers", deadline=deadline, **sel), cluster)
    me = next((s for s in servers if s["id"] == self_id), None)
    for server in servers:
        if server is not me:
            api.delete("servers", server["id"], deadline=deadline)
    while True:
        left = [s for s in _ours(api.list("servers", deadline=deadline, **sel), cluster) if s["id"] != self_id]
        if not left:
            break
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"servers {', '.join(s['name'] for s in left)} still exist {timeout:.0f} s after deletion"
            )
        time.sleep(1.0)
    firewalls = _ours(api.list("firewalls", deadline=deadline, **sel), cluster)
    if me is not None:
        for fw in firewalls:
            try:
                api.request(
                    "POST",
                    f"/firewalls/{fw['id']}/actions/remove_from_resources",
                    {"remove_from": [{"type": "server", "server": {"id": me["id"]}}]},
                    deadline=deadline,
                )
            except ApiError as e:
                if e.code not in ("firewall_resource_not_found", "not_found"):
                    raise
        if me.get("placement_group"):
            try:
                api.request(
                    "POST", f"/servers/{me['id']}/actions/remove_from_placement_group", {}, deadline=deadline
                )
            except ApiError as e:
                if e.code not in ("not_in_placement_group", "not_found"):
                    raise
    for fw in firewalls:
        api.delete("firewalls", fw["id"], deadline=deadline)
    for kind in ("placement_groups", "networks", "ssh_keys"):
        for item in _ours(api.list(kind, deadline=deadline, **sel), cluster):
            api.delete(kind, item["id"], deadline=deadline)
    for image in _ours(api.list("images", deadline=deadline, type="snapshot", **sel), cluster):
        api.delete("images", image["id"], deadline=deadline)
    if me is not None:
        logger.info("deleting this server (%s), the last of cluster %s", me["name"], cluster)
        api.delete("servers", me["id"], deadline=deadline)


def kept_poll_interval(grace: float) -> float:
    """Seconds between the watchdog's listings of kept servers: one is deleted at most
    ``grace`` + this after its ``kept-until`` (below the next started hour when the grace is
    half the client's margin), in at most one request a minute (the API allows 3600 an hour)."""
    return min(60.0, max(5.0, grace / 2))


def expire_kept(api: Api, cluster: str, grace: float, now: float, *, deadline: float) -> list[str]:
    """Delete this cluster's kept servers whose ``kept-until`` (plus ``grace``, for the
    client's clock) has passed; the names deleted. A server a client took meanwhile has lost
    the ``kept`` role in the listing, so it is never among them."""
    selector = {"label_selector": f"{LABEL_CLUSTER}={cluster},{LABEL_ROLE}=kept"}
    gone = []
    for server in _ours(api.list("servers", deadline=deadline, **selector), cluster):
        labels = server.get("labels") or {}
        try:
            until = float(labels.get(LABEL_KEPT_UNTIL, ""))
        except ValueError:
            continue  # not one this package kept: left to the cluster's own deletion
        if labels.get(LABEL_ROLE) == "kept" and until + grace <= now:
            logger.info("kept server %s: its paid time ended at %s; deleting it", server["name"], time.ctime(until))
            api.delete("servers", server["id"], deadline=deadline)
            gone.append(server["name"])
    return gone


def stop_scheduler(pid_file: Path, timeout: float = 20.0) -> None:
    """End the scheduler's process group before deleting anything.

    Then no client can connect during the deletion, and a cluster object that is still alive
    somewhere sees its scheduler go instead of seeing workers lost (which it would replace).
    """
    try:
        pid = int(pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        except PermissionError as e:
            logger.warning("cannot stop the scheduler (process group %d): %s", pid, e)
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.killpg(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)
    logger.warning("the scheduler (process group %d) survived SIGKILL for %.0f s", pid, timeout)


def idle_for(state: dict[str, Any] | None, now: float, watching_since: float, grace: float = 0.0) -> float:
    """Seconds the cluster has been idle: by the heartbeat, or since the heartbeat stopped.
    Before its first heartbeat, within ``grace`` (the start's bound), the scheduler is still
    starting (a loaded machine can take longer than the silence bound): 0."""
    if state is None and now - watching_since < grace:
        return 0.0
    last_beat = max(watching_since, state["time"] if state else 0.0)
    if now - last_beat > max(10 * HEARTBEAT, 5.0):
        # No heartbeat: the scheduler is gone (or hung); nobody can use the cluster.
        return now - last_beat
    if state and state.get("idle_since"):
        return now - float(state["idle_since"])
    return 0.0


def no_client_for(state: dict[str, Any] | None, now: float, watching_since: float, grace: float = 0.0) -> float:
    """Seconds without a connected client: by the heartbeat, or since it stopped (a scheduler
    that is gone has no clients). Before its first heartbeat, within ``grace`` (the start's
    bound), the scheduler is still starting: 0."""
    if state is None and now - watching_since < grace:
        return 0.0
    last_beat = max(watching_since, state["time"] if state else 0.0)
    if now - last_beat > max(10 * HEARTBEAT, 5.0):
        return now - last_beat
    if state and state.get("no_client_since"):
        return now - float(state["no_client_since"])
    return 0.0


def read_state(path: Path) -> dict[str, Any] | None:
    """The heartbeat, or None (not written yet, mid-replace, or not a small regular file).

    The dask user writes it and root reads it: never through a link, never blocking on a FIFO.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size > 65536:
            return None
        state = json.loads(os.read(fd, 65536))
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)
    return state if isinstance(state, dict) else None


def why_delete(config: dict[str, Any], state: dict[str, Any] | None, now: float, started: float) -> str | None:
    """Which shutdown policy says the cluster must go now, in words; None: none of them."""
    timeout, no_client, lifetime = (config.get(k) for k in ("timeout", "no_client_timeout", "max_lifetime"))
    grace = float(config.get("start_grace") or 0.0)
    if timeout is not None and (idle := idle_for(state, now, started, grace)) >= float(timeout):
        return f"idle for {idle:.0f} s"
    if no_client is not None and (alone := no_client_for(state, now, started, grace)) >= float(no_client):
        return f"no client connected for {alone:.0f} s (no_client_timeout)"
    if lifetime is not None and now - started >= float(lifetime):
        return f"running for {now - started:.0f} s (max_lifetime)"
    return None


def watch(config_file: str) -> None:
    """The watchdog's main loop: runs until it deleted its own server (which ends it)."""
    path = Path(config_file).resolve()
    config = json.loads(path.read_text())
    directory = path.parent
    token = (directory / config["token_file"]).read_text().strip()
    api = Api(config["endpoint"], token)
    del token
    bounds = [float(config[k]) for k in ("timeout", "no_client_timeout", "max_lifetime") if config.get(k)]
    state_file = directory / config["state_file"]
    started = time.time()
    kept_grace = config.get("kept_grace")
    kept_checked = 0.0
    logger.info(
        "watching cluster %s: idle_timeout %s, no_client_timeout %s, max_lifetime %s (s)",
        config["cluster"], config.get("timeout"), config.get("no_client_timeout"), config.get("max_lifetime"),
    )  # fmt: skip
    while True:
        state = read_state(state_file)
        if kept_grace is not None and time.monotonic() - kept_checked >= kept_poll_interval(float(kept_grace)):
            kept_checked = time.monotonic()
            try:
                expire_kept(api, config["cluster"], float(kept_grace), time.time(), deadline=kept_checked + 30)
            except Exception as e:  # noqa: BLE001 - tried again at the next listing
                logger.warning("deleting kept servers of cluster %s failed: %s", config["cluster"], e)
        reason = why_delete(config, state, time.time(), started)
        if reason is not None:
            logger.info("cluster %s %s: deleting it", config["cluster"], reason)
            stop_scheduler(directory / config.get("scheduler_pid_file", "scheduler.pid"))
            try:
                delete_cluster(api, config["cluster"], config.get("server_id"))
            except Exception as e:  # noqa: BLE001 - billing goes on: keep trying
                logger.error("deleting cluster %s failed, retrying in 30 s: %s", config["cluster"], e)
                time.sleep(30)
                continue
            # Our own deletion ends this process with the server; if it does not, say so.
            time.sleep(600)
            logger.error("still alive 600 s after deleting this server")
            sys.exit(1)
        time.sleep(min(HEARTBEAT, max(0.1, min(bounds, default=10.0) / 10)))


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] != "watch":
        print("usage: python3 idle.py watch CONFIG", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    watch(argv[1])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
