"""choose_backend without a broker: the one choice the gateway and the router make."""

from __future__ import annotations

from collections.abc import Collection

from streams.routing.choose import choose_backend


class Alias:
    """Routes `alias` to `order` (the weighted pick's order for this request id)."""

    def __init__(self, order: list[str]) -> None:
        self.order = order

    def resolve(self, model: str, request_id: str, exclude: Collection[str] = ()) -> str | None:
        if model != "alias":
            return None if model in exclude else model
        return next((d for d in self.order if d not in exclude), None)


class Topics:
    def __init__(self, *names: str) -> None:
        self.names = set(names)
        self.asked: list[tuple[str, float | None]] = []

    async def exists(self, deployment: str, since: float | None = None) -> bool:
        self.asked.append((deployment, since))
        return deployment in self.names


class Lifecycle:
    def __init__(self, *unready: str) -> None:
        self.unready = set(unready)

    def accepts_new(self, deployment: str) -> bool:
        return deployment not in self.unready


async def test_takes_the_first_that_exists_and_accepts() -> None:
    tried: set[str] = set()
    choice = await choose_backend("alias", "r1", Alias(["gone", "loading", "ok", "later"]),
                                  Topics("loading", "ok", "later"), Lifecycle("loading"), tried)
    assert choice.deployment == "ok"
    assert choice.unready == ["loading"]  # a missing one is not a reason to report
    assert tried == {"gone", "loading", "ok"}  # "later" was never looked at


async def test_a_retry_asks_for_the_next_backend() -> None:
    routes, topics, life = Alias(["a", "b"]), Topics("a", "b"), Lifecycle()
    tried: set[str] = set()
    assert (await choose_backend("alias", "r", routes, topics, life, tried)).deployment == "a"
    assert (await choose_backend("alias", "r", routes, topics, life, tried)).deployment == "b"
    assert (await choose_backend("alias", "r", routes, topics, life, tried)).deployment is None


async def test_busy_backends_are_skipped_with_when_to_retry() -> None:
    async def busy(deployment: str) -> float | None:
        return {"a": 7.0, "b": 3.0}.get(deployment)

    choice = await choose_backend("alias", "r", Alias(["a", "b"]), Topics("a", "b"),
                                  Lifecycle(), set(), busy=busy)
    assert choice.deployment is None and choice.busy_retry_s == [7.0, 3.0]
    choice = await choose_backend("alias", "r", Alias(["a", "b", "c"]), Topics("a", "b", "c"),
                                  Lifecycle(), set(), busy=busy)
    assert choice.deployment == "c"


async def test_pinned_means_the_deployment_itself_once() -> None:
    tried: set[str] = set()
    routes, topics = Alias(["other"]), Topics("alias", "other")
    choice = await choose_backend("alias", "r", routes, topics, Lifecycle(), tried, pinned=True)
    assert choice.deployment == "alias"  # not resolved by the route
    again = await choose_backend("alias", "r", routes, topics, Lifecycle(), tried, pinned=True)
    assert again.deployment is None


async def test_the_post_time_reaches_the_catalog() -> None:
    topics = Topics("d")
    await choose_backend("d", "r", Alias([]), topics, Lifecycle(), set(), since=123.0)
    assert topics.asked == [("d", 123.0)]
