"""Shadow traffic on the real broker: the router mirrors, candidates answer only on their
shadow-results topic, primaries copy mirrored results, and scoring is teacher-forced."""

from __future__ import annotations

import asyncio
import math
import uuid

import torch

from edge.topic_admin import ensure_topics
from schemas import Request, decode, decode_result, requests_topic
from schemas.topics import (
    API_KEY_HEADER, PRIMARY_HEADER, PRIMARY_RESULTS_TOPIC, mirror_topic, shadow_results_topic,
)
from streams.front.client import FerryClient
from streams.routing.keys import add_key
from streams.routing.routes import set_route
from streams.routing.shadows import Shadow, set_shadow


async def post(client: FerryClient, ingress: str, api_key: str, tenant: str, model: str,
               prompt: str) -> asyncio.Future:
    request = Request(id=uuid.uuid4().hex, model=model, prompt=prompt, max_new_tokens=4)
    return await client.submit(request, ingress, key=tenant.encode(),
                               headers=[(API_KEY_HEADER, api_key.encode())])


def test_mirroring_is_by_id_and_share() -> None:
    shadow = Shadow("a", ("c",), 30.0)
    ids = [uuid.uuid4().hex for _ in range(3000)]
    share = sum(map(shadow.mirrors, ids)) / len(ids)
    assert 0.26 < share < 0.34
    assert [shadow.mirrors(i) for i in ids[:100]] == [shadow.mirrors(i) for i in ids[:100]]
    assert all(Shadow("a", ("c",), 100.0).mirrors(i) for i in ids[:100])


async def test_full_shadow_answers_once_from_primary_and_copies_everything(
        router, start_worker, client, unique, read_topic, kafka_bootstrap) -> None:
    primary, candidate, alias = unique("primary"), unique("cand"), unique("alias")
    await start_worker(primary)
    await start_worker(candidate, shadow=True)
    await set_route(kafka_bootstrap, alias, {primary: 100})
    await set_shadow(kafka_bootstrap, alias, [candidate], 100)
    tenant = unique("t")
    api_key = await add_key(kafka_bootstrap, tenant)
    futures = [await post(client, router.ingress, api_key, tenant, alias, f"prompt {i}")
               for i in range(10)]
    results = await asyncio.wait_for(asyncio.gather(*futures), 60)
    ids = {r.id for r in results}
    assert {r.model for r in results} == {primary} and all(r.error is None for r in results)

    shadow = await read_topic(shadow_results_topic(candidate), 10)
    assert {decode_result(m.value).id for m in shadow} == ids
    assert {decode_result(m.value).model for m in shadow} == {candidate}
    assert {dict(m.headers)[PRIMARY_HEADER] for m in shadow} == {primary.encode()}
    copies = await read_topic(PRIMARY_RESULTS_TOPIC, 10, where=lambda m: m.key.decode() in ids)
    assert {decode_result(m.value).id for m in copies} == ids
    # The client's reply topic got exactly one answer per request: the candidate's never.
    replies = await read_topic(client.reply_to, 11, timeout=3)
    assert sorted(decode_result(m.value).id for m in replies) == sorted(ids)
    assert router.metric("ferry_router_mirrored_total", {"alias": alias}) == 10


async def test_dead_candidate_changes_nothing_for_clients(router, start_worker, client, unique,
                                                          read_topic, kafka_bootstrap) -> None:
    primary, candidate, alias = unique("primary"), unique("dead"), unique("alias")
    await start_worker(primary)
    await set_route(kafka_bootstrap, alias, {primary: 100})
    await set_shadow(kafka_bootstrap, alias, [candidate], 100)  # nobody serves it
    tenant = unique("t")
    api_key = await add_key(kafka_bootstrap, tenant)
    futures = [await post(client, router.ingress, api_key, tenant, alias, f"p {i}")
               for i in range(6)]
    results = await asyncio.wait_for(asyncio.gather(*futures), 60)
    assert all(r.error is None and r.model == primary for r in results)
    mirrored = await read_topic(mirror_topic(candidate), 6)
    assert {decode(m.value)["id"] for m in mirrored} == {r.id for r in results}
    assert {decode(m.value)["model"] for m in mirrored} == {candidate}


def test_score_is_the_teacher_forced_mean_logprob(engine) -> None:
    prompt = engine.encode("the model")
    target = engine.encode(" answers")
    ids = torch.tensor([prompt + target])
    logits = engine.model(ids, torch.arange(ids.shape[1])[None])[0]
    logprobs = torch.log_softmax(logits.float(), -1)
    expected = sum(float(logprobs[len(prompt) - 1 + i, t]) for i, t in enumerate(target))
    assert math.isclose(engine.score(prompt, target), expected / len(target), rel_tol=1e-5)


async def test_worker_answers_score_requests(start_worker, client, unique, engine,
                                             kafka_bootstrap) -> None:
    dep = unique("scorer")
    await ensure_topics(kafka_bootstrap, {requests_topic(dep): 1})
    await start_worker(dep)
    prompt_ids, target = engine.encode("hello"), engine.encode(" world")
    result = await client.request(Request(id=uuid.uuid4().hex, model=dep, input_ids=prompt_ids,
                                          score_ids=target, max_new_tokens=1), timeout=60)
    assert result.error is None and result.output_ids == []
    assert result.score is not None
    assert math.isclose(result.score, engine.score(prompt_ids, target), rel_tol=1e-5)
    bad = await client.request(Request(id=uuid.uuid4().hex, model=dep, input_ids=prompt_ids,
                                       score_ids=[10**6]), timeout=60)
    assert bad.error and "score_ids" in bad.error.message
