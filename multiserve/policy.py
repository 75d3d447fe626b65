"""What the lifecycle decides, as pure functions of what it knows: which versions are settled,
which one ``latest`` means, which loaded versions a scan retires or a swap supersedes, whether
a refusal lasts, and what start-up still waits for.

No I/O, no threads, no event loop, no clock (the time is passed in): each function can be
tested exhaustively without a server or files. `multiserve.lifecycle` carries the decisions
out.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Container, Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum

from multiserve.catalog import LATEST, Catalog, Ident, Key, VersionRecord
from multiserve.errors import (
    ModelLoadFailed,
    ModelTooLarge,
    MultiserveError,
    VersionNotFound,
    VersionSettling,
)

# How far apart two measurements of one model's memory may be (the same model loaded twice is
# charged within this fraction of itself): a cost only this much over the budget may be noise.
MEASUREMENT_NOISE = 0.15

Failures = Mapping[Ident, ModelLoadFailed | ModelTooLarge]


class VersionState(StrEnum):
    SETTLING = "settling"  # files still being written; not a model yet
    AVAILABLE = "available"  # complete, not loaded; loads on its first request
    DOWNLOADING = "downloading"  # fetching its files from a bucket into the disk cache
    LOADING = "loading"  # loading and warming up
    READY = "ready"
    FAILED = "failed"  # the error is kept and shown; other versions keep serving


def state(
    record: VersionRecord,
    *,
    loaded: bool,
    loading: bool,
    downloading: bool,
    failure: str | None,
) -> tuple[VersionState, str | None]:
    """The version's state and, when it failed, why."""
    if record.problem is not None:
        return VersionState.FAILED, record.problem
    if loaded:
        return VersionState.READY, failure
    if loading:
        return (VersionState.DOWNLOADING if downloading else VersionState.LOADING), None
    if failure is not None:
        return VersionState.FAILED, failure
    if not record.settled:
        return VersionState.SETTLING, None
    return VersionState.AVAILABLE, None


def servable(record: VersionRecord, loaded: Container[Key], failures: Container[Ident]) -> bool:
    """Whether ``record`` may answer a request now (or after an on-demand load)."""
    if record.key in loaded:
        return True  # loaded files keep serving while new ones settle or warm up
    return (
        record.settled
        and not record.staged
        and record.problem is None
        and record.ident not in failures
    )


def latest(
    catalog: Catalog, name: str, loaded: Container[Key], failures: Container[Ident]
) -> VersionRecord | None:
    """The version ``latest`` means now: the highest that can serve."""
    for record in catalog.model(name).descending():
        if servable(record, loaded, failures):
            return record
    return None


def resolve(
    catalog: Catalog,
    labels: Mapping[str, Mapping[str, int]],
    name: str,
    selector: str,
    loaded: Container[Key],
    failures: Failures,
) -> list[VersionRecord]:
    """The versions a URL's version part may mean, best first. Raises the error a request for
    it gets when none can serve (404 unknown, 503 settling or failed)."""
    label = labels.get(name, {}).get(selector)
    if label is not None:
        record = catalog.model(name).versions.get(label)
        if record is None:
            raise VersionNotFound(
                f"label {selector!r} of {name!r} points to version {label}, which is not "
                "in the repository"
            )
        return [record]
    candidates = catalog.candidates(name, selector)
    if selector != LATEST:
        return candidates
    found = [record for record in candidates if servable(record, loaded, failures)]
    if not found:
        if all(not record.settled for record in candidates):
            raise VersionSettling(f"model {name!r} has no version ready yet: still settling")
        failing = next((r for r in candidates if r.settled), candidates[0])
        failure = failures.get(failing.ident)
        error = failing.problem or (failure.message if failure is not None else None)
        raise ModelLoadFailed(f"model {name!r} has no version that loads; newest error: {error}")
    return found


def may_serve_loaded(
    loaded_fingerprint: str, record: VersionRecord, failures: Container[Ident]
) -> bool:
    """Whether a version loaded from files with ``loaded_fingerprint`` may answer for
    ``record``: loaded from the same files, or from earlier ones while the new ones settle,
    wait to be staged, or failed to load."""
    return (
        loaded_fingerprint == record.fingerprint
        or record.staged
        or not record.settled
        or record.ident in failures
    )


