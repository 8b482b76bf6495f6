"""Local infrastructure: the Kafka broker launcher, topic set-up and ClickHouse schema."""
