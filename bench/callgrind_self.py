#!/usr/bin/env python3
"""Self cost (Ir) of a callgrind.out file by source file and by function,
inlined code counted in the file it came from (callgrind's fi=/fe=).
Usage: callgrind_self.py FILE[,PART...] [DIVISOR] [TOP]  -- costs divided by DIVISOR
(e.g. the connections of the run), top TOP rows of each table."""
import re
import sys
from collections import defaultdict


def parse(path):
    """PATH, or several comma-separated parts (--dump-every-bb): summed."""
    if "," in path:
        total, by_file, by_fn = 0, defaultdict(int), defaultdict(int)
        for part in path.split(","):
            t, f, g = parse_one(part)
            total += t
            for k, v in f.items():
                by_file[k] += v
            for k, v in g.items():
                by_fn[k] += v
        return total, by_file, by_fn
    return parse_one(path)


def parse_one(path):
    names = {"fl": {}, "fn": {}}
    by_file = defaultdict(int)
    by_fn = defaultdict(int)
    total = 0
    fl = fi = fn = "?"
    skip_next = False

    def name(kind, rest):
        m = re.match(r"\((\d+)\)(?: (.*))?", rest)
        if not m:
            return rest
        table = names["fn" if kind == "fn" else "fl"]
        if m.group(2) is not None:
            table[m.group(1)] = m.group(2)
        return table.get(m.group(1), "?")

    with open(path, errors="replace") as f:
        for line in f:
            line = line.rstrip("\n")
            if not line:
                continue
            c = line[0]
            if c.isdigit() or c in "+-*":
                if skip_next:
                    skip_next = False
                    continue
                parts = line.split()
                if len(parts) < 2:
                    continue
                ir = int(parts[1])
                total += ir
                by_file[fi] += ir
                by_fn[(fn, fl)] += ir
                continue
            key, _, rest = line.partition("=")
            if key == "fl":
                fl = fi = name("fl", rest)
            elif key in ("fi", "fe"):
                fi = name("fl", rest)
            elif key == "fn":
                fn = name("fn", rest)
                fi = fl
            elif key in ("cfi", "cfl"):
                name("fl", rest)
            elif key == "cfn":
                name("fn", rest)
            elif key == "calls":
                skip_next = True
    return total, by_file, by_fn


def short_fn(s):
    s = re.sub(r"::h[0-9a-f]{16}$", "", s)
    return s if len(s) < 140 else s[:137] + "..."


def main():
    path = sys.argv[1]
    div = float(sys.argv[2]) if len(sys.argv) > 2 else 1.0
    top = int(sys.argv[3]) if len(sys.argv) > 3 else 40
    total, by_file, by_fn = parse(path)
    print(f"# {path}: total {total:,} Ir, divisor {div:g}: {total/div:,.0f} Ir each")
    print("\n## self cost by source file (inlined code in its own file)")
    for f, ir in sorted(by_file.items(), key=lambda x: -x[1])[:top]:
        print(f"{ir/div:12,.0f} {100*ir/total:6.2f}%  {f}")
    print("\n## self cost by function (inlined code in its caller)")
    for (fn, fl), ir in sorted(by_fn.items(), key=lambda x: -x[1])[:top]:
        print(f"{ir/div:12,.0f} {100*ir/total:6.2f}%  {short_fn(fn)}")


if __name__ == "__main__":
    main()
