"""What operators run and read: the ``notifier`` command, health checks, statistics,
Prometheus metrics and the status queries behind them."""
