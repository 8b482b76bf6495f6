"""Kafka-native core of slotforge: coordinator, client, tracing, replay and the CLI."""
