#!/usr/bin/env python3
"""Write the hand-made seed inputs into fuzz/corpus/<target>/seed-*.

Idempotent: rewrites the same files. `seed-embedded-log-written*`
(log_recovery) are not made here: they are a segment the real embedded log
wrote (`sluice serve`, two requests, one partition), whole, as frames, and
torn. Inputs the fuzzer found and kept live beside the seeds under their
SHA-1 names; crash reproducers are `crash-*`.
Input layouts are described at the top of each fuzz_targets/<target>.rs.
"""
import gzip
import json
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))


def write(target, name, data):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, "seed-" + name), "wb") as f:
        f.write(data)


# --- tracking_api: mode byte + body -----------------------------------------
# bits 0-2: batch track identify page screen group alias import
# bits 3-4: auth 0 = known key (Basic), 1 = none (body writeKey), 2 = unknown, 3 = malformed
# bit 5: gzip by the harness; bit 6: declared gzip, sent as is; bit 7: tight limits
PATH = {"batch": 0, "track": 1, "identify": 2, "page": 3, "screen": 4, "group": 5, "alias": 6, "import": 7}


def mode(path, auth=0, gz=False, fake_gz=False, tight=False):
    return bytes([PATH[path] | auth << 3 | gz << 5 | fake_gz << 6 | tight << 7])


def j(v):
    return json.dumps(v, separators=(",", ":"))


track = {"type": "track", "userId": "u-1", "event": "Order Completed", "messageId": "m-1",
         "properties": {"revenue": 12.5, "plan": "pro", "tags": ["a", "b"]},
         "timestamp": "2024-05-01T12:00:00.000Z", "sentAt": "2024-05-01T12:00:05.000Z",
         "context": {"library": {"name": "analytics-python", "version": "2.3.0"}, "ip": "1.2.3.4"},
         "integrations": {"All": True, "Mixpanel": False}}
singles = {
    "track": track,
    "identify": {"userId": "u-1", "traits": {"email": "a@example.com", "name": "A"}},
    "page": {"anonymousId": "anon-1", "name": "Home", "properties": {"url": "https://example.com/"}},
    "screen": {"userId": 42, "name": "Settings"},
    "group": {"userId": "u-1", "groupId": "g-1", "traits": {"plan": "enterprise"}},
    "alias": {"userId": "u-2", "previousId": "anon-1"},
}
for path, ev in singles.items():
    write("tracking_api", f"{path}", mode(path) + j(ev).encode())
    write("tracking_api", f"{path}-tight", mode(path, tight=True) + j(ev).encode())
write("tracking_api", "track-bodykey", mode("track", auth=1) + j(dict(track, writeKey="wk_fuzz")).encode())
write("tracking_api", "track-gzip", mode("track", gz=True) + j(track).encode())
write("tracking_api", "track-realgzip-raw", mode("track", fake_gz=True) + gzip.compress(j(track).encode()))
write("tracking_api", "track-nokey-dropped", mode("track", auth=2, tight=True) + j(track).encode())
write("tracking_api", "track-type-mismatch", mode("track") + j(dict(track, type="identify")).encode())
write("tracking_api", "track-null-type", mode("track") + j(dict(track, type=None)).encode())
items = [dict(ev, type=t) for t, ev in singles.items()]
batch = {"batch": items, "context": {"app": {"name": "shop"}, "library": {"name": "x"}},
         "integrations": {"Segment.io": True}, "sentAt": "2024-05-01T12:00:05+02:00"}
write("tracking_api", "batch", mode("batch") + j(batch).encode())
write("tracking_api", "batch-tight", mode("batch", tight=True) + j(batch).encode())
write("tracking_api", "batch-gzip", mode("batch", gz=True) + j(batch).encode())
write("tracking_api", "import-bodykey", mode("import", auth=1) + j(dict(batch, writeKey="wk_fuzz")).encode())
write("tracking_api", "batch-empty", mode("batch") + b'{"batch":[]}')
write("tracking_api", "batch-not-array", mode("batch") + b'{"batch":{"type":"track"}}')
write("tracking_api", "batch-mixed-invalid", mode("batch") + j({"batch": [
    {"type": "track", "userId": "u"}, 1, "x", None, {"type": "nope", "userId": "u"},
    {"type": "alias", "userId": "u"}, {"type": "group", "userId": "u"},
    {"type": "identify", "userId": "u", "messageId": "m" * 101},
    {"type": "identify", "anonymousId": "", "userId": None},
    {"type": "identify", "userId": "ok", "messageId": "ok-1"}]}).encode())
