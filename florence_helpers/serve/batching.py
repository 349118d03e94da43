"""Requests that arrive together share one ``generate`` call: the server's worker queue.

A :class:`Batcher` owns one model and one worker thread. Jobs of the same task and settings
that arrive within ``max_wait_ms`` of each other run in one :func:`run` call (up to
``max_batch``); each still gets exactly its own answer. A job whose client left (its future
cancelled) before the worker took it is dropped without running.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import threading
import time
from typing import Any

from ..language.tasks import TaskSpec
from ..model.inference import run
from ..model.loading import FlorenceModel


class QueueFull(RuntimeError):
    """More requests are waiting than the server takes."""


class ShuttingDown(RuntimeError):
    """The server is closing and takes no new requests."""


@dataclasses.dataclass
class Job:
    """One checked request waiting for its answer."""

    image: Any
    spec: TaskSpec
    text: str | None
    region: tuple[float, ...] | None
    settings: tuple[tuple[str, Any], ...]  # generation settings, hashable
    future: concurrent.futures.Future = dataclasses.field(default_factory=concurrent.futures.Future)

    @property
    def key(self) -> tuple[Any, ...]:
        """Jobs with the same key can share one ``run`` call."""
        return (self.spec, self.settings)


class Batcher:
    """Runs jobs on one model in a worker thread, several of the same kind per ``run`` call.

    Args:
        florence: The model.
        max_batch: Jobs per ``run`` call, at most.
        max_wait_ms: How long the first job of a batch waits for others to join it.
        max_queue: Jobs waiting or running at once, at most; past that :meth:`submit`
            raises :class:`QueueFull`.
    """

    def __init__(
        self,
        florence: FlorenceModel,
        *,
        max_batch: int = 8,
        max_wait_ms: float = 10.0,
        max_queue: int = 64,
    ) -> None:
        self.florence = florence
        self.max_batch, self.max_wait_ms, self.max_queue = max_batch, max_wait_ms, max_queue
        self._pending: list[Job] = []
        self._condition = threading.Condition()
        self._closing = False
        self._busy = 0
        self.batches = 0  # run() calls made, for the curious (and the tests)
        self.dropped = 0  # jobs whose client left before they ran
        self._thread = threading.Thread(target=self._work, name="florence-batcher", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> concurrent.futures.Future:
        """Queue a job; its future gets the result, or the error that job met."""
        with self._condition:
            if self._closing:
                raise ShuttingDown("The server is shutting down.")
            if len(self._pending) + self._busy >= self.max_queue:
                raise QueueFull(f"{len(self._pending) + self._busy} requests are waiting.")
            self._pending.append(job)
            self._condition.notify()
        job.future.add_done_callback(lambda future: self._forget(job, future))
        return job.future

    def _forget(self, job: Job, future: concurrent.futures.Future) -> None:
        """A job cancelled while it waits (its client left, its deadline passed) leaves the
        queue at once, and with it its decoded image: the server's pixel budget counts it
        free from then on."""
        if not future.cancelled():
            return
        with self._condition:
            for index, waiting in enumerate(self._pending):
                if waiting is job:
                    del self._pending[index]
                    self.dropped += 1
                    return

    @property
    def waiting(self) -> int:
        with self._condition:
            return len(self._pending) + self._busy

    def close(self, timeout: float | None = None) -> None:
        """Take no new jobs; finish every accepted one (within ``timeout``); stop the worker.

        Jobs still waiting when ``timeout`` runs out are answered with :class:`ShuttingDown`.
        """
        with self._condition:
            self._closing = True
            self._condition.notify_all()
        self._thread.join(timeout)
        with self._condition:
            left, self._pending = self._pending, []
        for job in left:
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(ShuttingDown("The server shut down first."))

    def _work(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            try:
                if batch:
                    self._run(batch)
            finally:
                with self._condition:
                    self._busy -= len(batch)

    def _next_batch(self) -> list[Job] | None:
        """The oldest waiting job and those of its kind that arrive within ``max_wait_ms``;
        jobs whose client left are dropped here."""
        with self._condition:
            while not self._pending:
                if self._closing:
                    return None
                self._condition.wait()
            first = self._pending[0]
            deadline = time.monotonic() + self.max_wait_ms / 1000
            while True:
                same = [job for job in self._pending if job.key == first.key]
                left = deadline - time.monotonic()
                if len(same) >= self.max_batch or left <= 0 or self._closing:
                    break
                self._condition.wait(left)
            batch = same[: self.max_batch]
            for job in batch:
                self._pending.remove(job)
            taken = [job for job in batch if job.future.set_running_or_notify_cancel()]
            self.dropped += len(batch) - len(taken)
            self._busy += len(taken)
            return taken

    def _run(self, batch: list[Job]) -> None:
        first = batch[0]
        settings = dict(first.settings)
        self.batches += 1
        try:
            results = run(
                self.florence,
                [job.image for job in batch],
                first.spec,
                [job.text for job in batch] if first.text is not None else None,
                region=[job.region for job in batch] if first.region is not None else None,
                batch_size=len(batch),
                progress=False,
                **settings,
            )
        except Exception:  # noqa: BLE001 - one job may spoil the batch: answer each alone
            for job in batch:
                self._run_alone(job, settings)
            return
        for job, result in zip(batch, results, strict=True):
            job.future.set_result(result)

    def _run_alone(self, job: Job, settings: dict[str, Any]) -> None:
        try:
            result = run(
                self.florence,
                job.image,
                job.spec,
                job.text,
                region=job.region,
                progress=False,
                **settings,
            )
        except Exception as error:  # noqa: BLE001 - the error is this job's answer
            job.future.set_exception(error)
        else:
            job.future.set_result(result)
