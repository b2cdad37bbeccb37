"""Where state lives: the tables (``models``), sessions and engines (``db``),
migrations (``migrate``) and the Redis that holds breakers and rate limits
(``state``)."""
