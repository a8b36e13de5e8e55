"""Dynamic batching: requests from many threads coalesced into engine batches on one inference thread.

Callers submit already-preprocessed arrays (decoding happens in their own threads, off the inference thread) and get
a :class:`concurrent.futures.Future`. The inference thread takes the oldest request, then keeps adding requests until
the batch holds ``max_batch`` rows or ``max_wait_s`` has passed since it took the first one, runs the engine once and
hands every caller exactly its own rows.

Backpressure is bounded by time, not by a count of requests (a count says nothing about how long the queued images
take): a request says how long it may wait for the engine (``timeout``). It is refused at once with
:class:`~attrimeter.runtime.errors.OverloadedError` when the images already queued would take longer than that at the
engine's measured rate, and a request still queued when its time is up is failed the same way instead of being run
(its caller waited too long to be served well, and running it would only delay the ones behind it).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from attrimeter.runtime.errors import InputError, OverloadedError

__all__ = ["BatchStats", "DynamicBatcher"]

RunFn = Callable[[np.ndarray], dict[str, np.ndarray]]
_STOP = object()  # what _next returns for the close sentinel
_FULL_POLL_S = 0.001  # how often a caller waiting for room in a full queue retries
_RATE_SMOOTHING = 0.2  # weight of the newest batch in the engine's seconds-per-image estimate


@dataclass
class BatchStats:
    """Counters of a batcher (monotonic, for metrics).

    Attributes:
        requests: Requests served (including failed ones).
        rows: Images run.
        batches: Engine calls.
        failed_batches: Engine calls that raised.
        rejected: Requests refused because the queue was full or would not drain within their timeout, or dropped
            because their timeout passed while they waited.
        busy_s: Seconds spent in the engine.
        batch_sizes: Engine calls per batch size.
    """

    requests: int = 0
    rows: int = 0
    batches: int = 0
    failed_batches: int = 0
    rejected: int = 0
    busy_s: float = 0.0
    batch_sizes: dict[int, int] = field(default_factory=dict)


class _Request:
    __slots__ = ("deadline", "future", "rows", "timeout")

    def __init__(self, rows: np.ndarray, timeout: float | None) -> None:
        self.rows = rows
        self.timeout = timeout
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.future: Future[dict[str, np.ndarray]] = Future()


class DynamicBatcher:
    """Coalesce requests into batches of at most ``max_batch`` rows for one engine.

    Args:
        run: The engine: float32 ``[B, ...]`` → outputs by name, each with first axis B. Called from the batcher's
            thread only.
        max_batch: Most rows per engine call; a request with more rows is split by :meth:`submit`.
        max_wait_s: How long the first request of a batch may wait for others to join it.
        queue_size: Most requests waiting (a bound on memory; the bound on waiting is each request's ``timeout``).
        name: Thread name.

    Raises:
        ValueError: On a non-positive size or a negative wait.
    """

    def __init__(self, run: RunFn, max_batch: int = 32, max_wait_s: float = 0.002, queue_size: int = 1024,
                 name: str = "attrimeter-batcher") -> None:
        if max_batch < 1 or queue_size < 1 or max_wait_s < 0:
            raise ValueError(f"need max_batch >= 1, queue_size >= 1, max_wait_s >= 0; got {max_batch}, "
                             f"{queue_size}, {max_wait_s}")
        self._run = run
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self._queue: queue.Queue[_Request | None] = queue.Queue(maxsize=queue_size)
        self._carry: _Request | None = None
        self._queued_rows = 0  # rows submitted and not yet taken into a batch (or dropped)
        self._seconds_per_row = 0.0  # smoothed engine time per image; 0 until a batch has run
        self._closed = False
        self._lock = threading.Lock()
        self._submit_lock = threading.Lock()
        self.stats = BatchStats()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    @property
    def queue_depth(self) -> int:
        """Requests waiting now."""
        return self._queue.qsize()

    @property
    def queued_rows(self) -> int:
        """Images waiting now."""
        with self._lock:
            return self._queued_rows

    def backlog_s(self, extra_rows: int = 0) -> float:
        """Estimated seconds until the engine has run what is queued now plus ``extra_rows`` (0 before any batch)."""
        with self._lock:
            return (self._queued_rows + extra_rows) * self._seconds_per_row

    def submit(self, rows: np.ndarray, timeout: float | None = 1.0) -> list[Future[dict[str, np.ndarray]]]:
        """Queue rows for the engine.

        Args:
            rows: ``[n, ...]`` engine input, n >= 1; split into pieces of at most ``max_batch`` rows.
            timeout: The longest these rows may wait for the engine, in seconds (None: no limit; 0: only when the
                engine is idle). Refused at once when the queued images would take longer at the engine's measured
                rate; a piece still waiting when the time (plus ``max_wait_s``) is up fails with OverloadedError
                instead of running.

        Returns:
            One future per piece, in order; each resolves to that piece's outputs.

        Raises:
            InputError: For an empty request.
            OverloadedError: When the queue would not drain in time, or stayed full for ``timeout`` seconds.
            RuntimeError: After :meth:`close`.
        """
        if len(rows) == 0:
            raise InputError("empty request: no images")
        if timeout is not None:
            backlog = self.backlog_s(len(rows))
            if backlog > timeout:
                self._reject()
                raise OverloadedError(f"the engine has about {backlog:.2g} s of queued work ({self.queued_rows} "
                                      f"images), more than this request may wait ({timeout:g} s); retry later")
        requests = [_Request(rows[s:s + self.max_batch], timeout) for s in range(0, len(rows), self.max_batch)]
        deadline = requests[0].deadline
        for i, request in enumerate(requests):
            while not self._put(request):
                if deadline is not None and time.monotonic() >= deadline:
                    for queued in requests[:i]:  # already queued pieces are dropped unless already running
                        queued.future.cancel()
                    self._reject()
                    raise OverloadedError(f"the request queue is full ({self._queue.maxsize} requests waiting); "
                                          "retry later")
                time.sleep(_FULL_POLL_S)  # outside the lock: each waiting caller keeps its own deadline
        return [r.future for r in requests]

    def _reject(self) -> None:
        with self._lock:
            self.stats.rejected += 1

    def _put(self, request: _Request) -> bool:
        """Queue a request; False when the queue is full. close() takes the same lock: nothing follows its sentinel."""
        with self._submit_lock:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            try:
                self._queue.put_nowait(request)
            except queue.Full:
                return False
            with self._lock:
                self._queued_rows += len(request.rows)
            return True

    def __call__(self, rows: np.ndarray, timeout: float | None = 1.0) -> dict[str, np.ndarray]:
        """Submit and wait: the outputs of ``rows`` (pieces concatenated back).

        Args:
            rows: ``[n, ...]`` engine input.
            timeout: See :meth:`submit`.

        Returns:
            Outputs by name, first axis n.
        """
        parts = [f.result() for f in self.submit(rows, timeout)]
        if len(parts) == 1:
            return parts[0]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def _next(self, block_until: float | None) -> _Request | object | None:
        """The carried-over request, else the next queued one; :data:`_STOP` at the close sentinel, None on timeout."""
        if self._carry is not None:
            request, self._carry = self._carry, None
            return request
        try:
            if block_until is None:
                item = self._queue.get()
            else:
                remaining = block_until - time.perf_counter()
                item = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
        except queue.Empty:
            return None
        return _STOP if item is None else item

    def _loop(self) -> None:
        stopping = False
        while not stopping:
            first = self._next(None)
            if first is _STOP:
                stopping = True
                continue
            assert isinstance(first, _Request)
            if not self._take(first):
                continue
            batch, rows = [first], len(first.rows)
            deadline = time.perf_counter() + self.max_wait_s
            while rows < self.max_batch and not stopping:
                nxt = self._next(deadline)
                if nxt is None:
                    break
                if nxt is _STOP:  # close() queued it after every request: finish this batch (and a carry), then stop
                    stopping = True
                    break
                assert isinstance(nxt, _Request)
                if rows + len(nxt.rows) > self.max_batch:
                    self._carry = nxt  # first in the next batch: order is kept
                    break
                if not self._take(nxt):
                    continue
                batch.append(nxt)
                rows += len(nxt.rows)
            self._run_batch(batch, rows)

    def _take(self, request: _Request) -> bool:
        """Take a request off the queue: True to run it; False when its caller gave up or its time is up."""
        with self._lock:
            self._queued_rows -= len(request.rows)
        if not request.future.set_running_or_notify_cancel():  # its caller gave up (queue full)
            return False
        if request.deadline is not None and time.monotonic() > request.deadline + self.max_wait_s:
            self._reject()
            request.future.set_exception(OverloadedError(
                f"waited more than {request.timeout:g} s for the engine (overloaded); retry later"))
            return False
        return True

    def _run_batch(self, batch: list[_Request], rows: int) -> None:
        start = time.perf_counter()
        try:
            inputs = batch[0].rows if len(batch) == 1 else np.concatenate([r.rows for r in batch])
            outputs = self._run(inputs)
            bad = [k for k, v in outputs.items() if len(v) != rows]
            if bad:
                raise RuntimeError(f"the engine returned {bad} with a first axis other than the batch ({rows})")
        except Exception as e:  # every waiting caller must hear of the failure
            for r in batch:
                r.future.set_exception(e)
            failed = True
        else:
            offset = 0
            for r in batch:
                n = len(r.rows)
                r.future.set_result({k: v[offset:offset + n] for k, v in outputs.items()})
                offset += n
            failed = False
        busy = time.perf_counter() - start
        with self._lock:
            if not failed:
                rate = busy / rows
                self._seconds_per_row = rate if not self.stats.batches else (
                    _RATE_SMOOTHING * rate + (1 - _RATE_SMOOTHING) * self._seconds_per_row)
            s = self.stats
            s.requests += len(batch)
            s.rows += rows
            s.batches += 1
            s.failed_batches += failed
            s.busy_s += busy
            s.batch_sizes[rows] = s.batch_sizes.get(rows, 0) + 1

    def close(self) -> None:
        """Finish the queued requests, then stop the inference thread (idempotent)."""
        with self._submit_lock:
            if self._closed:
                return
            self._closed = True
        self._queue.put(None)  # after every queued request (submit holds the lock): they all still run
        self._thread.join()
