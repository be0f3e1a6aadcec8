"""Admission (a bounded queue) and the inference worker threads.

:class:`Admission` counts requests in flight on ``POST /v1/predict`` (being uploaded, waiting, running);
the guard middleware takes a slot before the request body is read, so a full service answers 503 with
``Retry-After`` at once instead of receiving the upload first. :class:`Workers` runs jobs on N threads,
each holding its own loaded service state (a predictor is not shared between threads: its activation
cache and Grad-CAM hooks are per call), and measures the service time that ``Retry-After`` is
estimated from.
"""
from __future__ import annotations

import asyncio
import math
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor


class Admission:
    def __init__(self, capacity: int, workers: int = 1) -> None:
        self.capacity, self.workers = int(capacity), int(workers)
        self._lock = threading.Lock()
        self.in_flight = 0
        self.refused = 0
        self.mean_s = 1.0  # service time per request, exponentially averaged (updated by Workers)

    def try_acquire(self) -> bool:
        with self._lock:
            if self.in_flight >= self.capacity:
                self.refused += 1
                return False
            self.in_flight += 1
            return True

    def release(self) -> None:
        with self._lock:
            self.in_flight = max(0, self.in_flight - 1)

    def retry_after_s(self) -> int:
        """Seconds until a slot is likely free: the queue ahead divided among the workers."""
        with self._lock:
            ahead = max(1, self.in_flight - self.workers + 1)
        return max(1, math.ceil(self.mean_s * ahead / self.workers))

    def observe(self, seconds: float) -> None:
        with self._lock:
            self.mean_s = 0.8 * self.mean_s + 0.2 * float(seconds)


class Workers:
    """``await workers.run(fn, *args)`` runs ``fn(state, *args)`` on a worker thread with one of the states."""

    def __init__(self, states: list, admission: Admission) -> None:
        self._states: queue.Queue = queue.Queue()
        for s in states:
            self._states.put(s)
        self.admission = admission
        self._pool = ThreadPoolExecutor(max_workers=len(states), thread_name_prefix="anymc3d-infer")
        self.completed = 0
        self._lock = threading.Lock()

    def _call(self, fn, args):
        state = self._states.get()
        t0 = time.perf_counter()
        try:
            return fn(state, *args)
        finally:
            self._states.put(state)
            self.admission.observe(time.perf_counter() - t0)
            with self._lock:
                self.completed += 1

    async def run(self, fn, *args):
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self._call, fn, args)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
