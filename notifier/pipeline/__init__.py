"""The steps of a notification's life, as plain functions over a session and data.

No Celery here (``make lint`` checks it): the worker's tasks call these functions, and
tests call them directly. In the order a notification meets them: ``ingest`` →
``aggregation`` (routing, windows, flush) → ``delivery`` → ``retry`` or
``dead_letters``; ``breaker`` and ``ratelimit`` guard delivery; ``rules``,
``templates`` and ``preferences`` decide what routing does.
"""
