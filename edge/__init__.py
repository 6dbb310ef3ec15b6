"""Ferry's Kafka edge: what every component needs to talk to the brokers, below both
`workers/` and `streams/` (layers: `schemas` <- `edge` <- `workers` <- `models` <- `streams`
<- `ferry`).

`kafka_clients.py` (connection and security options), `topic_admin.py` (topics, partitions,
start-up waits), `reader.py` (every partition of a topic read by a background task that
fails loudly), `tables.py` (compacted control tables: views kept current, one-shot puts),
`faust_app.py` (the one faust app factory), `transactional.py` (transactional ids that
fence zombies), `metrics_server.py` (the Prometheus endpoint every component serves).
"""
