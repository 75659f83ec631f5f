"""Telling transient I/O faults from permanent ones, and retrying the transient ones.

Object stores fail in two ways that need opposite handling: a 429, a 503 or a reset connection
usually succeeds on the next try, while a 404 or a 403 never will, and retrying it only delays
the dead letter. `is_transient` classifies an exception the way the storage clients and Beam
raise them (google.api_core / google.cloud exceptions, apitools `HttpError`, requests/urllib3,
plain socket errors, and Beam's `BeamIOError`, which wraps one exception per path), and
`call_with_retries` retries only what it classifies as transient.
"""

from __future__ import annotations

import logging
import random
import time
from typing import Callable, Iterator, TypeVar

T = TypeVar("T")
_LOG = logging.getLogger(__name__)

# HTTP statuses worth another try: rate limiting, request timeout and every server-side error.
_TRANSIENT_STATUSES = frozenset({408, 429})
# Exceptions that say the object is not there or not ours to read; no retry can change that.
_PERMANENT_TYPES: tuple[type[BaseException], ...] = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


def http_status(exc: BaseException) -> int | None:
    """The HTTP status an exception carries, if it comes from an HTTP client, else None.

    google.api_core exceptions have an int `code`; apitools `HttpError` has `status_code`;
    requests and google-resumable-media errors carry a `response` with `status_code`. `code` is
    only trusted on google.api_core exceptions, because other libraries use it for other things
    (libsndfile error numbers, errno values).
    """
    try:
        from google.api_core import exceptions as api_exceptions

        if isinstance(exc, api_exceptions.GoogleAPICallError):
            return exc.code if isinstance(exc.code, int) else None
    except ImportError:  # pragma: no cover - the [gcp] extra is a dependency
        pass
    status = getattr(exc, "status_code", None)
    if isinstance(status, int):
        return status
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None) or getattr(response, "status", None)
    return status if isinstance(status, int) else None


def _inner(exc: BaseException) -> list[BaseException]:
    """The per-path exceptions of a Beam `BeamIOError`, else []."""
    details = getattr(exc, "exception_details", None)
    if isinstance(details, dict):
        return [value for value in details.values() if isinstance(value, BaseException)]
    return []


def _classify(exc: BaseException) -> bool | None:
    """True transient, False permanent, None: this exception alone does not say."""
    from featurebeam.errors import FeaturebeamError

    if isinstance(exc, FeaturebeamError):
        return False  # already classified by our own code (e.g. an exhausted retry)
    if isinstance(exc, _PERMANENT_TYPES):
        return False
    status = http_status(exc)
    if status is not None:
        return status in _TRANSIENT_STATUSES or 500 <= status <= 599
    inner = _inner(exc)
    if inner:
        # One open or read maps to one path; for several, retry only if every failure may pass.
        return all(is_transient(e) for e in inner)
    if isinstance(exc, (ConnectionError, TimeoutError)):  # includes BrokenPipe, ConnectionReset, socket.timeout
        return True
    if _is_client_transport_error(exc):
        return True
    return None


def _is_client_transport_error(exc: BaseException) -> bool:
    """Connection-level errors of the HTTP stacks under the GCS clients (not builtin subclasses)."""
    import http.client

    if isinstance(exc, (http.client.IncompleteRead, http.client.RemoteDisconnected)):
        return True
    candidates = []
    try:
        import requests.exceptions as rq

        candidates += [rq.ConnectionError, rq.Timeout, rq.ChunkedEncodingError]
    except ImportError:  # pragma: no cover
        pass
    try:
        import urllib3.exceptions as u3

        candidates += [u3.ProtocolError, u3.TimeoutError, u3.NewConnectionError]
    except ImportError:  # pragma: no cover
        pass
    try:
        import google.auth.exceptions as gauth

        candidates.append(gauth.TransportError)
    except ImportError:  # pragma: no cover
        pass
    return isinstance(exc, tuple(candidates))


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """`exc`, then its __cause__ / __context__ chain, each once."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)


def is_transient(exc: BaseException) -> bool:
    """Whether retrying the operation that raised `exc` may succeed.

    The first exception in the __cause__/__context__ chain that says anything decides: a
    `FileNotFoundError` raised while handling a reset connection is permanent, and a generic
    `OSError` raised from a 503 is transient.
    """
    for link in _chain(exc):
        verdict = _classify(link)
        if verdict is not None:
            return verdict
    return False


def backoff_delay(attempt: int, *, base_delay: float, max_delay: float) -> float:
    """Seconds to wait after failed try number `attempt` (1-based): exponential, capped, jittered.

    The jitter ("equal jitter": half fixed, half random) spreads the retries of many workers that
    failed together, so they do not hit the store again in lockstep.
    """
    ceiling = min(max_delay, base_delay * 2 ** (attempt - 1))
    return ceiling / 2 + random.uniform(0, ceiling / 2)


def call_with_retries(
    fn: Callable[[], T],
    *,
    what: str,
    tries: int = 5,
    base_delay: float = 0.5,
    max_delay: float = 30.0,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Call `fn()` up to `tries` times, sleeping between tries, while it raises transient errors.

    what: names the operation in log lines and in the note added to the final exception, e.g.
    "open gs://bucket/a.wav". A permanent error (see `is_transient`) is raised at once; after
    `tries` transient failures the last one is re-raised with a note giving the try count.
    """
    if tries < 1:
        raise ValueError(f"call_with_retries({what!r}): tries must be >= 1, got {tries}")
    attempt = 1
    while True:
        try:
            return fn()
        except Exception as exc:
            if not is_transient(exc):
                raise
            if attempt >= tries:
                exc.add_note(f"{what}: gave up after {tries} tries with transient errors")
                raise
            delay = backoff_delay(attempt, base_delay=base_delay, max_delay=max_delay)
            _LOG.warning(
                "%s: transient %s: %s; try %d of %d in %.2f s", what, type(exc).__name__, exc, attempt + 1, tries, delay
            )
            sleep(delay)
            attempt += 1
