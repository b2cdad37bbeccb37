"""The Celery side: the app and its configuration, the tasks (thin wrappers over
``notifier.pipeline``), the batch consumer that forms ingest batches, adaptive batch
sizes read from the broker, and graceful shutdown."""
