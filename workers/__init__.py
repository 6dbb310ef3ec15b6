"""Ferry workers: the Kafka loop, admission, and the Kafka-agnostic continuous-batching engine
(scheduler decides, engine executes, model defines)."""
