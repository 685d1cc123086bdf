"""``cluster/caller_watch.py``: a replica cancels the calls of a caller that died, and only those.

The callers here stand in for actor handles (their ``__ray_ready__`` answers as Ray would for a live, a
dead or an unreachable actor): what is tested is which tasks the watch cancels, not Ray.
"""

from __future__ import annotations

import asyncio

from ray.exceptions import ActorDiedError, ActorUnavailableError

from cluster.caller_watch import CallerWatch


class _Ping:
    def __init__(self, caller: _Caller) -> None:
        self.caller = caller

    def remote(self):
        async def answer() -> None:
            if self.caller.error is not None:
                raise self.caller.error

        return answer()


class _Caller:
    """An actor handle's surface the watch uses: an id and ``__ray_ready__.remote()``."""

    def __init__(self, actor_id: str) -> None:
        self._actor_id = actor_id.encode()  # like Ray's ActorID: hashable, with ``hex()``
        self.error: BaseException | None = None
        self.__ray_ready__ = _Ping(self)


async def _call(watch: CallerWatch, caller: _Caller | None, started: asyncio.Event) -> str:
    with watch.calls_of(caller):
        started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            return "cancelled"
    return "finished"


async def _run_calls(errors: dict[str, BaseException | None]) -> tuple[dict[str, str], CallerWatch]:
    watch = CallerWatch(interval_s=0.01)
    callers = {name: _Caller(name) for name in errors}
    started = {name: asyncio.Event() for name in [*errors, "driver"]}
    tasks = {name: asyncio.create_task(_call(watch, callers[name], started[name])) for name in errors}
    tasks["driver"] = asyncio.create_task(_call(watch, None, started["driver"]))  # not watched
    await asyncio.gather(*(event.wait() for event in started.values()))
    assert watch.num_calls_by_caller() == {name.encode().hex(): 1 for name in errors}  # not the driver's
    for name, error in errors.items():
        callers[name].error = error
    await asyncio.sleep(0.2)  # many checks
    pending = [task for task in tasks.values() if not task.done()]
    for task in pending:
        task.cancel()  # what is left: ended by the test
    done = await asyncio.gather(*tasks.values(), return_exceptions=True)
    ends = {
        name: "running" if task in pending else result
        for (name, task), result in zip(tasks.items(), done, strict=True)
    }
    return ends, watch


def test_only_the_calls_of_a_dead_caller_are_cancelled() -> None:
    ends, watch = asyncio.run(
        _run_calls(
            {
                "dead": ActorDiedError(),
                "alive": None,
                "unreachable": ActorUnavailableError("unreachable", None),
            }
        )
    )
    # Unavailable is not dead: a busy or partitioned caller's calls keep running.
    assert ends == {"dead": "cancelled", "alive": "running", "unreachable": "running", "driver": "running"}
    assert watch.num_aborted_calls == 1
    assert not watch._tasks_by_caller  # nothing watched once every call has ended
