"""One poll of the agent, start-up recovery, and the local verdicts (revert, confirm, report-bad).

The outer layer that touches network and disk. Each model's update walks the
state table of :mod:`device_agent.state`; the journal is saved on entry to
each state before its side effect, and :meth:`Agent.recover` decides at start
what a crash left behind. ``current`` is only ever switched to a revision the
journal records as known good.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import hashlib
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tuf.api import exceptions as tuf_exc

from device_agent import (
    _atomic,
    _child,
    atrest,
    health,
    keyprotect,
    monitorstore,
    names,
    safeload,
    selection,
    sigcheck,
    status,
)
from device_agent._crashpoint import crashpoint
from device_agent.config import AgentConfig
from device_agent.errors import (
    ConfigError,
    CorruptRevisionError,
    HealthCheckError,
    NoRevisionError,
    NoSpaceError,
    UnsafeModelError,
)
from device_agent.fetcher import AgentFetcher
from device_agent.outcome import Outcome, exit_code_of
from device_agent.slots import Slots
from device_agent.state import RECOVERY, Journal, Recovery, Revision, State, Update
from device_agent.streamcheck import KeyProvider, NoKeyError, StreamCheck
from device_agent.tufclient import TufClient
from edgepack import bundle, versions
from edgepack._version import __version__
from edgepack.bundle.metadata import hpke_info
from edgepack.channel import channel_target_path
from edgepack.crypto import recipient_key_id, unwrap_key
from edgepack.errors import (
    ConflictError,
    EdgepackError,
    InvalidInputError,
    KeyFileError,
    VerificationError,
)

MAX_ATTEMPTS = 5  # interrupted tries of one release before it is marked failed (crash loop)
LOCK_NAME = ".lock"

log = logging.getLogger(__name__)


class _ReleaseFailedError(Exception):
    """This release cannot run here (bad bundle, unsafe model, unhealthy)."""


@contextlib.contextmanager
def locked(data_dir: Path, wait_s: float = 10.0) -> Iterator[None]:
    """Hold ``DATA/.lock`` so a poll and a local command never interleave."""
    data_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(data_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    deadline = time.monotonic() + wait_s
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise ConflictError(
                        f"another edgepack-agent holds {data_dir / LOCK_NAME}",
                        hint="wait for the running poll to finish and try again",
                    ) from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)


class Agent:
    """The device agent over one data directory."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        fetcher: AgentFetcher | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.data = config.data_dir
        self.clock = clock
        self.fetcher = fetcher or AgentFetcher(
            config.limits,
            tmp_dir=self.data / "downloads",
            ca_file=config.ca_file,
            proxy=config.proxy,
        )
        self.journal = Journal.load(self.data)
        self.device = selection.Device.from_config(config)
        self._scrubbed: dict[tuple[str, str], float] = {}
        # What this poll learnt for the status document beyond its outcomes (per model):
        # the channel's current version, a new revision's health-check latency.
        self._facts: dict[str, dict[str, Any]] = {}
        self._recipient: Any = None  # the recipient key once unlock() opened it
        self._warm: dict[str, _child.Warm] = {}  # children started ahead for this install
        self.passphrase_env: str | None = None

    def unlock(self, passphrase_env: str | None = None) -> None:
        """Open the device's recipient key now, once, and keep it for every poll.

        ``run`` calls this before its first poll, so a key the agent cannot open —
        above all a passphrase-locked key with no passphrase (``--passphrase-env
        VAR``, ``$EDGEPACK_PASSPHRASE`` or the systemd credential
        ``edgepack-passphrase``) — stops the agent at start with a
        :class:`KeyFileError` (exit 5) instead of failing every poll quietly; a
        prompt on a terminal is asked once, not at every install.
        """
        self.passphrase_env = passphrase_env
        if not self.config.recipient_key:
            return
        try:
            self._recipient = keyprotect.load_recipient_key(self.config, passphrase_env)
        except KeyFileError as exc:
            raise KeyFileError(
                f"the device's recipient key cannot be used: {exc.diagnostics()}"
            ) from None

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold ``DATA/.lock`` and work on the journal as it is on disk now.

        Every change of state happens inside this: a daemon's poll and a local
        verdict (``revert``, ``confirm``, ``report-bad``) each read the journal
        only once they hold the lock, so neither acts on, or writes back, what
        the other has already changed.
        """
        with locked(self.data):
            self.journal = Journal.load(self.data)
            yield

    # -- start-up recovery -----------------------------------------------------
    def recover(self) -> None:
        """Resume or clean up what a crash left, per the recovery table."""
        if self.journal.recovered:
            self._rebuild_from_slots(self.journal.recovered)
        for name in self.config.models:
            mj = self.journal.model(name)
            slots = Slots(self.data, name)
            slots.clean_temporaries()
            if slots.foreign_current():
                self._repair(name, "`current` was not a link to one of its revisions")
            action = RECOVERY[mj.state]
            if action is not Recovery.NOTHING:
                log.info("%s: recovering from %s: %s", name, mj.state.value, action.value)
            if action is Recovery.FINISH_SWITCH:
                if mj.update is not None:
                    self._switch_and_commit(name, mj.update.revision)
                else:
                    self.journal.enter(name, State.COMMITTED)
            elif action in (Recovery.DISCARD_STAGING, Recovery.KEEP_PARTIAL):
                if action is Recovery.DISCARD_STAGING and mj.update is not None:
                    # Counted so a model that kills the agent cannot loop forever.
                    mj.update.attempts += 1
                self.journal.enter(name, State.IDLE)
            self._forget_unknown(name)

    def _rebuild_from_slots(self, why: str) -> None:
        """After a damaged journal: adopt each model's running revision when its files
        still match their signed manifest (its bundle digest is re-learnt from the
        repository at the next poll); the rest is forgotten and cleaned up."""
        for name in self.config.models:
            mj = self.journal.model(name)
            slots = Slots(self.data, name)
            current = slots.current()
            if current and current not in mj.revisions and slots.verify(current) is None:
                version = current.rsplit("-", 1)[0]
                mj.revisions[current] = Revision(version, "", "", True, self.clock())
            mj.repairs.append(f"the journal was damaged: {why}")
            del mj.repairs[:-5]
        self.journal.save()

    def _forget_unknown(self, name: str) -> None:
        """Remove revisions that never became known good; drop records of vanished ones."""
        mj = self.journal.model(name)
        slots = Slots(self.data, name)
        current = slots.current()
        on_disk = set(slots.installed())
        for rev in on_disk:
            record = mj.revisions.get(rev)
            if rev != current and (record is None or not record.healthy):
                slots.remove(rev)
                mj.revisions.pop(rev, None)
        for rev in list(mj.revisions):
            if rev not in on_disk:
                del mj.revisions[rev]
        self.journal.save_if_changed()

    # -- polling ---------------------------------------------------------------
    def poll(self) -> list[Outcome]:
        """Refresh TUF metadata, then bring every followed model up to date."""
        outcomes: list[Outcome] = []
        stale = False
        client: TufClient | None = None
        self._facts = {}
        try:
            client = TufClient(self.config, self.fetcher)
            client.refresh()
        except (tuf_exc.DownloadError, tuf_exc.RepositoryError, OSError) as exc:
            # Invariant 4: the current model keeps running; we report stale and back off.
            stale = True
            client = None
            reason = f"repository metadata unavailable or expired: {exc}"
            code = exit_code_of(exc)
            outcomes = [
                Outcome(m, "kept", error=reason, checked=False, exit_code=code)
                for m in self.config.models
            ]
        if client is not None:
            for name in self.config.models:
                outcomes.append(self._poll_model(client, name))
            keep = {
                mj.update.sha256
                for mj in self.journal.models.values()
                if mj.update is not None
                and mj.state is not State.COMMITTED
                and mj.update.version not in mj.failed
                and mj.update.sha256 not in mj.failed_bundles
                and mj.revision_for(mj.update.sha256) is None
            }
            client.clean_downloads(keep)
        results = {o.model: {**o.as_status(), **self._facts.get(o.model, {})} for o in outcomes}
        status.update(self.config, self.journal, results, stale)
        return outcomes

    def _poll_model(self, client: TufClient, name: str) -> Outcome:
        mj = self.journal.model(name)
        slots = Slots(self.data, name)
        self._check_confirmation_window(name)
        if mj.state is not State.CHECKING:
            self.journal.enter(name, State.CHECKING)
        try:
            raw = client.small_target(
                channel_target_path(name, self.config.channel), self.config.limits.max_channel_bytes
            )
            if raw is None:
                self.journal.enter(name, State.IDLE)
                return Outcome(name, "no-release", slots.current(), error="no channel document")
            doc = selection.parse_for(raw, name, self.config.channel, mj.channel_sequence)
            mj.channel_sequence = doc.sequence
            for version in sorted(set(doc.revoked) - set(mj.revoked)):
                log.warning(
                    "%s: the channel revokes %s; it is never installed again", name, version
                )
            mj.revoked = list(doc.revoked)
            self._facts.setdefault(name, {})["channel_version"] = (
                doc.current.version if doc.current else None
            )
            chosen = selection.select(doc, self.device)
            if not chosen.ok or chosen.variant is None or chosen.version is None:
                self.journal.enter(name, State.IDLE)
                why = selection.why_no_bundle(name, chosen, self.device)
                return Outcome(name, "no-release", slots.current(), error=why)
            info = client.target_info(chosen.variant.target)
            if info is None:
                raise InvalidInputError(f"channel names {chosen.variant.target}, not in the repo")
            return self._apply(client, name, chosen.version, info)
        except (tuf_exc.DownloadError, tuf_exc.RepositoryError, EdgepackError, OSError) as exc:
            self._after_error(client, name, exc)
            return Outcome(
                name, "error", slots.current(), error=_describe(exc), exit_code=exit_code_of(exc)
            )

    def _after_error(self, client: TufClient, name: str, exc: BaseException) -> None:
        """Clean up after a failed update; the current revision is untouched."""
        mj = self.journal.model(name)
        slots = Slots(self.data, name)
        slots.remove_staging()
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC and mj.update is not None:
            # A resumable partial is worthless on a full disk: give its space back first.
            client.clean_downloads(set())
        try:
            if mj.state is not State.IDLE:
                self.journal.enter(name, State.IDLE)
            self._forget_unknown(name)
        except OSError:
            # Even the journal cannot be written: the saved state stays as it was and
            # start-up recovery sorts it out on the next run.
            pass

    def _apply(self, client: TufClient, name: str, version: str, info: Any) -> Outcome:
        mj = self.journal.model(name)
        slots = Slots(self.data, name)
        if "sha256" not in info.hashes:
            raise InvalidInputError(f"{info.path} has no sha256 in TUF metadata")
        sha = names.sha256(info.hashes["sha256"])  # it names files under DATA/downloads
        current = slots.current()
        record = mj.revisions.get(current) if current else None
        if record is not None and not record.sha256 and str(current).endswith("-" + sha[:12]):
            record.sha256, record.target = sha, info.path  # re-learnt after a journal rebuild
        if current and current in mj.revisions and mj.revisions[current].sha256 == sha:
            problem = self._scrub(name, current)
            if problem is None:
                self.journal.enter(name, State.IDLE)
                return Outcome(name, "up-to-date", current, version)
            # Corrupted at rest: fall back now, then install the same release afresh.
            self._repair(name, f"{current} is damaged: {problem}", drop=current)
            current = slots.current()
        refused = mj.failed.get(version) or mj.failed_bundles.get(sha)
        if refused:
            self.journal.enter(name, State.IDLE)
            return Outcome(
                name,
                "kept",
                current,
                version,
                error=(
                    f"{version} failed here before: {refused}; waiting for a newer release "
                    f"(if the device's own setup was at fault and is mended: "
                    f"edgepack-agent retry {name})"
                ),
            )
        cached = mj.revision_for(sha)
        if cached is not None and slots.revision_dir(cached).is_dir():
            # Operator rollback (or forward again): the bundle is installed and known good.
            update = Update(info.path, version, sha, info.length, cached, current)
            self.journal.enter(name, State.SWITCHING, update=update)
            self._switch_and_commit(name, cached)
            return Outcome(name, "rolled-back", cached, version, previous=current)
        attempts = mj.update.attempts if mj.update and mj.update.sha256 == sha else 0
        revision = f"{version}-{sha[:12]}"
        update = Update(info.path, version, sha, info.length, revision, current, attempts)
        if attempts >= MAX_ATTEMPTS:
            self._mark_failed(name, version, f"interrupted {MAX_ATTEMPTS} times; giving up")
            self.journal.enter(name, State.IDLE)
            return Outcome(name, "failed", current, version, error=mj.failed[version], exit_code=4)
        credentials = self._credentials()
        try:
            self._install(client, name, update, info, credentials)
        except (
            _ReleaseFailedError,
            HealthCheckError,
            VerificationError,
            InvalidInputError,
            CorruptRevisionError,
        ) as exc:
            if isinstance(exc, HealthCheckError | UnsafeModelError):
                self._mark_failed(name, version, _describe(exc))  # the model: the whole release
            else:
                mj.failed_bundles[sha] = _describe(exc)  # these bytes only
                self.journal.save()
            self.journal.enter(name, State.IDLE)
            self._forget_unknown(name)
            slots.remove_staging()
            return Outcome(
                name, "failed", slots.current(), version, error=_describe(exc), exit_code=4
            )
        return Outcome(name, "installed", revision, version, previous=current)

    def _install(
        self, client: TufClient, name: str, update: Update, info: Any, credentials: tuple[Any, Any]
    ) -> None:
        try:
            self._install_steps(client, name, update, info, credentials)
        finally:
            for child in self._warm.values():
                child.close()
            self._warm = {}

    def _warm_up(self) -> None:
        """Start the signature and health-check children now, so their start-up and
        imports overlap the rest of the download (each waits for its request)."""
        for module in (sigcheck.CHILD_MODULE, health.CHILD_MODULE):
            if module not in self._warm:
                self._warm[module] = _child.Warm(module)

    def _install_steps(
        self, client: TufClient, name: str, update: Update, info: Any, credentials: tuple[Any, Any]
    ) -> None:
        slots = Slots(self.data, name)
        mj = self.journal.model(name)
        encrypted = self.config.at_rest == "encrypted"
        unpacked = 0 if encrypted else update.length  # encrypted: the download is the revision
        bundle_path = client.bundle_path(update.sha256)
        check: StreamCheck | None = None
        if not bundle_path.exists():
            part = client.downloads / f"{update.sha256}.part"
            have = part.stat().st_size if part.exists() else 0
            self._check_space(update.length - have, unpacked)
            self.journal.enter(name, State.DOWNLOADING, update=update)
            custom = info.custom if isinstance(info.custom, dict) else {}
            if "profile" in custom:  # the bundle's identity, signed by its team in TUF
                profile = custom["profile"]
                check = StreamCheck(
                    self._key_provider(
                        client, name, update, str(profile) if profile else None, credentials[0]
                    ),
                    _payload_files(custom.get("payload")),
                )
            log.info(
                "%s: downloading %s (%d bytes%s)",
                name,
                info.path,
                update.length,
                f", resuming at {have}" if have else "",
            )
            try:
                bundle_path = client.download_bundle(info, [check] if check else [])
            except tuf_exc.LengthOrHashMismatchError as exc:
                raise tuf_exc.DownloadError(
                    f"{info.path}: {exc}; the download is discarded"
                ) from exc
            finally:
                if check is not None:
                    check.close()  # its hashing thread, also when the download was cut
            log.info("%s: downloaded %s; its TUF length and hashes match", name, info.path)
        else:
            self._check_space(0, unpacked)
        self.journal.enter(name, State.VERIFYING, update=update)
        staged = slots.staging_dir(update.revision)
        slots.remove_staging(update.revision)
        staged.parent.mkdir(parents=True, exist_ok=True)
        if check is not None and check.problem is not None:
            # The bytes match TUF's hash, so the repository serves this very bundle.
            raise VerificationError(f"{info.path}: {check.problem}")
        # The producer signature is checked in a child process (device_agent/sigcheck.py):
        # the verifier's ~25 MB of imports never stay in the daemon.
        binfo = bundle.read_info(bundle_path)
        self._warm_up()
        verified = bundle.check_signature(
            binfo,
            credentials[1],
            functools.partial(
                sigcheck.verify_signature_isolated, warm=self._warm.get(sigcheck.CHILD_MODULE)
            ),
        )
        # The signed manifest's digests, when the stream could hash the files as they came.
        digests_checked = False
        if check is not None and check.digests is not None:
            if check.digests != {f.path: f.sha256 for f in binfo.manifest}:
                raise VerificationError(
                    f"{info.path}: its payload does not match the signed manifest",
                    hint="the bundle was altered; do not use it",
                )
            digests_checked = True
        if check is not None and check.content_key is not None:
            content_key = check.content_key
        else:
            content_key = self._key_provider(client, name, update, binfo.profile, credentials[0])(
                binfo.encryption
            )
        if binfo.name != name or binfo.version != update.version:
            raise _ReleaseFailedError(
                f"{info.path} holds {binfo.name} {binfo.version}, not {name} {update.version}"
            )
        arches = set(binfo.architectures)
        if arches and not arches & {self.device.architecture, "any"}:
            raise _ReleaseFailedError(
                f"{info.path} is built for {', '.join(sorted(arches))}, "
                f"this device is {self.device.architecture}"
            )
        if not selection.profile_fits(binfo.profile, self.device):
            raise _ReleaseFailedError(
                f"{info.path} is built for the {binfo.profile} profile, this device is "
                f"{self.device.profile or 'of no known profile'}"
            )
        needed = str(binfo.metadata.get("min_agent_version", "0"))
        try:
            new_enough = versions.at_least(__version__, needed)
        except InvalidInputError as exc:
            raise _ReleaseFailedError(exc.diagnostics()) from None
        if not new_enough:
            raise _ReleaseFailedError(f"needs edgepack-agent >= {needed} (this is {__version__})")
        model_rel = str((binfo.metadata.get("model") or {}).get("path", "model.onnx"))
        self.journal.enter(name, State.STAGING)
        if encrypted:
            manifest = self._stage_encrypted(name, update, binfo, bundle_path, staged, content_key)
        else:
            bundle.unpack(
                bundle_path,
                staged,
                recipient_key=content_key,
                policy=credentials[1],
                verifier=lambda _signature, _policy: verified,  # checked just above
            )
            safeload.check_model(staged, model_rel)
            manifest = [
                {"path": f.path, "size": f.size, "sha256": f.sha256} for f in binfo.manifest
            ]
        mj.revisions[update.revision] = Revision(
            update.version, update.sha256, update.target, False, self.clock(), model_rel
        )
        slots.install(staged, update.revision, manifest)
        reference = binfo.metadata.get("monitoring")
        if isinstance(reference, dict):
            # Signed metadata, checked by the bundle reader; kept outside the revision's
            # folder, so slots.verify never sees it (and pruning removes it with the revision).
            monitorstore.save_reference(self.data, name, update.revision, reference)
        self.journal.enter(name, State.HEALTH_CHECKING)
        measured = health.check_revision_isolated(
            slots.revision_dir(update.revision),
            model_rel,
            binfo.metadata.get("health"),
            latency_runs=self.config.limits.health_latency_runs,
            budgets=self._profile_budgets(),
            timeout_s=self.config.limits.health_timeout_s,
            memory_mb=self.config.limits.health_memory_mb,
            content_key=content_key if encrypted else None,
            check_digests=not digests_checked,
            warm=self._warm.get(health.CHILD_MODULE),
        )
        mj.revisions[update.revision].healthy = True
        self._facts.setdefault(name, {})["health_latency_ms"] = {
            update.revision: round(measured.latency_ms, 3)
        }
        log.info("%s: %s passed its health check", name, update.revision)
        self.journal.enter(name, State.SWITCHING)
        self._switch_and_commit(name, update.revision)

    def _key_provider(
        self,
        client: TufClient,
        name: str,
        update: Update,
        profile: str | None,
        recipient: Any,
    ) -> KeyProvider:
        """How this device gets a release's content key: from the bundle's own recipient
        list when its recipient key is there, else from its key envelope in the repository."""

        def provide(header: Any) -> bytes:
            info = hpke_info(name, update.version, profile, header)
            key_id = recipient_key_id(recipient.public_key())
            if any(r.key_id == key_id for r in header.recipients):
                key = unwrap_key(list(header.recipients), recipient, info)
                self._warm_up()  # a release this device can open: the rest will follow
                return key
            from device_agent import envelopes

            enveloped = envelopes.fetch_content_key(
                client,
                device_id=self.config.device_id,
                name=name,
                version=update.version,
                profile=profile,
                bundle_sha256=update.sha256,
                info=info,
                recipient_key=recipient,
            )
            if enveloped is None:
                raise NoKeyError(
                    f"{name} {update.version} is not encrypted for this device's key "
                    f"(id {key_id}) and the repository holds no key envelope for "
                    f"{self.config.device_id}: not yet published, or the device is revoked",
                    hint="the current model keeps running; an operator can publish its "
                    "envelope with `edgepack keys wrap`",
                )
            self._warm_up()
            return enveloped

        return provide

    def _stage_encrypted(
        self,
        name: str,
        update: Update,
        binfo: Any,
        bundle_path: Path,
        staged: Path,
        content_key: bytes,
    ) -> list[dict[str, object]]:
        """Stage an encrypted revision: the verified download, linked (never copied), and
        its content key sealed with the storage key. Returns the manifest kept beside it."""
        storage_key = keyprotect.ensure_storage_key(
            self.data, self.config.key_protection, self.config.tpm_tcti
        )
        sealed = atrest.seal_content_key(
            storage_key,
            content_key,
            name=name,
            revision=update.revision,
            metadata_sha256=binfo.metadata_sha256,
        )
        staged.mkdir(mode=0o700)
        _atomic.write_bytes(staged / atrest.KEY_FILE, sealed, mode=0o600)
        os.link(bundle_path, staged / atrest.BUNDLE_FILE)
        crashpoint("staged-link")
        return [
            {"path": atrest.BUNDLE_FILE, "size": binfo.size, "sha256": update.sha256},
            {
                "path": atrest.KEY_FILE,
                "size": len(sealed),
                "sha256": hashlib.sha256(sealed).hexdigest(),
            },
        ]

    def _scrub(self, name: str, revision: str) -> str | None:
        """Re-check the running revision's files against its signed manifest, at most
        once per ``scrub_interval_s`` in a long-running agent (every run with ``--once``)."""
        now = time.monotonic()
        last = self._scrubbed.get((name, revision))
        if last is not None and now - last < self.config.limits.scrub_interval_s:
            return None
        problem = Slots(self.data, name).verify(revision)
        if problem is None:
            self._scrubbed[(name, revision)] = now
        return problem

    def _repair(self, name: str, why: str, drop: str | None = None) -> None:
        """Point ``current`` at the newest intact, known-good, unrevoked revision not failed
        here (or at nothing), then remove ``drop``, a damaged revision; ``why`` goes to the
        status."""
        mj = self.journal.model(name)
        slots = Slots(self.data, name)
        good = [
            r
            for r in reversed(mj.healthy_revisions())
            if r != drop
            and slots.revision_dir(r).is_dir()
            and mj.revisions[r].version not in mj.revoked
            and mj.revisions[r].version not in mj.failed
            and slots.verify(r) is None
        ]
        if good:
            slots.switch(good[0])
        else:
            slots.drop_current()
        if drop is not None and slots.current() != drop:
            slots.remove(drop)
            mj.revisions.pop(drop, None)
        mj.confirm = None
        log.warning("%s: repaired: %s; now running %s", name, why, good[0] if good else "nothing")
        mj.repairs.append(f"{why}; now running {good[0] if good else 'nothing'}")
        del mj.repairs[:-5]
        self.journal.save()

    def _switch_and_commit(self, name: str, revision: str) -> None:
        mj = self.journal.model(name)
        slots = Slots(self.data, name)
        if mj.state is not State.SWITCHING:
            self.journal.enter(name, State.SWITCHING)
        previous = mj.update.previous if mj.update else slots.current()
        slots.switch(revision)
        log.debug("%s: switched current to %s (was %s)", name, revision, previous or "nothing")
        if self.config.limits.confirm_window_s > 0 and previous and previous != revision:
            mj.confirm = {
                "revision": revision,
                "previous": previous,
                "deadline": self.clock() + self.config.limits.confirm_window_s,
            }
        self.journal.enter(name, State.COMMITTED)
        keep_prev = mj.update.previous if mj.update else None
        self._prune(name, keep={revision, *([keep_prev] if keep_prev else [])})

    def _prune(self, name: str, keep: set[str]) -> None:
        """Keep the newest known-good revisions (at least ``keep``) up to the limit."""
        mj = self.journal.model(name)
        slots = Slots(self.data, name)
        limit = max(2, self.config.limits.keep_revisions)
        ordered = sorted(mj.healthy_revisions(), key=lambda r: mj.revisions[r].installed_at)
        kept = set(keep)
        for rev in reversed(ordered):
            if len(kept) >= limit:
                break
            kept.add(rev)
        for rev in slots.installed():
            if rev not in kept and rev != slots.current():
                slots.remove(rev)
                mj.revisions.pop(rev, None)
        self.journal.save()

    def _mark_failed(self, name: str, version: str, why: str) -> None:
        self.journal.model(name).failed[version] = why
        self.journal.save()

    def _check_space(self, download: int, unpacked: int) -> None:
        """Refuse to start when the download and its unpacked copy would not fit."""
        if download > self.config.limits.max_bundle_bytes:
            raise InvalidInputError(f"a {download}-byte bundle exceeds max_bundle_bytes")
        need = download + unpacked + self.config.limits.free_space_margin_bytes
        free = shutil.disk_usage(self.data).free
        if free < need:
            raise NoSpaceError(
                f"{self.data} has {free} bytes free, the update needs {need}",
                hint="free space or lower keep_revisions; the current model keeps running",
            )

    def _credentials(self) -> tuple[Any, Any]:
        """The device's recipient key and trust policy.

        A problem here is the device's configuration, not the release's: it is
        reported as an error and never marks a release failed.
        """
        from edgepack.signing import load_trust_policy

        if not self.config.trust_policy:
            raise ConfigError(
                "no producer trust policy is configured",
                hint="enrol again with --trust POLICY (a policy file or a producer .pub)",
            )
        try:
            key = self._recipient or keyprotect.load_recipient_key(self.config, self.passphrase_env)
            policy = load_trust_policy(Path(self.config.trust_policy))
        except KeyFileError as exc:  # a key problem keeps its exit code (5)
            raise KeyFileError(
                f"the device's key or trust policy cannot be used: {exc.diagnostics()}"
            ) from exc
        except EdgepackError as exc:
            raise ConfigError(
                f"the device's key or trust policy cannot be used: {exc.diagnostics()}"
            ) from exc
        return key, policy

    def _profile_budgets(self) -> dict[str, float] | None:
        if not self.device.profile:
            return None
        try:
            from edgepack.hw import load_profile

            budget = load_profile(self.device.profile).health
        except Exception:
            return None
        return {"latency_ms": budget.latency_ms, "memory_mb": budget.memory_mb}

    # -- local verdicts ----------------------------------------------------------
    def _check_confirmation_window(self, name: str) -> None:
        mj = self.journal.model(name)
        if mj.confirm and self.clock() > float(mj.confirm["deadline"]):
            try:
                self._roll_back(name, "not confirmed within the confirmation window")
            except NoRevisionError:
                # Nothing earlier to go back to: keep serving, stop waiting for a verdict.
                mj.confirm = None
                self.journal.save()

    def _roll_back(self, name: str, why: str) -> str:
        mj = self.journal.model(name)
        slots = Slots(self.data, name)
        current = slots.current()
        if current is None:
            raise NoRevisionError(f"{name} has no active revision")
        target = None
        if mj.confirm and mj.confirm.get("revision") == current:
            target = mj.confirm.get("previous")
        # Known good, not revoked, not failed here (a reverted-from release counts as failed).
        candidates = [
            r
            for r in reversed(mj.healthy_revisions())
            if r != current
            and mj.revisions[r].version not in mj.revoked
            and mj.revisions[r].version not in mj.failed
        ]
        if target not in candidates:
            target = candidates[0] if candidates else None
        if target is None:
            raise NoRevisionError(
                f"{name} has no earlier known-good, unrevoked revision to go back to",
                hint="the current revision keeps running",
            )
        if current in mj.revisions:
            mj.failed[mj.revisions[current].version] = why
        mj.confirm = None
        old = mj.revisions[target]
        mj.update = Update(old.target, old.version, old.sha256, 0, target, current)
        self.journal.enter(name, State.SWITCHING)
        slots.switch(target)
        self.journal.enter(name, State.COMMITTED)
        log.info("%s: rolled back to %s (was %s): %s", name, target, current, why)
        return target

    def revert(self, name: str) -> str:
        """Local rollback: back to the previous known-good revision; pins against the newer."""
        target = self._roll_back(name, "reverted locally with `edgepack-agent revert`")
        status.update(self.config, self.journal)
        return target

    def report_bad(self, name: str) -> str:
        """The application's verdict: the new model misbehaves; roll back now."""
        target = self._roll_back(name, "reported bad by the application")
        status.update(self.config, self.journal)
        return target

    def confirm(self, name: str) -> str:
        """The application's verdict: the new model works; end the confirmation window."""
        mj = self.journal.model(name)
        current = Slots(self.data, name).current()
        if current is None:
            raise NoRevisionError(f"{name} has no active revision to confirm")
        mj.confirm = None
        self.journal.save()
        log.info("%s: %s confirmed by the application", name, current)
        status.update(self.config, self.journal)
        return current

    def retry(self, name: str) -> list[str]:
        """Forget that releases of ``name`` failed here, so the next poll tries them again.

        For a failure that was the device's own doing (a key or trust policy mended
        since, a full disk, a health budget): the marks of the release versions and
        bundles refused here, and the count of interrupted tries, are cleared. The
        running revision is not touched. Returns the versions and bundles forgotten.
        """
        if name not in self.config.models:
            raise InvalidInputError(
                f"{name!r} is not a model this device follows",
                hint=f"it follows {', '.join(self.config.models) or 'nothing'}",
            )
        cleared = self.journal.model(name).forget_failures()
        self.journal.save()
        log.info("%s: failure marks cleared by `retry`: %s", name, ", ".join(cleared) or "none")
        status.update(self.config, self.journal)
        return cleared

    def revisions(self, name: str) -> list[dict[str, Any]]:
        """Installed revisions of a model with their facts (for ``list``)."""
        mj = self.journal.model(name)
        slots = Slots(self.data, name)
        current = slots.current()
        out = []
        for rev in slots.installed():
            record = mj.revisions.get(rev)
            out.append(
                {
                    "revision": rev,
                    "version": record.version if record else None,
                    "active": rev == current,
                    "known_good": bool(record and record.healthy),
                    "revoked": bool(record and record.version in mj.revoked),
                    "failed": mj.failed.get(record.version) if record else None,
                }
            )
        return out


def _payload_files(raw: object) -> list[tuple[str, int]] | None:
    """The payload's (path, size) in manifest order from a target's TUF custom metadata
    (``payload``: ``[{"path", "size"}, …]``), or None when it names none or is malformed
    (the digests are then checked after the download instead)."""
    if not isinstance(raw, list) or not raw:
        return None
    files = []
    for entry in raw:
        if not isinstance(entry, dict):
            return None
        path, size = entry.get("path"), entry.get("size")
        if not isinstance(path, str) or type(size) is not int or size < 0:
            return None
        files.append((path, size))
    return files


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return "no space left on the device while updating; the current model keeps running"
    diag = getattr(exc, "diagnostics", None)
    if callable(diag):
        return str(diag())
    return f"{type(exc).__name__}: {exc}"
