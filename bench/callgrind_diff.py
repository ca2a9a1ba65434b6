#!/usr/bin/env python3
"""Self cost (Ir) per unit of two callgrind.out files side by side, by
source file and by function, sorted by the difference (B - A).
Usage: callgrind_diff.py A.cg DIV_A B.cg DIV_B [TOP]
(DIV: e.g. the run's connections; subtract an idle run's cost separately.)"""
import re
import sys
from collections import defaultdict

sys.path.insert(0, __import__("os").path.dirname(__file__))
from callgrind_self import parse, short_fn  # noqa: E402


def norm_file(f):
    f = re.sub(r"^.*/(server|proto|io|client|tools)/src/", r"\1/src/", f)
    f = re.sub(r"^/rustc/[0-9a-f]+/library/", "std:", f)
    f = re.sub(r"^.*/registry/src/[^/]+/", "crate:", f)
    return f


def norm_fn(f):
    f = short_fn(f)
    f = re.sub(r"\{\{closure\}\}", "{closure}", f)
    return f


def main():
    a, da, b, db = sys.argv[1], float(sys.argv[2]), sys.argv[3], float(sys.argv[4])
    top = int(sys.argv[5]) if len(sys.argv) > 5 else 30
    ta, fa, ga = parse(a)
    tb, fb, gb = parse(b)
    print(f"# A {a}: {ta/da:,.0f} Ir each; B {b}: {tb/db:,.0f} Ir each; B - A {tb/db - ta/da:+,.0f}")
    for title, xa, xb, norm in (("source file", fa, fb, norm_file),
                                ("function (self, inlined code in its caller)",
                                 {k[0]: v for k, v in ga.items()}, {k[0]: v for k, v in gb.items()}, norm_fn)):
        sa, sb = defaultdict(float), defaultdict(float)
        for k, v in xa.items():
            sa[norm(k)] += v / da
        for k, v in xb.items():
            sb[norm(k)] += v / db
        keys = set(sa) | set(sb)
        rows = sorted(keys, key=lambda k: -abs(sb[k] - sa[k]))[:top]
        print(f"\n## by {title}: A, B, B - A (Ir each)")
        for k in rows:
            print(f"{sa[k]:10,.0f} {sb[k]:10,.0f} {sb[k]-sa[k]:+10,.0f}  {k[:170]}")


if __name__ == "__main__":
    main()
