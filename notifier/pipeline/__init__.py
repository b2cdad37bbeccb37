"""The steps of a notification's life, as plain functions over a session and data.

No Celery here, and nothing of ``notifier.worker`` or ``notifier.ops``: the worker's
tasks call these functions and pass in what only the worker knows (the shutdown flag,
task sizes that follow the broker's backlog); tests call them directly. In the order a
notification meets them: ``ingest`` → ``routing`` → ``windows`` → ``flush`` → ``outbox``
→ ``delivery`` → ``retry`` or ``dead_letters``. ``breaker`` and ``ratelimit`` guard
delivery; ``rules``, ``templates`` (over ``sandbox``) and ``preferences`` decide what
routing and the flush do; ``cancel``, ``inbox``, ``retention`` and ``webhook_secrets``
serve the client, the CLI and beat.
"""
