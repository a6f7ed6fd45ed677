# count.py OUT N PAUSE: writes N lines to OUT (each a function of its index only),
# sleeping PAUSE seconds after each, then exits with status 4. Used by the migration
# tests and the demo.
import sys, time
n, pause = int(sys.argv[2]), float(sys.argv[3])
with open(sys.argv[1], "w") as f:
    for i in range(n):
        f.write("%d %d\n" % (i, pow(7, i, 1000003)))
        f.flush()
        time.sleep(pause)
sys.exit(4)