# Timestamps: skew correction, offsets, extreme years, unparsable.
write("tracking_api", "skew", mode("batch") + j({"sentAt": "-260000-01-01T00:00:00", "batch": [
    {"type": "identify", "userId": "u", "timestamp": "+260000-12-31T23:59:59"},
    {"type": "identify", "userId": "u", "timestamp": "2024-01-01 10:00:00.123456789", "sentAt": "2024-01-01T10:00:01Z"},
    {"type": "identify", "userId": "u", "timestamp": "yesterday"},
    {"type": "identify", "userId": "u", "timestamp": 12345}]}).encode())
# Values later stages cannot read (must be refused, never stored).
write("tracking_api", "hostile-values", mode("batch") + (
    b'{"batch":[{"type":"track","userId":"u","event":"E","properties":{"n":1e400}},'
    b'{"type":"track","userId":"u","event":"E","properties":{"s":"\\ud800"}},'
    b'{"type":"track","userId":"u","event":"E","properties":{"\\udfff":1}},'
    b'{"type":"track","userId":"u","event":"E","properties":{"x":' + b"[" * 70 + b"1" + b"]" * 70 + b"}},"
    b'{"type":"identify","userId":"u","messageId":"good"}]}'))
write("tracking_api", "context-bad-number", mode("batch") + b'{"context":{"n":-1e999},"batch":[{"type":"identify","userId":"u"}]}')
write("tracking_api", "escaped-keys", mode("track") + (
    b'{"typ\\u0065":"track","userId":"u","ev\\u0065nt":"E","write\\u004bey":"wk_fuzz","messageId":"\\ud83d\\ude00",'
    b'"context":"not an object","k":1,"k":2}'))
write("tracking_api", "duplicate-keys", mode("track") + b'{"type":"track","userId":"u","event":"first","event":"last","messageId":"a","messageId":"b"}')
wide = {"type": "identify", "userId": "u"}
wide.update({f"k{i}": i for i in range(40)})
write("tracking_api", "wide", mode("identify") + j(wide).encode())
write("tracking_api", "context-merge-tight", mode("batch", tight=True) + j({
    "context": {"pad": "c" * 600, "a": 1}, "integrations": {"X": {"k": "v"}},
    "batch": [{"type": "identify", "userId": "u", "context": {"a": 2}},
              {"type": "identify", "userId": "u", "context": [1, 2]},
              {"type": "identify", "userId": "u", "integrations": None}]}).encode())
write("tracking_api", "too-large-tight", mode("track", tight=True) + j(dict(track, properties={"pad": "p" * 1100})).encode())
write("tracking_api", "not-json", mode("track") + b'{"type":"track",')
write("tracking_api", "not-utf8", mode("track") + b'{"type":"\xff\xfe"}')
write("tracking_api", "malformed-auth", mode("track", auth=3) + j(track).encode())

# --- filter: condition, NUL, event JSON --------------------------------------
event = j(track).encode()
conditions = [
    'type = "track"', 'type = "identify"', 'type = "track" and event = "Order Completed"',
    'type = "page" or properties.total = 20.0', 'not (type = "page")', 'properties.total exists',
    'properties.coupon = null', 'properties.missing != "x"', 'context.library.name contains "python"',
    'properties.tags contains "b"', 'event = "say \\"hi\\"" or true_field != false',
    'type = "track" and (event = "x" or properties.total = 20)', 'type = "track" and properties.plan != "free"',
    'properties.revenue = 12.5', 'properties.revenue != -1e3', 'integrations.Mixpanel = false',
    'not not not type exists', '((a exists))', 'a exists or b exists and c exists or not d exists',
    'properties.tags contains 1', '$x.y_z-w = "v"', 'a.b..c exists', 'type = "a" event = "b"',
    '(type = "a"', 'type = "a', 'a = 1e999', 'a contains', 'not ' * 64 + 'a exists',
    '(' * 64 + 'a exists' + ')' * 64, 'a = 1.2.3', '\u00e9t\u00e9 = "\u00e0"',
]
for i, c in enumerate(conditions):
    write("filter", f"{i:02}", c.encode() + b"\0" + event)
write("filter", "nested-event", b'a.a.a = 1\0' + b'{"a":' * 100 + b"1" + b"}" * 100)
write("filter", "array-event", b'tags contains "x"\0{"tags":["x",1,null,{"a":[]}]}')

