"""The chaos suite: ``python -m chaos`` (``make chaos``) breaks the pipeline while
traffic flows and accounts for every notification it accepted.

Modules: ``config`` (where and how big), ``pipeline`` (real workers, beat, SMTP server),
``traffic`` (the producer), ``faults`` (the injectors), ``fuzz`` (bad input),
``ledger`` (the accounting), ``scenarios`` and ``report``.
"""
