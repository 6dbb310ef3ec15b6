"""Where a request goes: the control tables every router and gateway follows (`routes.py`
aliases and A/B weights, `keys.py` API keys and tenants, `shadows.py` mirror rules,
`registry.py` deployment lifecycle), which deployments exist (`catalog.py`), whether one is
busy (`backlog.py`), the tenant's quotas (`quota.py`), and the router that forwards from
`ferry.ingress` exactly once (`router.py`, `transactions.py`)."""
