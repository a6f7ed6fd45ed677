# Two threads hashing under a lock; prints results sorted. Output depends only on N
# (argv[1]). Used by migd/tests/workloads.rs and tests/tests/workloads_across.rs.
import sys, threading, hashlib
N = int(sys.argv[1])
lock = threading.Lock()
results = {}
def work(name, n):
    h = hashlib.sha256(name.encode())
    for i in range(n):
        h.update(str(i).encode())
        if i % 20000 == 0:
            with lock:
                results[(name, i)] = h.hexdigest()[:16]
ts = [threading.Thread(target=work, args=(nm, N)) for nm in ("a", "b")]
for t in ts: t.start()
for t in ts: t.join()
for k in sorted(results): print(k[0], k[1], results[k])
