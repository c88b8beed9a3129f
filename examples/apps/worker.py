"""A stand-in worker for the examples: takes jobs from a queue, one a second."""
import sys
import time

queue = sys.argv[sys.argv.index("--queue") + 1] if "--queue" in sys.argv else "default"
print(f"worker on queue {queue!r}", flush=True)
n = 0
while True:
    n += 1
    print(f"job {n} done", flush=True)
    time.sleep(1)
