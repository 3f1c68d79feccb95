"""What the user's job brings to every server: packages, local code, files, variables, secrets.

Built once per cluster from its settings and secrets (every refusal of bad input here happens
in the constructor, before anything exists). :meth:`Payload.snapshot` reads the local code
again (wheels rebuilt when their source changed, the ``upload=`` archive) for each batch of
new servers, so workers added by ``scale``/``adapt`` get the code as it is then.
"""

from __future__ import annotations

import asyncio
import platform
import shlex
from collections.abc import Mapping
from dataclasses import dataclass

from . import envsync, jobenv, layout, localcode, remote
from .environment import requirements as pinned_requirements
from .settings import ClusterSettings


@dataclass(frozen=True)
class Snapshot:
    """The local code as read for one batch of servers."""

    wheels: tuple[localcode.Wheel, ...]
    archive: bytes | None  # the upload= paths, gzipped tar

    def wheel_paths(self) -> list[str]:
        """Where the bootstrap finds the wheels (relative to its directory, ``layout.REMOTE_DIR``)."""
        return [f"./{layout.WHEELS_DIR}/{w.digest}/{w.name}" for w in self.wheels]


class Payload:
    def __init__(self, settings: ClusterSettings, secret_env: jobenv.SecretEnv, versions: Mapping[str, str]) -> None:
        self.versions = dict(versions)
        self.index_url = settings.index_url
        storage_plain, storage_secret = jobenv.object_storage(settings.object_storage, settings.location)
        self.env = {**storage_plain, **settings.env}
        self.secret_env = jobenv.SecretEnv(storage_secret).merged(secret_env)
        self.uploads = localcode.check_uploads(settings.upload)
        lines, local = envsync.wanted(settings.environment)
        named = [p for p in settings.packages if localcode.is_local_path(p)]
        self.extra = lines + [p for p in settings.packages if p not in named]
        self.local = local + [
            localcode.LocalPackage(_project_name(p), _resolved(p), editable=False) for p in named
        ]
        pinned_requirements("scheduler", self.versions, self.extra)  # refuses bad syntax, conflicts
        self._building: asyncio.Future[Snapshot] | None = None

    def __repr__(self) -> str:
        return f"<Payload env={sorted(self.env)} {self.secret_env!r} uploads={len(self.uploads)}>"

    @property
    def needs_resolving(self) -> bool:
        """Anything beyond the client's own pinned stack (which is known to exist)."""
        return bool(self.extra or self.local)

    def requirements(self, role: str) -> list[str]:
        return pinned_requirements(role, self.versions, self.extra)  # type: ignore[arg-type]

    async def snapshot(self) -> Snapshot:
        """The local code now; servers created together share one reading."""
        if self._building is None or self._building.done():
            self._building = asyncio.ensure_future(asyncio.to_thread(self._read))
        return await asyncio.shield(self._building)

    def _read(self) -> Snapshot:
        wheels = tuple(localcode.build_wheel(p) for p in self.local)
        archive = localcode.upload_archive(self.uploads) if self.uploads else None
        return Snapshot(wheels, archive)

    async def check(self, architectures: set[str]) -> None:
        """Resolve everything for each architecture before any server exists (blocking: in threads)."""
        if not self.needs_resolving:
            return
        snap = await self.snapshot()
        reqs = pinned_requirements("scheduler", self.versions, self.extra) + [str(w.path) for w in snap.wheels]
        await asyncio.gather(*(
            asyncio.to_thread(
                # The client's full version: a package may need a later patch release than x.y.0.
                envsync.resolve, reqs, python=platform.python_version(), architecture=arch, index_url=self.index_url
            )
            for arch in sorted(architectures)
        ))

    async def put_wheels(self, conn: remote.Remote, snap: Snapshot) -> None:
        """Before the bootstrap: the wheels it installs."""
        for w in snap.wheels:
            path = f"{layout.REMOTE_DIR}/{layout.WHEELS_DIR}/{w.digest}/{w.name}"
            await conn.put(path, await asyncio.to_thread(w.path.read_bytes), mode=0o644)

    async def put_files(self, conn: remote.Remote, snap: Snapshot, timeout: float) -> None:
        """After the bootstrap: the variables and secrets (0600), the uploaded files."""
        pythonpath = layout.UPLOAD_DIR if snap.archive is not None else None
        text = jobenv.process_env_file(self.env, self.secret_env, pythonpath)
        await conn.put(layout.PROCESS_ENV, text, mode=0o600)
        if snap.archive is None:
            return
        await conn.put(layout.UPLOAD_ARCHIVE, snap.archive, mode=0o600)
        d, a = shlex.quote(layout.UPLOAD_DIR), shlex.quote(layout.UPLOAD_ARCHIVE)
        # Readable by the dask user (its tasks use them), whatever their modes were here.
        await conn.run(
            f"rm -rf {d} && mkdir -p {d} && tar -xzf {a} -C {d} --no-same-owner && chmod -R go+rX,go-w {d} && rm -f {a}",
            timeout=timeout,
        )


def _resolved(spec: str) -> localcode.Path:
    return localcode.expand(spec, "packages").resolve()


def _project_name(spec: str) -> str:
    return _resolved(spec).name
