"""End-to-end throughput and latency benchmark of the notifier pipeline.

Run it with ``python -m bench`` from the repository root (``make bench``). It starts its
own worker processes against a dedicated database and Redis db, prints a table and
writes ``bench/results/latest.json``. It measures; it never asserts a speed.
"""
