#!/usr/bin/env python3
"""Start-up of coevo commands: N runs each, wall time (perf_counter around spawn..wait4) and
the max RSS of 5 more runs under /usr/bin/time -f %M. Usage: startup.py BINDIR N"""
import os, subprocess, sys, tempfile, time, statistics
bindir, n = sys.argv[1], int(sys.argv[2])
d = tempfile.mkdtemp()
lean = os.path.join(bindir, "coevo")
ml = os.path.join(bindir, "coevo-ml")
subprocess.run([lean, "fleet", "add", *[f"cam-{i:03}" for i in range(10)], "--registry", f"{d}/fleet.toml",
                "--credentials", f"{d}/c.toml", "--keys", f"{d}/keys", "--passwords", f"{d}/pw"],
               check=True, capture_output=True)
cmds = {
    "keys --help": ["keys", "--help"],
    "keys gen K --force": ["keys", "gen", f"{d}/k.pk8", "--force"],
    "fleet list (10 clients)": ["fleet", "list", "--registry", f"{d}/fleet.toml"],
    "status --help": ["status", "--help"],
    "bench --help (exec coevo-ml)": ["bench", "--help"],
}
def run(argv):
    t = time.perf_counter()
    p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, ru = os.wait4(p.pid, 0)
    dt = time.perf_counter() - t
    assert os.waitstatus_to_exitcode(status) == 0, argv
    return dt * 1000, ru.ru_maxrss / 1024
print(f"| command | binary | median ms | min ms | max ms | max RSS MB |")
print(f"|---|---|---:|---:|---:|---:|")
for name, args in cmds.items():
    for label, b in (("coevo (lean)", lean), ("coevo-ml (full, = old coevo)", ml)):
        if name.startswith("bench") and b == ml:
            continue
        run([b, *args])  # warm the page cache
        r = [run([b, *args]) for _ in range(n)]
        ms = [x[0] for x in r]
        # RSS from /usr/bin/time: wait4's ru_maxrss would count the forked Python.
        rss = []
        for _ in range(5):
            t = subprocess.run(["/usr/bin/time", "-f", "%M", b, *args], capture_output=True, text=True)
            rss.append(int(t.stderr.strip().splitlines()[-1]) / 1024)
        print(f"| `{name}` | {label} | {statistics.median(ms):.1f} | {min(ms):.1f} | {max(ms):.1f} | {max(rss):.1f} |")