# --- config: env lines, NUL, TOML ---------------------------------------------
with open(os.path.join(HERE, "..", "config", "sluice.toml"), "rb") as f:
    sample = f.read()
write("config", "sample", sample)
write("config", "empty", b"")
write("config", "sample-env", b"SLUICE_SERVER__LISTEN=0.0.0.0:8088\nSLUICE_LOG__PARTITIONS=16\nSLUICE_INGEST__UNKNOWN_WRITE_KEY=accept_and_drop\n\0" + sample)
write("config", "env-bad", b"SLUICE_SERVER=1\nSLUICE___X=1\nSLUICE_A____B=2\nSLUICE_LOG__RETENTION=[1,2]\n\0")
full = b'''[server]
listen = "0.0.0.0:8088"
data_dir = "/var/lib/sluice"
max_connections = 1000
header_read_timeout = "10s"
body_read_timeout = "30s"

[admin]
listen = ""
token = "0123456789abcdef"

[ingest]
unknown_write_key = "accept_and_drop"
max_request_bytes = 512000
max_event_bytes = 32768
max_batch_events = 2500

[log]
partitions = 4
segment_bytes = 1048576
retention = "1d"
output_retention = "2d"
fsync = true

[dedup]
window = "1d"

[deliver]
max_in_flight = 8
archive_url = "s3://bucket/prefix"

[[sources]]
id = "web"
write_key = "wk_web"
rate_limit = 100
rate_burst = 200

[[destinations]]
id = "hook"
name = "Hook"
url = "https://example.com/hook"
secret = "s"
max_in_flight = 4
rate_limit = 10
initial_backoff = "1s"
max_backoff = "1m"
retry_window = "1h"
request_timeout = "5s"

[[destinations.filters]]
if = 'type = "track" and properties.plan != "free"'
action = "sample"
rate = 0.1

[[destinations.filters]]
action = "block_fields"
fields = ["properties.email", "context.ip"]

[[destinations.filters]]
if = 'event exists'
action = "allow_fields"
fields = ["properties.plan"]

[[destinations.filters]]
if = 'not (type = "page")'
action = "drop"

[[connections]]
source = "web"
destinations = ["hook"]
'''
write("config", "full", full)
write("config", "kafka", b'''[log]
backend = "kafka"
[log.kafka]
replication_factor = 3
produce_timeout = "5s"
settings = { "socket.keepalive.enable" = "true" }
[log.kafka.primary]
bootstrap_servers = "a:9092,b:9092"
[log.kafka.secondary]
bootstrap_servers = "c:9092"
[ingest]
spool_after = "3s"
''')
write("config", "jobdb-url", b'[deliver]\njobdb_url = "postgres://u:p@db:5432/sluice"\n[director]\nname = "d_1"\nrpc_listen = "127.0.0.1:8090"\n')
write("config", "bad-filter", b'[[destinations]]\nid = "d"\nurl = "http://x"\n[[destinations.filters]]\nif = "type = "\naction = "drop"\n')
write("config", "bad-values", b'[server]\nlisten = "nowhere"\n[log]\nretention = "seven days"\npartitions = 0\n')
write("config", "archive-file", b'[deliver]\narchive_url = "file:///tmp/archive"\n')

# --- log_recovery: mode byte + segment bytes (see the target) ------------------
def crc32c(data):
    crc = 0xFFFFFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def header(base):
    return b"SLUICEL1" + struct.pack("<Q", base)


def frame(offset, ts, key, value):
    body = struct.pack("<QqI", offset, ts, len(key)) + key + value
    return struct.pack("<II", len(body), crc32c(body)) + body


def segment(base, records):
    out = header(base)
    for i, (k, v) in enumerate(records):
        out += frame(base + i, 1714564800000 + i, k, v)
    return out