def unavailable(record: VersionRecord, failures: Failures) -> MultiserveError | None:
    """Why ``record`` (not loaded) cannot load now, or None if it can."""
    if record.problem is not None:
        return ModelLoadFailed(record.problem)
    failure = failures.get(record.ident)
    if failure is not None:
        return type(failure)(failure.message)
    if not record.settled:
        return VersionSettling(
            f"{record.name} version {record.version} is still being written (settling)"
        )
    return None


@dataclass(frozen=True, slots=True)
class Reconciled:
    """What a scan changes: the catalog to publish, the loaded versions it removed, the
    versions to load and warm before they serve, and when to look again."""

    catalog: Catalog
    removed: list[Key]
    staged: list[VersionRecord]
    next_check: float | None


def reconcile(
    old: Catalog,
    records: Iterable[VersionRecord],
    now: float,
    settle_window_s: float,
    loaded: Collection[Key],
    failures: Container[Ident],
) -> Reconciled:
    """Turn a scan into the next catalog.

    A version is settled once its files have not changed for ``settle_window_s`` (or it has
    its marker). A newly settled version of a model that has a loaded version is staged (it
    loads and warms before ``latest`` moves to it) when it is newer than the version served,
    or when it is new files for a loaded version. ``next_check``: the seconds until a
    settling version is due to be looked at again, or None if none is settling.
    """
    hot = {key[0] for key in loaded}
    published: list[VersionRecord] = []
    next_check: float | None = None
    for record in records:
        settled = record.marker or now - record.changed_at >= settle_window_s
        if not settled:
            wait = max(record.changed_at + settle_window_s - now, 0.0)
            next_check = wait if next_check is None else min(next_check, wait)
        previous = old.find(record.key)
        newly_settled = settled and (
            previous is None or previous.fingerprint != record.fingerprint or not previous.settled
        )
        if newly_settled:
            staged = record.name in hot and _newer_than_served(old, record, loaded, failures)
        else:
            staged = settled and previous is not None and previous.staged
        published.append(dataclasses.replace(record, settled=settled, staged=staged))
    catalog = Catalog.from_records(published)
    removed = [key for key in loaded if catalog.find(key) is None]
    return Reconciled(catalog, removed, [r for r in published if r.staged], next_check)


def _newer_than_served(
    old: Catalog, record: VersionRecord, loaded: Container[Key], failures: Container[Ident]
) -> bool:
    if record.key in loaded:
        return True  # the files of a loaded version changed: reload before serving them
    served = latest(old, record.name, loaded, failures) if record.name in old.models else None
    return served is None or record.version > served.version


def superseded(
    promoted: VersionRecord,
    loaded: Iterable[Key],
    pinned: Container[Key],
    labelled: Collection[int],
    default_policy: str,
) -> list[Key]:
    """The loaded versions a swap to ``promoted`` retires: under the ``latest`` version policy,
    every other loaded version of the model that is neither pinned nor labelled."""
    if (promoted.version_policy or default_policy) != "latest":
        return []
    return [
        key
        for key in loaded
        if key[0] == promoted.name
        and key != promoted.key
        and key not in pinned
        and key[1] not in labelled
    ]


def refusal_lasts(cost: int, budget: int, measured: bool) -> bool:
    """Whether a model refused for costing ``cost`` bytes of a ``budget`` stays refused until
    its files change. A cost read from the process's memory is noisy: only one clearly over
    the budget is a verdict; within the noise the next request tries again."""
    if budget <= 0 or cost <= budget:
        return False
    return not measured or cost > budget * (1 + MEASUREMENT_NOISE)


def startup_pending(
    catalog: Catalog,
    first_scan: Iterable[Key],
    pinned: Iterable[Key],
    loaded: Container[Key],
    failures: Container[Ident],
) -> list[str]:
    """What start-up still waits for before the server may say it is ready, one phrase each:
    every version the first scan found must be settled (or gone, or failed), and every pinned
    version loaded (or failed). Empty: ready."""
    settling = []
    for key in first_scan:
        record = catalog.find(key)
        if record is not None and not record.settled and record.problem is None:
            settling.append(f"{key[0]} version {key[1]}")
    loading = []
    for key in sorted(pinned):
        record = catalog.find(key)
        if record is None or key in loaded or record.problem is not None:
            continue
        if record.ident not in failures:
            loading.append(f"{key[0]} version {key[1]}")
    pending = []
    if settling:
        pending.append("settling: " + ", ".join(sorted(settling)))
    if loading:
        pending.append("loading pinned: " + ", ".join(loading))
    return pending
