"""A consumer application written the way one is written for the vendor's server-side
subscription: it reads the `topic`, `messageId` and `generateTime` application properties,
de-duplicates on messageId and acks. Here it uses pika against a fleetgate consumer group queue.

Usage: pika_consumer.py AMQP_URL QUEUE COUNT TIMEOUT_SECS

Prints one JSON line per distinct message: {topic, messageId, generateTime, body}; exits 0 once
COUNT distinct messages arrived, 1 on timeout.
"""
import json
import sys
import time

import pika

url, queue, count, timeout = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
conn = pika.BlockingConnection(pika.URLParameters(url))
ch = conn.channel()
ch.basic_qos(prefetch_count=50)
seen = set()
deadline = time.time() + timeout
for method, props, body in ch.consume(queue, inactivity_timeout=0.5):
    if time.time() > deadline:
        break
    if method is None:
        continue
    headers = props.headers or {}
    topic = headers.get("topic")
    message_id = headers.get("messageId")
    generate_time = headers.get("generateTime")
    if isinstance(topic, bytes):
        topic = topic.decode()
    if isinstance(message_id, bytes):
        message_id = message_id.decode()
    ch.basic_ack(method.delivery_tag)
    if message_id in seen:
        continue
    seen.add(message_id)
    print(json.dumps({"topic": topic, "messageId": message_id, "generateTime": generate_time,
                      "amqpMessageId": props.message_id, "contentType": props.content_type,
                      "deliveryMode": props.delivery_mode, "body": json.loads(body)}), flush=True)
    if len(seen) >= count:
        break
ch.cancel()
conn.close()
sys.exit(0 if len(seen) >= count else 1)
