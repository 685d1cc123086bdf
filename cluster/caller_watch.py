"""Aborting the calls of a caller that is gone: an engine replica watches the ingress replicas it serves.

    watch = CallerWatch(interval_s=1.0)
    async def generate(self, request, caller):            # an engine replica's streaming method
        with watch.calls_of(caller):                       # caller: the ingress replica's ActorHandle
            async for output in driver.generate(request):  # cancelled if the caller dies
                yield output

A caller that cancels its call (a cancelled stream, a deadline, a disconnect) makes Serve cancel the
replica's generator, which aborts the engine request and frees its KV blocks. A caller whose process
dies cancels nothing: Ray does not end an actor's streaming task when the task's caller dies, so the
engine would compute the request to its end for nobody, holding its blocks. So each call names its
caller, and while a replica runs calls of a caller it asks Ray every ``interval_s`` whether that caller
is alive. Once Ray reports it dead (``ActorDiedError``: about a second after its process is killed; after
a lost node, once Ray's health checks declare the node dead), the tasks running its calls are
cancelled: the same path as a cancelled call.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import Any

from ray.exceptions import ActorDiedError


class CallerWatch:
    def __init__(self, interval_s: float = 1.0, ping_timeout_s: float = 10.0) -> None:
        """``interval_s``: seconds between two checks of a caller; ``ping_timeout_s``: a check that takes
        longer proves nothing (a busy or unreachable caller), and the next one asks again."""
        self.interval_s = interval_s
        self.ping_timeout_s = ping_timeout_s
        self._tasks_by_caller: dict[Any, set[asyncio.Task]] = {}
        self._callers: dict[Any, Any] = {}
        self._watcher: asyncio.Task | None = None
        self.num_aborted_calls = 0
        """Calls cancelled because their caller died."""

    @contextlib.contextmanager
    def calls_of(self, caller: Any | None) -> Iterator[None]:
        """Watch ``caller`` (an ``ActorHandle``; None: a driver or a test, not watched) while the current
        task runs its call; the task is cancelled if the caller dies meanwhile."""
        if caller is None:
            yield
            return
        task = asyncio.current_task()
        key = caller._actor_id  # the ActorID: one entry per caller, whichever handle copy each call sent
        self._callers.setdefault(key, caller)
        self._tasks_by_caller.setdefault(key, set()).add(task)
        if self._watcher is None or self._watcher.done():
            self._watcher = asyncio.get_running_loop().create_task(self._watch(), name="caller-watch")
        try:
            yield
        finally:
            tasks = self._tasks_by_caller.get(key)
            if tasks is not None:
                tasks.discard(task)
                if not tasks:
                    del self._tasks_by_caller[key], self._callers[key]

    def num_calls_by_caller(self) -> dict[str, int]:
        """Calls running now, by their caller's actor id (hex)."""
        return {key.hex(): len(tasks) for key, tasks in self._tasks_by_caller.items()}

    async def _watch(self) -> None:
        """Check each caller with calls running, every ``interval_s``, until none is left."""
        while self._tasks_by_caller:
            await asyncio.sleep(self.interval_s)
            keys = list(self._tasks_by_caller)
            deaths = await asyncio.gather(*(self._is_dead(self._callers[key]) for key in keys))
            for key, is_dead in zip(keys, deaths, strict=True):
                tasks = self._tasks_by_caller.pop(key, None) if is_dead else None
                if tasks is not None:
                    del self._callers[key]
                    self.num_aborted_calls += len(tasks)
                    for task in tasks:
                        task.cancel()

    async def _is_dead(self, caller: Any) -> bool:
        try:
            await asyncio.wait_for(caller.__ray_ready__.remote(), self.ping_timeout_s)
        except ActorDiedError:
            return True
        except Exception:  # noqa: BLE001 (unavailable for now, or slow: not known dead; asked again)
            return False
        return False
