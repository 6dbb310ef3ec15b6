"""The front door: the OpenAI-compatible HTTP gateway (`gateway.py`; fields, formats and
sampling of the OpenAI API in `openai_*.py`; token streams as SSE in `sse.py`; its metrics
and HTTP limits), and the producer-side client (`client.py`, with `deltas.py` merging a
stream's deltas) that posts requests on Kafka and resolves their results."""
