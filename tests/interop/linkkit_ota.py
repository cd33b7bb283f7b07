"""The vendor's Python Link SDK (aliyun-iot-linkkit) takes an OTA update from a fleetgate gateway.

Usage: linkkit_ota.py HOST PORT PRODUCT_KEY DEVICE_NAME DEVICE_SECRET FROM_VERSION

Connects, reports FROM_VERSION, waits for the upgrade push (the SDK parses it itself), downloads
the firmware with the SDK's own download-and-verify (`download_ota_firmware` checks `sign` with
`signMethod`), reports progress on /ota/device/progress, then "reboots" (reconnects) and reports
the pushed version. Prints one JSON line per step; exits 0 only when every step succeeded.
"""
import json
import os
import sys
import tempfile
import threading
import time

from linkkit import linkkit

host, port, pk, dn, secret, from_version = sys.argv[1:7]
port = int(port)
pushed = {}
got_push = threading.Event()
connected = threading.Event()


def say(step, **kw):
    print(json.dumps({"step": step, **kw}), flush=True)


def make_client():
    lk = linkkit.LinkKit(host_name=host, product_key=pk, device_name=dn, device_secret=secret)
    lk.enable_logger(int(os.environ.get("LK_LOG", "40")))
    lk.config_mqtt(port=port, secure="", keep_alive=60, auto_reconnect_max_sec=2)

    def on_connect(session_flag, rc, userdata):
        say("connected", rc=rc)
        connected.set()

    def on_ota_message_arrived(ota_notice_type, version, size, url, sign_method, sign, module, extra):
        pushed.update(version=version, size=size, url=url, sign_method=sign_method, sign=sign, module=module,
                      notice_type=ota_notice_type)
        say("push_received", version=version, size=size, sign_method=sign_method, module=module)
        got_push.set()

    lk.on_connect = on_connect
    lk.on_ota_message_arrived = on_ota_message_arrived
    return lk


def progress(lk, step, desc):
    body = json.dumps({"id": str(int(time.time() * 1000)), "params": {"step": str(step), "desc": desc}})
    rc, _ = lk.publish_topic("/ota/device/progress/%s/%s" % (pk, dn), body, 1)
    say("progress", percent=step, rc=rc)


lk = make_client()
lk.connect_async()
if not connected.wait(15):
    say("error", what="no CONNACK")
    sys.exit(2)
lk.ota_report_version(None, from_version)
say("version_reported", version=from_version)
if not got_push.wait(30):
    say("error", what="no upgrade push")
    sys.exit(3)

progress(lk, 1, "downloading")
target = tempfile.NamedTemporaryFile(delete=False)
target.close()
rc = lk.download_ota_firmware(pushed["url"], target.name, pushed["sign_method"], pushed["sign"])
size = os.path.getsize(target.name)
os.unlink(target.name)
say("downloaded", rc=str(rc), bytes=size)
if rc != linkkit.LinkKit.ErrorCode.SUCCESS or size != int(pushed["size"]):
    progress(lk, -3, "verification failed")
    sys.exit(4)
progress(lk, 50, "verified")
progress(lk, 100, "written")
time.sleep(0.3)

# Reboot into the new image: a new session reports the new version.
lk.disconnect()
time.sleep(0.5)
connected.clear()
lk = make_client()
lk.connect_async()
if not connected.wait(15):
    say("error", what="no CONNACK after reboot")
    sys.exit(5)
lk.ota_report_version(None, pushed["version"])
say("version_reported", version=pushed["version"])
time.sleep(0.5)
lk.disconnect()
sys.exit(0)
