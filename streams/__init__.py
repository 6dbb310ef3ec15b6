"""The stream side of Ferry, one room per role (layers inside: `routing` <- `front`,
`rollout`; `shadow` stands alone):

- `front/`: the front door: the HTTP gateway (OpenAI API, SSE), the Python producer client.
- `routing/`: where a request goes: the control tables (routes, keys, shadows, registry),
  the catalog of deployments, quotas, the busy check, `choose_backend`, and the router.
- `rollout/`: new checkpoints to serving deployments: the deployer, launchers, canary.
- `shadow/`: offline comparison of candidates: the comparator, reports, replay.

Below `ferry/`, above `models/`, `workers/`, `edge/` and `schemas/`.
"""
