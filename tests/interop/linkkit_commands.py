"""Drive the vendor's own Python Link SDK (aliyun-iot-linkkit) as the target of cloud-to-device
commands.

Usage: linkkit_commands.py HOST PORT PRODUCT_KEY DEVICE_NAME DEVICE_SECRET

Connects, enables the thing model (a settable property `LightSwitch`, a service `reboot`) and
subscribes to the system RRPC requests, then prints `{"step": "ready"}`. From then on it
answers through the SDK's own callbacks: property sets (`on_thing_prop_changed`; the SDK
sends the set_reply itself), service calls (`on_thing_call_service` → `thing_answer_service`)
and RRPC requests (`on_topic_message` → `publish_topic` on the response topic). Exits 0 once it
handled one of each, 1 if not within 30 s.
"""
import json
import os
import sys
import tempfile
import threading

from linkkit import linkkit

host, port, pk, dn, secret = sys.argv[1:6]
port = int(port)

tsl = {
    "schema": "https://iotx-tsl.oss-ap-southeast-1.aliyuncs.com/schema.json",
    "profile": {"productKey": pk},
    "properties": [
        {"identifier": "LightSwitch", "name": "LightSwitch", "accessMode": "rw", "required": False,
         "dataType": {"type": "bool", "specs": {"0": "off", "1": "on"}}}
    ],
    "events": [
        {"identifier": "post", "name": "post", "type": "info", "required": True,
         "method": "thing.event.property.post",
         "outputData": [{"identifier": "LightSwitch", "name": "LightSwitch", "dataType": {"type": "bool"}}]}
    ],
    "services": [
        {"identifier": "set", "name": "set", "required": True, "callType": "async",
         "method": "thing.service.property.set",
         "inputData": [{"identifier": "LightSwitch", "name": "LightSwitch", "dataType": {"type": "bool"}}],
         "outputData": []},
        {"identifier": "reboot", "name": "reboot", "required": False, "callType": "async",
         "method": "thing.service.reboot",
         "inputData": [{"identifier": "delay", "name": "delay", "dataType": {"type": "int"}}],
         "outputData": [{"identifier": "accepted", "name": "accepted", "dataType": {"type": "int"}}]},
    ],
}
tsl_file = tempfile.NamedTemporaryFile("w", suffix=".json", delete=False)
json.dump(tsl, tsl_file)
tsl_file.close()

connected = threading.Event()
thing_ready = threading.Event()
subscribed = threading.Event()
seen = {"property_set": threading.Event(), "service": threading.Event(), "rrpc": threading.Event()}


def say(step, **kw):
    print(json.dumps({"step": step, **kw}), flush=True)


lk = linkkit.LinkKit(host_name=host, product_key=pk, device_name=dn, device_secret=secret)
lk.enable_logger(int(os.environ.get("LK_LOG", "40")))  # logging.ERROR
lk.config_mqtt(port=port, secure="", keep_alive=60, auto_reconnect_max_sec=2)
lk.thing_setup(tsl_file.name)


def on_connect(session_flag, rc, userdata):
    say("connected", rc=rc)
    connected.set()


def on_thing_enable(userdata):
    thing_ready.set()


def on_subscribe_topic(mid, granted_qos, userdata):
    subscribed.set()


def on_thing_prop_changed(params, userdata):
    say("property_set", params=params)
    seen["property_set"].set()


def on_thing_call_service(identifier, request_id, params, userdata):
    say("service_call", identifier=identifier, request_id=request_id, params=params)
    lk.thing_answer_service(identifier, request_id, 200, {"accepted": params.get("delay", 0)})
    seen["service"].set()


def on_topic_message(topic, payload, qos, userdata):
    marker = "/rrpc/request/"
    if marker not in topic:
        return
    say("rrpc_request", topic=topic, payload=payload.decode())
    lk.publish_topic(topic.replace(marker, "/rrpc/response/"), b"pong:" + payload, 0)
    seen["rrpc"].set()


lk.on_connect = on_connect
lk.on_thing_enable = on_thing_enable
lk.on_subscribe_topic = on_subscribe_topic
lk.on_thing_prop_changed = on_thing_prop_changed
lk.on_thing_call_service = on_thing_call_service
lk.on_topic_message = on_topic_message
lk.connect_async()

if not connected.wait(15):
    say("error", what="no CONNACK")
    sys.exit(2)
if not thing_ready.wait(15):
    say("error", what="thing model never enabled")
    sys.exit(2)
lk.subscribe_topic("/sys/%s/%s/rrpc/request/+" % (pk, dn), 0)
if not subscribed.wait(15):
    say("error", what="RRPC subscription not acknowledged")
    sys.exit(2)
say("ready")
ok = all(e.wait(30) for e in seen.values())
if not ok:
    say("error", what="not every command arrived", seen={k: e.is_set() for k, e in seen.items()})
threading.Event().wait(0.5)
lk.disconnect()
os.unlink(tsl_file.name)
sys.exit(0 if ok else 1)
