#!/usr/bin/env python3
"""What one unit of a phase costs by function, two builds side by side:
(A2 - A1) / UNITS against (B2 - B1) / UNITS, self cost (inlined code in
its caller). E.g. heartbeats: A1, A2 = base's conn and hb runs.
Usage: callgrind_phase_diff.py A1.cg A2.cg B1.cg B2.cg UNITS_A UNITS_B [TOP]"""
import sys
from collections import defaultdict

sys.path.insert(0, __import__("os").path.dirname(__file__))
from callgrind_self import parse  # noqa: E402
from callgrind_diff import norm_fn  # noqa: E402


def per_fn(path):
    t, _, g = parse(path)
    d = defaultdict(float)
    for (fn, _), v in g.items():
        d[norm_fn(fn)] += v
    return t, d


a1, a2, b1, b2 = (per_fn(p) for p in sys.argv[1:5])
ua, ub = float(sys.argv[5]), float(sys.argv[6])
top = int(sys.argv[7]) if len(sys.argv) > 7 else 30
print(f"# per unit: A {(a2[0]-a1[0])/ua:,.0f} Ir, B {(b2[0]-b1[0])/ub:,.0f} Ir")
keys = set(a1[1]) | set(a2[1]) | set(b1[1]) | set(b2[1])
da = {k: (a2[1].get(k, 0) - a1[1].get(k, 0)) / ua for k in keys}
db = {k: (b2[1].get(k, 0) - b1[1].get(k, 0)) / ub for k in keys}
print(f"{'A':>8} {'B':>8} {'B-A':>8}  function (self)")
for k in sorted(keys, key=lambda k: -max(abs(da[k]), abs(db[k])))[:top]:
    print(f"{da[k]:8,.0f} {db[k]:8,.0f} {db[k]-da[k]:+8,.0f}  {k[:150]}")
