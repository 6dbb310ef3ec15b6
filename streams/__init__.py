"""Stream processors on faust-streaming: the router and the shadow comparator (later issues).

They import `schemas/` for the message contract and never `workers/`.
"""
