"""Ferry's Kafka edge: what every component needs to talk to the brokers, below both
`workers/` and `streams/` (layers: `schemas` <- `edge` <- `workers`, `streams` <- `ferry`).

`kafka_clients.py` (connection and security options), `topic_admin.py` (topics, partitions,
start-up waits), `transactional.py` (transactional ids that fence zombies),
`metrics_server.py` (the Prometheus endpoint every component serves), `reader.py` (the background reader that fails loudly), `tables.py`
(compacted control tables: views, one-shot puts).
"""
