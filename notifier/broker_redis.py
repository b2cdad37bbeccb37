"""kombu's Redis transport with an atomic receive: a message is never only in a socket.

kombu's transport takes a message with ``BRPOP`` and then, in a second command, writes it
to its unacknowledged hash (``unacked``) and index (``unacked_index``), from which the
visibility-timeout scan (``restore_visible``) puts it back if nobody acknowledges it. A
worker SIGKILLed between the two, or a connection that breaks after Redis sent the
``BRPOP`` reply, loses the message: it is in no list and in no hash (the chaos suite saw
0-2 per run).

Here one Lua script does both: it takes the oldest message of the first non-empty queue
key (kombu's key order: every queue at priority step 0, then each at the next step) and
records it in ``unacked``/``unacked_index`` under the delivery tag kombu will use, in one
atomic step; with queues read in priority order it takes as many as the prefetch window
has room for (at most ``RECEIVE_MOST``), in the order repeated ``BRPOP`` calls would.
Whatever happens to the reply, the message is in the hash, and kombu's own restore
brings it back after ``visibility_timeout``; the ``ack`` deletes it as before.
Everything on Redis keeps kombu's format (lists, priority-step keys, the same hash
entries ``[message, exchange, routing_key]`` and index scores), so stock producers (a plain
Celery app sending ``notifier.ingest``), stock consumers and stock restore logic work
with it unchanged.

A Lua script cannot block as ``BRPOP`` does. An idle consumer in a worker's event loop
is woken by Redis itself instead: its consuming connection turns ``CLIENT TRACKING ON
REDIRECT <id> NOLOOP`` on, ``<id>`` being a second connection of the channel subscribed
to ``__redis__:invalidate``, and it reads its queue keys with ``EXISTS`` before it waits,
so any later push to one of them sends that connection an invalidation, and the
consumer runs the script at once (Redis >= 6, nothing to configure; the same on every
queue, not only the first). It still looks every ``WAKE_SAFETY_INTERVAL`` (1 s, as
kombu's ``BRPOP`` timeout), should a wake be missed. Where Redis refuses tracking, and in
a blocking ``drain_events`` (tools, not workers), it looks every ``idle_poll_interval``
(``NOTIFIER_BROKER_IDLE_POLL_INTERVAL``, 10 ms) instead. A blocking wait on the server is
no substitute: Redis times blocked clients out on its ``hz`` clock (10 per second by
default), so ``BLMOVE q q RIGHT LEFT 0.01`` (a non-destructive wait on one key) returns
after 100 ms. Figures: docs/reliability.md.

Consumers with ``no_ack`` (Celery's reply queues) get the message without a record, as
before; ``basic_get`` (a synchronous poll, not used by workers) is kombu's own.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from time import monotonic, sleep, time
from typing import Any

from kombu import connection as kombu_connection
from kombu.transport import redis as kombu_redis
from kombu.transport.virtual import QoS as VirtualQoS
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import loads

#: KEYS: the unacked hash, the unacked index, then the queue keys in consuming order.
#: ARGV[1]: the index score (the worker's clock, as kombu's ``QoS.append`` writes it);
#: ARGV[2]: the most messages to take; ARGV[3]: bytes after which no more are taken;
#: ARGV[3 + n]: "1" when a message taken from queue key n is to be recorded (a consumer
#: that acknowledges), "0" for a ``no_ack`` consumer.
#: Takes the oldest messages of the first non-empty key, then of the next, as repeated
#: ``BRPOP`` calls would (kombu's priority order); at least one if there is one.
#: Returns {n, message, 1 if recorded else 0, n, message, ...}, empty when there is none.
#: Nothing is written before the hash and index: a refused write (OOM) aborts the script
#: with that message still on its queue.
RECEIVE_SCRIPT = """
local most, budget = tonumber(ARGV[2]), tonumber(ARGV[3])
local taken, bytes, out = 0, 0, {}
for i = 3, #KEYS do
  while taken < most and (taken == 0 or bytes < budget) do
    local item = redis.call('LINDEX', KEYS[i], -1)
    if not item then break end
    local recorded = 0
    if ARGV[i + 1] == '1' then
      local ok, m = pcall(cjson.decode, item)
      local props = ok and type(m) == 'table' and m['properties']
      local info = type(props) == 'table' and props['delivery_info']
      if type(info) == 'table' and type(props['delivery_tag']) == 'string'
          and type(info['exchange']) == 'string' and type(info['routing_key']) == 'string' then
        local tag = props['delivery_tag']
        redis.call('HSET', KEYS[1], tag, '[' .. item .. ',' .. cjson.encode(info['exchange'])
                   .. ',' .. cjson.encode(info['routing_key']) .. ']')
        redis.call('ZADD', KEYS[2], ARGV[1], tag)
        recorded = 1
      end
    end
    redis.call('RPOP', KEYS[i])
    taken = taken + 1
    bytes = bytes + #item
    out[#out + 1] = i - 2
    out[#out + 1] = item
    out[#out + 1] = recorded
  end
end
return out
"""

#: The most messages one receive takes, and the bytes after which it takes no more: a
#: burst of single notifications costs one round trip per this many, not one each, and
#: the script (which holds Redis while it runs) stays short.
RECEIVE_MOST = 50
RECEIVE_BYTES = 256 * 1024

#: Seconds a consumer with a wake connection waits, idle, before it looks anyway.
WAKE_SAFETY_INTERVAL = 1.0

#: Seconds an idle consumer waits before it looks at its queues again (transport option
#: ``idle_poll_interval``).
IDLE_POLL_INTERVAL = 0.01


class _WakeClient:
    """What kombu's poller registers a socket by: an object with ``connection``."""

    def __init__(self, connection: Any) -> None:
        self.connection = connection


class QoS(kombu_redis.QoS):
    """kombu's Redis QoS, minus the second write for a message the script recorded, and
    with :meth:`acks_together`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: Tags acknowledged inside :meth:`acks_together`, not yet removed from Redis.
        self._deferred: list[str] | None = None

    def append(self, message: Any, delivery_tag: str) -> None:
        if self.channel.take_recorded(delivery_tag):
            VirtualQoS.append(self, message, delivery_tag)
        else:
            super().append(message, delivery_tag)

    def ack(self, delivery_tag: str) -> None:
        if self._deferred is None:
            super().ack(delivery_tag)
        else:
            self._deferred.append(delivery_tag)
            VirtualQoS.ack(self, delivery_tag)

    @contextmanager
    def acks_together(self) -> Iterator[None]:
        """Acknowledge every message acked inside the block with one Redis round trip.

        kombu removes each acknowledged message from ``unacked`` and its index with a
        ``MULTI``/``EXEC`` of its own: for a batch of single notifications that was a
        quarter of the worker's consumer CPU. Here the block's acks are counted at once
        (the prefetch window moves as before) and their records removed by one
        transaction when it ends. Should that fail (Redis away), the records stay, and
        the visibility-timeout restore brings the messages back, as for a single ack
        that failed: ingest stores each notification once (ids are the dedup key)."""
        if self._deferred is not None:  # nested: the outer block removes them
            yield
            return
        self._deferred = []
        try:
            yield
        finally:
            tags, self._deferred = self._deferred, None
            if tags:
                self._remove_all(tags)

    def _remove_all(self, tags: list[str]) -> None:
        try:
            with self.pipe_or_acquire() as pipe:
                pipe.zrem(self.unacked_index_key, *tags).hdel(self.unacked_key, *tags)
                pipe.execute()
        except Exception as exc:  # the restore brings them back (see acks_together)
            kombu_redis.warning("%d acknowledgements not written (%r): the messages come"
                                " back after the visibility timeout", len(tags), exc)


class AtomicReceive:
    """The receiving half of a kombu Redis channel, replaced: ``_brpop_start`` sends the
    receive script (or, idle, an ``EXISTS`` of the queue keys, which also arms the wake)
    on the channel's consuming connection, ``_brpop_read`` reads its reply. Both keep
    kombu's names, so its event loop, prefetch pausing and health checks drive them
    unchanged."""

    QoS = QoS
    idle_poll_interval = IDLE_POLL_INTERVAL
    from_transport_options: Any = (*kombu_redis.Channel.from_transport_options,
                                   "idle_poll_interval")

    # Set by kombu's Channel; declared for the type checker.
    client: Any
    connection: Any
    sep: str
    global_keyprefix: str
    unacked_key: str
    unacked_index_key: str
    priority_steps: list[int]
    _queue_cycle: Any
    _in_poll: Any
    _brpop_sent_at: Any

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._recorded: set[str] = set()
        self._no_ack_queues: set[str] = set()
        self._idle_since: float | None = None
        self._timer_pending = False
        #: Idle, the next command asks ``EXISTS`` of the queue keys, not the script.
        self._looking = False
        self._sent = "EVALSHA"
        self._receive_keys: list[str] = []
        #: The wake connection (subscribed to invalidations), its client id, and the
        #: consuming socket whose tracking redirects to it; None: none (yet).
        self._wake: Any = None
        self._wake_id = 0
        self._tracking_for: Any = None
        self._wake_refused = False
        self._woken = False
        super().__init__(*args, **kwargs)
        self.handlers["WAKE"] = self._wake_read  # type: ignore[attr-defined]
        self._script_sha = ""  # loaded when first consuming: a producer never needs it

    def _load_script(self) -> str:
        with self.conn_or_acquire() as client:  # type: ignore[attr-defined]
            return str(client.script_load(RECEIVE_SCRIPT))

    def take_recorded(self, delivery_tag: str) -> bool:
        """Whether the script recorded ``delivery_tag`` (then forget it)."""
        if delivery_tag in self._recorded:
            self._recorded.discard(delivery_tag)
            return True
        return False

    def basic_consume(self, queue: str, no_ack: bool, *args: Any, **kwargs: Any) -> Any:
        (self._no_ack_queues.add if no_ack else self._no_ack_queues.discard)(queue)
        return super().basic_consume(queue, no_ack, *args, **kwargs)  # type: ignore[misc]

    def _brpop_start(self, timeout: float | None = None) -> None:
        if self._idle_wait() > 0:
            return
        queues = self._queue_cycle.consume(len(self.active_queues))  # type: ignore[attr-defined]
        if not queues:
            return
        keys = [self._q_for_pri(queue, pri)  # type: ignore[attr-defined]
                for pri in self.priority_steps for queue in queues]
        self._receive_keys = keys
        prefix = self.global_keyprefix
        self._in_poll = self.client.connection
        self._brpop_sent_at = monotonic()
        self._woken = False
        if self._looking:  # idle: is there anything at all? (cheaper than the script)
            self._track()  # before the EXISTS, whose reading of the keys tracks them
            self._sent = "EXISTS"
            self.client.connection.send_command("EXISTS", *(prefix + key for key in keys))
            return
        record = ["0" if self._queue_of(key) in self._no_ack_queues else "1" for key in keys]
        self._script_sha = self._script_sha or self._load_script()
        self._sent = "EVALSHA"
        self.client.connection.send_command(
            "EVALSHA", self._script_sha, len(keys) + 2,
            prefix + self.unacked_key, prefix + self.unacked_index_key,
            *(prefix + key for key in keys), repr(time()), self._receive_most(),
            RECEIVE_BYTES, *record)

    def _receive_most(self) -> int:
        """How many messages one receive may take: what the prefetch window has room
        for, at most :data:`RECEIVE_MOST`; one unless the queues are read in priority
        order (round-robin moves to the next queue after every message)."""
        if getattr(self, "queue_order_strategy", None) != "priority":
            return 1
        room = self.qos.can_consume_max_estimate()  # type: ignore[attr-defined]
        return max(1, min(RECEIVE_MOST, room if room is not None else RECEIVE_MOST))

    def _idle_wait(self) -> float:
        """Seconds before an idle channel may look again (0: now). In a worker's event
        loop it says so with a timer (the loop's next tick sends the script); a blocking
        consumer (``drain_events``) has nothing else to do, and sleeps."""
        if self._idle_since is None:
            return 0.0
        wait = self._idle_since + self._idle_interval() - monotonic()
        if wait <= 0:
            self._idle_since, self._looking = None, True
            return 0.0
        if self._hub is None:
            sleep(wait)
            self._idle_since, self._looking = None, True
            return 0.0
        self._set_timer(wait)
        return wait

    @property
    def _hub(self) -> Any:
        return getattr(self.connection.cycle, "hub", None)

    def _go_idle(self) -> None:
        """Nothing came: look again in ``idle_poll_interval``. The timer is set now,
        while the event loop handles the reply: one set in its next tick would count only
        after that tick's wait, which the loop computed before (up to a second)."""
        self._idle_since = monotonic()
        if self._hub is not None:
            self._set_timer(self._idle_interval())

    def _set_timer(self, wait: float) -> None:
        if not self._timer_pending:
            self._timer_pending = True
            self._hub.call_later(wait, self._timer_fired)

    def _idle_interval(self) -> float:
        return WAKE_SAFETY_INTERVAL if self._tracking_for is not None else self.idle_poll_interval

    def _track(self) -> None:
        """Arm the wake for the ``EXISTS`` about to be sent (in an event loop only): a
        wake connection, and tracking on the consuming connection redirected to it."""
        if self._hub is None or self._wake_refused:
            return
        connection = self.client.connection
        if self._wake is None and not self._open_wake():
            return
        if self._tracking_for == (connection._sock, self._wake_id):
            return
        try:
            connection.send_command("CLIENT", "TRACKING", "ON", "REDIRECT", self._wake_id,
                                    "NOLOOP")
            connection.read_response()
        except self.ResponseError:  # type: ignore[attr-defined]
            self._refuse_wake()
            return
        self._tracking_for = (connection._sock, self._wake_id)

    def _open_wake(self) -> bool:
        pool = self.async_pool  # type: ignore[attr-defined]
        wake = None
        try:
            wake = (pool.get_connection() if kombu_redis._REDIS_GET_CONNECTION_WITHOUT_ARGS
                    else pool.get_connection("_"))
            wake.send_command("CLIENT", "ID")
            wake_id = int(wake.read_response())
            wake.send_command("SUBSCRIBE", "__redis__:invalidate")
            wake.read_response(push_request=True)  # RESP3 answers with a push
        except self.ResponseError:  # type: ignore[attr-defined]
            pool.release(wake)
            self._refuse_wake()
            return False
        except self.connection_errors:  # type: ignore[attr-defined]
            if wake is not None:
                wake.disconnect()
            return False  # tried again before the next wait
        self._wake, self._wake_id = _WakeClient(wake), wake_id
        self.connection.cycle._register(self, self._wake, "WAKE")
        return True

    def _refuse_wake(self) -> None:
        kombu_redis.warning("Redis refused client tracking: idle consumers poll every %s s",
                            self.idle_poll_interval)
        self._wake_refused = True
        self._drop_wake()

    def _drop_wake(self) -> None:
        wake, self._wake, self._tracking_for = self._wake, None, None
        if wake is not None:
            wake.connection.disconnect()  # kombu's hook takes it out of the event loop

    def _wake_read(self) -> None:
        """An invalidation: a queue key this channel read changed. Look at once if idle
        (or right after the ``EXISTS`` in flight, which may have read it before)."""
        wake = self._wake
        if wake is None:
            return
        try:
            wake.connection.read_response(push_request=True)
            while wake.connection.can_read(timeout=0):
                wake.connection.read_response(push_request=True)
        except self.connection_errors:  # type: ignore[attr-defined]
            self._drop_wake()
        if self._idle_since is not None:
            self._idle_since, self._looking = None, False
        else:
            self._woken = True

    def _timer_fired(self) -> None:
        """The idle-poll timer: its firing makes the event loop tick, and the tick polls
        (or sets the next timer, had it fired early)."""
        self._timer_pending = False

    def _queue_of(self, key: str) -> str:
        return key.rsplit(self.sep, 1)[0] if self.sep in key else key

    def _brpop_read(self, **options: Any) -> bool:
        sent, self._sent = self._sent, "EVALSHA"
        try:
            try:
                reply = self.client.parse_response(self.client.connection, sent, **options)
            except self.ResponseError as exc:  # type: ignore[attr-defined]
                if "NOSCRIPT" not in str(exc):
                    raise
                self._script_sha = self._load_script()  # a restarted or promoted server
                raise kombu_redis.Empty() from None
            except self.connection_errors:  # type: ignore[attr-defined]
                self.client.connection.disconnect()
                raise
            if sent == "EXISTS":
                self._looking = False
                if not reply and not self._woken:  # still nothing
                    self._go_idle()
                raise kombu_redis.Empty()
            if not reply:
                if self._tracking_for is not None:
                    self._looking = True  # at once: the EXISTS arms the wake
                else:
                    self._go_idle()
                raise kombu_redis.Empty()
            self._deliver_all(reply)
            return True
        finally:
            self._in_poll = None
            self._flush_brpop_reauth()  # type: ignore[attr-defined]

    def _deliver_all(self, reply: list[Any]) -> None:
        """Hand each message of a receive to its consumer. One that cannot be read or
        handed over costs that one alone: the others are still delivered, then the
        first error is raised, as for a single message."""
        failure: BaseException | None = None
        for start in range(0, len(reply), 3):
            index, item, recorded = reply[start:start + 3]
            try:
                queue = self._queue_of(self._receive_keys[int(index) - 1])
                message = loads(bytes_to_str(item))
                if int(recorded):
                    self._recorded.add(message["properties"]["delivery_tag"])
                self._queue_cycle.rotate(queue)
                self.connection._deliver(message, queue)
            except Exception as exc:
                failure = failure or exc
        if failure is not None:
            raise failure


class Channel(AtomicReceive, kombu_redis.Channel):
    """A ``redis://`` channel with the atomic receive."""


class SentinelChannel(AtomicReceive, kombu_redis.SentinelChannel):
    """A ``sentinel://`` channel with the atomic receive."""

    from_transport_options: Any = (
        *kombu_redis.SentinelChannel.from_transport_options, "idle_poll_interval")


class Poller(kombu_redis.MultiChannelPoller):
    """kombu's poller, which also reads a channel's wake connection when the channel
    may not consume (prefetch full): unread, it would keep the loop spinning."""

    def on_readable(self, fileno: int) -> Any:
        channel_type = self._fd_to_chan.get(fileno)
        if channel_type is not None and channel_type[1] == "WAKE":
            return channel_type[0]._wake_read()
        return super().on_readable(fileno)


class HubTimers:
    """Hands the worker's event loop to the channels, for their idle-poll timers."""

    cycle: Any

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.cycle = Poller()

    def register_with_event_loop(self, connection: Any, loop: Any) -> None:
        super().register_with_event_loop(connection, loop)  # type: ignore[misc]
        self.cycle.hub = loop


class Transport(HubTimers, kombu_redis.Transport):
    """``redis://``: kombu's transport with :class:`Channel`."""

    Channel = Channel


class SentinelTransport(HubTimers, kombu_redis.SentinelTransport):
    """``sentinel://``: kombu's Sentinel transport with :class:`SentinelChannel`."""

    Channel = SentinelChannel


#: How kombu prints a connection's URL (``Connection.as_uri``, read by Flower's broker page
#: and Celery's banner): by the scheme each transport stands for, not its import path.
kombu_connection.resolve_aliases.update({
    f"{__name__}:Transport": "redis",
    f"{__name__}:SentinelTransport": "sentinel",
})
