"""`ferry gateway` (the OpenAI-compatible HTTP front) and `ferry send` (post from a shell)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import uuid
from typing import Any

from edge.metrics_server import MetricsPortError, add_metrics_port
from ferry.common import CliError, bootstrap, bootstrap_arg, run_until_signalled
from ferry.flags import add_flags, describe, from_args
from schemas import Request

log = logging.getLogger("ferry.gateway")


def register(sub: Any) -> None:
    gw = sub.add_parser("gateway", help="OpenAI-compatible HTTP gateway over Kafka")
    gw.defer(_add_gateway_flags)  # the gateway's module imports aiohttp: only for `gateway`
    gw.set_defaults(func=_gateway)

    send = sub.add_parser("send", help="post prompts to a deployment and print the results")
    send.add_argument("prompts", nargs="+")
    send.add_argument("--model", required=True, help="deployment name")
    bootstrap_arg(send)
    fields = Request.__dataclass_fields__  # the request's own defaults, written once
    send.add_argument("--max-new-tokens", type=int, default=fields["max_new_tokens"].default,
                      help="tokens to generate per prompt")
    send.add_argument("--temperature", type=float, default=fields["temperature"].default,
                      help="0 = greedy")
    send.add_argument("--seed", type=int, default=None, help="sampling seed")
    send.add_argument("--timeout", type=float, default=None,
                      help="seconds to wait for each result (default: the client's, 60)")
    send.add_argument("--stream", action="store_true",
                      help="print each prompt's text as it is generated, then its result")
    send.set_defaults(func=_send)


def _add_gateway_flags(parser: argparse.ArgumentParser) -> None:
    from streams.front.gateway import GatewaySettings

    add_flags(parser, GatewaySettings)
    add_metrics_port(parser, "gateway")
    bootstrap_arg(parser)


def _gateway(args: argparse.Namespace) -> int:
    from streams.front.gateway import GatewaySettings, serve

    servers = bootstrap(args)
    settings = from_args(GatewaySettings, args)
    log.info("gateway config: bootstrap=%s metrics_port=%s %s", servers, args.metrics_port,
             describe(settings))
    try:
        asyncio.run(run_until_signalled(serve(
            servers, settings, metrics_port=args.metrics_port,
            metrics_route=False)))  # tenants' names are not for callers to read
    except MetricsPortError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def _send(args: argparse.Namespace) -> int:
    from edge.topic_admin import list_topics
    from schemas import Delta, Request, encode, requests_topic
    from streams.front.client import REQUEST_TIMEOUT_S, FerryClient

    servers = bootstrap(args)
    timeout = REQUEST_TIMEOUT_S if args.timeout is None else args.timeout

    async def go() -> int:
        # Never create a topic for a typo or an alias (the router resolves aliases).
        topic = requests_topic(args.model)
        if topic not in await list_topics(servers):
            raise CliError(f"no deployment {args.model!r} (no topic {topic}): `ferry "
                           "deployments` lists them; an alias is served through the router "
                           "(`ferry gateway`, or post to ferry.ingress)")
        failed = 0
        async with FerryClient(servers) as client:
            requests = [Request(id=uuid.uuid4().hex, model=args.model, prompt=prompt,
                                max_new_tokens=args.max_new_tokens,
                                temperature=args.temperature, seed=args.seed)
                        for prompt in args.prompts]
            if args.stream:
                for request in requests:
                    async for event in client.stream(request, timeout):
                        if isinstance(event, Delta):
                            print(event.text, end="", flush=True)
                        else:
                            print("\n" + encode(event).decode())
                            failed += event.error is not None
                return int(failed > 0)
            futures = [await client.submit(request) for request in requests]
            try:
                results = await asyncio.wait_for(asyncio.gather(*futures), timeout)
            except TimeoutError:
                raise CliError(f"no result within {timeout:g}s: is a worker serving "
                               f"{args.model!r}? (`ferry deployments`)") from None
            for result in results:
                print(encode(result).decode())
                failed += result.error is not None
            return int(failed > 0)  # an error result is a failed send

    return asyncio.run(go())