recs = [(f"web/m-{i}".encode(), j(dict(track, messageId=f"m-{i}")).encode()) for i in range(5)]
seg = segment(0, recs)
write("log_recovery", "raw-valid", b"\0" + seg)
write("log_recovery", "raw-empty", b"\0")
write("log_recovery", "raw-header-only", b"\0" + header(0))
write("log_recovery", "raw-short-header", b"\0" + header(0)[:10])
write("log_recovery", "raw-bad-header-records", b"\0" + header(7) + seg[16:])
write("log_recovery", "raw-torn-last", b"\0" + seg[:-5])
write("log_recovery", "raw-flipped", b"\0" + seg[:40] + bytes([seg[40] ^ 1]) + seg[41:])
write("log_recovery", "raw-garbage-after", b"\0" + seg + b"\x19\0\0\0garbage")
write("log_recovery", "raw-zero-len-frame", b"\0" + header(0) + b"\0" * 8)
write("log_recovery", "raw-huge-len", b"\0" + header(0) + b"\xff\xff\xff\xff\0\0\0\0")
write("log_recovery", "raw-offset-gap", b"\0" + header(0) + frame(0, 1, b"k", b"v") + frame(2, 1, b"k", b"v"))
write("log_recovery", "raw-key-too-long", b"\0" + header(0) + frame(0, 1, b"k", b"v")[:-0] + (lambda b: struct.pack("<II", len(b), crc32c(b)) + b)(struct.pack("<QqI", 1, 0, 99) + b"xy"))
write("log_recovery", "tail-frames", b"\1" + seg[16:])
write("log_recovery", "tail-torn", b"\1" + seg[16:-1])
write("log_recovery", "prefix-garbage", b"\2\3\5" + b"\x30\0\0\0\0\0\0\0" + b"x" * 20)
write("log_recovery", "prefix-plausible-torn", b"\2\7\0" + struct.pack("<I", 100) + b"\1\2\3\4" + b"y" * 50)
write("log_recovery", "prefix-clean", b"\2\4\1")
write("log_recovery", "two-ok", b"\3\3\5\2\0")
write("log_recovery", "two-sealed-short", b"\3\10\3\1\0")
write("log_recovery", "two-sealed-torn", b"\3\2\5\1\4" + b"\x01\x02\x03\x04")
write("log_recovery", "two-active-torn", b"\3\2\5\3\0" + b"\x25\0\0\0abc")

# --- rpc_decode: signature header, NUL, body (no NUL: all body) ---------------
def job(i, **kw):
    v = {"message_id": f"m-{i}", "source": "web", "destination": "hook", "generation": 0,
         "endpoint": "https://example.com/hook", "payload": j(dict(track, messageId=f"m-{i}")),
         "created_at": 1714564800000 + i, "expires_at": 1714651200000, "received_at": 1714564800000}
    v.update(kw)
    return v


req = {"oldest_event_ms": 1714564800000, "jobs": [job(i) for i in range(3)]}
sig = b"t=1714564800,v1=" + b"0" * 64
write("rpc_decode", "insert", j(req))
write("rpc_decode", "insert-signed", sig + b"\0" + j(req).encode())
write("rpc_decode", "insert-empty", j({"oldest_event_ms": 0, "jobs": []}))
write("rpc_decode", "insert-extremes", j({"oldest_event_ms": -9223372036854775808, "jobs": [
    job(0, generation=9223372036854775807, created_at=-1, expires_at=0, received_at=9223372036854775807),
    job(1, payload="\u0000\u2028\ud83d\ude00 \\ \"", message_id="", destination="d" * 70)]}))
write("rpc_decode", "insert-escapes", b'{"oldest_event_ms":1,"jobs":[{"message_id":"\\u00e9","source":"s","destination":"d","generation":1,'
      b'"endpoint":"e","payload":"\\ud83d\\ude00\\n","created_at":1,"expires_at":2,"received_at":3,"extra":[1,{"x":null}]}]}')
write("rpc_decode", "insert-lone-surrogate", b'{"oldest_event_ms":1,"jobs":[{"message_id":"\\ud800","source":"s","destination":"d","generation":1,'
      b'"endpoint":"e","payload":"p","created_at":1,"expires_at":2,"received_at":3}]}')
write("rpc_decode", "insert-missing-field", b'{"oldest_event_ms":1,"jobs":[{"message_id":"m"}]}')
write("rpc_decode", "insert-float", b'{"oldest_event_ms":1.5,"jobs":[]}')
write("rpc_decode", "insert-big", j({"oldest_event_ms": 5, "jobs": [job(i, payload="x" * (i * 300)) for i in range(12)]}))
write("rpc_decode", "sig-malformed", b"t=,v1=zz\0{}")
write("rpc_decode", "sig-long-t", b"t=999999999999,v1=" + b"f" * 64 + b"\0" + j(req).encode())
write("rpc_decode", "reply", b'{"code":"unknown_destination","message":"m","destinations":["a"]}')
