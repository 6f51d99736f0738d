"""Send every Segment call type through the official Python SDK
(`segment-analytics-python`, unchanged) to a Sluice server, with every batch
posted twice, as when a response is lost and the SDK sends the batch again
(same messageIds).

The SDK's consumer thread calls `post` as imported into
`segment.analytics.consumer` (`from segment.analytics.request import post`),
so that is the name wrapped here; the SDK itself is not modified.

Usage: python_resend.py HOST WRITE_KEY RUN_ID COUNT
Prints one JSON object per line for each event it sent, describing what the
log must hold; exits non-zero if the SDK reported any error or a batch was
not posted twice.
"""
import json
import sys
import threading

from segment_calls import make_client, send_all
import segment.analytics.consumer as consumer

host, write_key, run_id, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
errors = []

_post = consumer.post
_lock = threading.Lock()
posts = {"batches": 0, "requests": 0, "ids": []}


def post_twice(*args, **kwargs):
    """Post the batch, drop the answer (a lost response), post it again as a
    retry would, and hand the second answer to the SDK."""
    batch = kwargs["batch"]
    _post(*args, **dict(kwargs))
    retry = dict(kwargs)
    retry["retry_count"] = kwargs.get("retry_count", 0) + 1
    response = _post(*args, **retry)
    with _lock:
        posts["batches"] += 1
        posts["requests"] += 2
        posts["ids"].extend(m["messageId"] for m in batch)
    return response


consumer.post = post_twice

client = make_client(host, write_key, errors)

sent = send_all(client, f"py-resend-{run_id}", count)

client.flush()
client.join()
for s in sent:
    print(json.dumps(s))
posted = sorted(posts["ids"])
if posted != sorted(s["messageId"] for s in sent):
    errors.append(f"the wrapper posted {len(posted)} messages in {posts['batches']} batches, not each of the {len(sent)} sent once per batch")
if posts["batches"] < 2:
    errors.append(f"only {posts['batches']} batch(es): expected several")
print(f"{posts['batches']} batches, {posts['requests']} requests", file=sys.stderr)
if errors:
    print("SDK errors: " + "; ".join(errors), file=sys.stderr)
    sys.exit(1)
