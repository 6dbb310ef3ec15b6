"""Ferry workers: the Kafka loop, the batcher and the Kafka-agnostic inference engine."""
