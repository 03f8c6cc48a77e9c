"""The outbox <-> topic classification the way a team would script it today:
confluent-kafka reads every partition to its end, psycopg streams the outbox,
Python sets do the join. The peer of `reentry outbox diff` in bench/outbox.

    outbox_diff.py BOOTSTRAP TOPIC CONNINFO FROM_MS COMPARE_MS
"""
import json
import sys

import psycopg
from confluent_kafka import Consumer, KafkaError, TopicPartition

bootstrap, topic, conninfo, from_ms, compare_ms = sys.argv[1:6]
from_ms, compare_ms = int(from_ms), int(compare_ms)

c = Consumer({"bootstrap.servers": bootstrap, "group.id": "bench-python",
              "enable.auto.commit": False, "enable.partition.eof": True,
              "fetch.wait.max.ms": 100})  # the same as reentry and the bare consumer
parts = list(c.list_topics(topic, timeout=10).topics[topic].partitions)
starts = c.offsets_for_times([TopicPartition(topic, p, from_ms) for p in parts], timeout=10)
c.assign(starts)
seen = {}  # event id -> message timestamp
eof, dups = 0, 0
while eof < len(parts):
    for m in c.consume(10000, timeout=1.0):
        if m.error():
            if m.error().code() == KafkaError._PARTITION_EOF:
                eof += 1
                continue
            raise SystemExit(m.error())
        ts = m.timestamp()[1]
        if ts < compare_ms:
            continue
        eid = dict(m.headers() or []).get("event_id")
        if eid is None:
            continue
        eid = eid.decode()
        if eid in seen:
            dups += 1
        else:
            seen[eid] = ts
c.close()

mark_published = mark_unpublished = pending = in_sync = 0
with psycopg.connect(conninfo) as db:
    with db.cursor(name="outbox") as cur:
        cur.itersize = 10000
        cur.execute(
            "SELECT id::text, published_at IS NOT NULL,"
            " (extract(epoch FROM published_at) * 1000)::int8 FROM outbox_event"
            " WHERE created_at >= to_timestamp(%s / 1000.0) OR published_at >= to_timestamp(%s / 1000.0)"
            " OR published_at IS NULL", (compare_ms, compare_ms))
        for eid, published, published_ms in cur:
            ts = seen.pop(eid, None)
            if ts is not None:
                if published:
                    in_sync += 1
                else:
                    mark_published += 1
            elif published and published_ms is not None and published_ms >= compare_ms:
                mark_unpublished += 1
            elif published:
                in_sync += 1
            else:
                pending += 1
orphans = len(seen)
print(json.dumps({"mark-published": mark_published, "orphans": orphans,
                  "mark-unpublished": mark_unpublished, "pending": pending, "in-sync": in_sync}))
