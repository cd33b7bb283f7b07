"""Drive the vendor's own Python Link SDK (aliyun-iot-linkkit) against a fleetgate gateway.

Usage: linkkit_device.py HOST PORT PRODUCT_KEY DEVICE_NAME DEVICE_SECRET VERSION

Connects with the device secret (the SDK signs the CONNECT itself), reports VERSION on
/ota/device/inform, posts a property through the thing model and waits for the gateway's
post_reply. Prints one JSON line per step; exits 0 only when all three succeeded.
"""
import json
import os
import sys
import tempfile
import threading
import time

from linkkit import linkkit

host, port, pk, dn, secret, version = sys.argv[1:7]
port = int(port)

tsl = {
    "schema": "https://iotx-tsl.oss-ap-southeast-1.aliyuncs.com/schema.json",
    "profile": {"productKey": pk},
    "properties": [
        {"identifier": "Temp", "name": "Temp", "accessMode": "rw", "required": False,
         "dataType": {"type": "float", "specs": {"min": "-40", "max": "120", "step": "0.1"}}}
    ],
    "events": [
        {"identifier": "post", "name": "post", "type": "info", "required": True,
         "method": "thing.event.property.post",
         "outputData": [{"identifier": "Temp", "name": "Temp", "dataType": {"type": "float"}}]}
    ],
    "services": [],
}
tsl_file = tempfile.NamedTemporaryFile("w", suffix=".json", delete=False)
json.dump(tsl, tsl_file)
tsl_file.close()

connected = threading.Event()
thing_ready = threading.Event()
posted = threading.Event()
post_result = {}


def say(step, **kw):
    print(json.dumps({"step": step, **kw}), flush=True)


lk = linkkit.LinkKit(host_name=host, product_key=pk, device_name=dn, device_secret=secret)
lk.enable_logger(int(os.environ.get("LK_LOG","40")))  # logging.ERROR
lk.config_mqtt(port=port, secure="", keep_alive=60, auto_reconnect_max_sec=2)
lk.thing_setup(tsl_file.name)


def on_connect(session_flag, rc, userdata):
    say("connected", rc=rc)
    connected.set()


def on_thing_enable(userdata):
    say("thing_enabled")
    thing_ready.set()


def on_thing_prop_post(request_id, code, data, message, userdata):
    post_result.update(request_id=request_id, code=code, message=message)
    say("property_post_reply", code=code, message=message)
    posted.set()


lk.on_connect = on_connect
lk.on_thing_enable = on_thing_enable
lk.on_thing_prop_post = on_thing_prop_post
lk.connect_async()

ok = True
if not connected.wait(15):
    say("error", what="no CONNACK")
    sys.exit(2)
rc = lk.ota_report_version(None, version)
say("version_reported", rc=str(rc))
if not thing_ready.wait(15):
    say("error", what="thing model never enabled (subscriptions refused?)")
    ok = False
else:
    rc, request_id = lk.thing_post_property({"Temp": 21.5})
    say("property_posted", rc=rc, request_id=request_id)
    if rc != 0 or not posted.wait(15):
        say("error", what="no property post_reply")
        ok = False
    elif post_result.get("code") != 200:
        say("error", what="post_reply code", code=post_result.get("code"))
        ok = False
time.sleep(0.5)
lk.disconnect()
os.unlink(tsl_file.name)
sys.exit(0 if ok else 1)
