"""The stream side of Ferry: the HTTP gateway, the router (a faust-streaming agent), the
request client, rollout (routes, canary, deployer, registry, launchers) and shadow traffic
(mirror, comparator, replay, reports). Below `ferry/`, above `workers/` and `schemas/`.
"""
