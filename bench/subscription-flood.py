"""One device subscribes to N distinct filters per round (100 per SUBSCRIBE), three rounds
with a reconnection in between; prints the gateway's RSS after each round and after the
disconnection (docs/BENCHMARKS.md, "Per-device subscription limit").

Usage: tests/interop/.venv/bin/python bench/subscription-flood.py BINARY CAP N
  BINARY  a fleetgate binary; CAP  --mqtt-max-subscriptions-per-device; N  filters per round.
Runs the gateway on ephemeral ports with a data dir under /tmp/fleetgate-subscription-flood (removed first).
"""
import json, os, re, subprocess, sys, time, urllib.request
import paho.mqtt.client as mqtt

BIN, CAP, N = sys.argv[1], sys.argv[2], int(sys.argv[3])
TOKEN = "measure-token-0123456789"
data = f"/tmp/fleetgate-subscription-flood/data-{CAP}"
subprocess.run(["rm", "-rf", data])
os.makedirs("/tmp/fleetgate-subscription-flood", exist_ok=True)
p = subprocess.Popen([BIN, "serve", "--mqtt-listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0",
                      "--data-dir", data, "--api-token", TOKEN,
                      "--mqtt-max-subscriptions-per-device", CAP, "--log-json"],
                     stdout=open(f"/tmp/fleetgate-subscription-flood/log-{CAP}", "w"), stderr=subprocess.STDOUT, text=True,
                     env={"RUST_LOG": "warn,fleetgate=info", "PATH": "/usr/bin:/bin"})
mqtt_addr = http_addr = None
while mqtt_addr is None:
    time.sleep(0.2)
    for line in open(f"/tmp/fleetgate-subscription-flood/log-{CAP}"):
        if "fleetgate listening" in line:
            j = json.loads(line)
            f = j.get("fields", j)
            mqtt_addr, http_addr = f["mqtt"], f["http"]
def api(method, path, body=None):
    req = urllib.request.Request(f"http://{http_addr}{path}", method=method,
                                 data=json.dumps(body).encode() if body else None,
                                 headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
    return json.loads(urllib.request.urlopen(req).read() or b"{}")
pk = api("POST", "/api/v1/products", {"name": "probe"})["product_key"]
secret = api("POST", f"/api/v1/products/{pk}/devices", {"device_name": "attacker"})["device_secret"]
out = subprocess.run([BIN, "device-credentials", "--product-key", pk, "--device-name", "attacker",
                      "--device-secret", secret, "--shell"], capture_output=True, text=True).stdout
cred = dict(re.findall(r"(\w+)='([^']*)'", out))
def rss():
    for l in open(f"/proc/{p.pid}/status"):
        if l.startswith("VmRSS"):
            return int(l.split()[1]) / 1024
host, port = mqtt_addr.rsplit(":", 1)
print(f"cap={CAP} start RSS {rss():.1f} MiB", flush=True)
for rnd in range(3):
    acks = []
    c = mqtt.Client(client_id=cred["CLIENT_ID"], clean_session=True)
    c.username_pw_set(cred["USERNAME"], cred["PASSWORD"])
    c.on_subscribe = lambda cl, ud, mid, qos: acks.append(qos)
    c.connect(host, int(port), keepalive=120)
    c.loop_start()
    time.sleep(0.3)
    for b in range(N // 100):
        c.subscribe([(f"/{pk}/attacker/user/r{rnd}/f{b*100+i}", 0) for i in range(100)])
        while len(acks) < b - 20:
            time.sleep(0.01)
    deadline = time.time() + 300
    while len(acks) < N // 100 and time.time() < deadline:
        time.sleep(0.05)
    granted = sum(1 for a in acks for q in a if q != 128)
    time.sleep(1)
    up = rss()
    c.disconnect(); c.loop_stop()
    time.sleep(2)
    print(f"cap={CAP} round {rnd+1}: {granted} of {N} granted, RSS {up:.1f} MiB connected, {rss():.1f} MiB after disconnect", flush=True)
m = urllib.request.urlopen(f"http://{http_addr}/metrics").read().decode()
print([l for l in m.splitlines() if "subscriptions_refused_total " in l])
p.terminate(); p.wait()
