#!/usr/bin/env python3
"""Heap bytes live at the global peak (dhat's t-gmax) by allocation site.
Usage: dhat_sites.py DHAT.json [DIVISOR] [TOP]
A site is named by its first frame in this project's code (c1m::, or a
frame of a crate that holds our state, e.g. slab/hashbrown), with the
allocating frame beside it. Bytes are divided by DIVISOR (connections)."""
import json
import re
import sys
from collections import defaultdict

SKIP = re.compile(r"(malloc|calloc|realloc|alloc::alloc|__rust_|alloc::raw_vec|RawVec|"
                  r"raw_vec|core::ptr|alloc::vec::Vec<T,A>::(reserve|push|extend|with_capacity)|"
                  r"finish_grow|grow_one|grow_amortized|do_reserve_and_handle|exchange_malloc|"
                  r"hashbrown::raw|alloc::boxed|<alloc::|Box<T>::new|box_new|\?\?\?)")


def frame_name(f):
    # "0x1234: name (file:line)" or "[root]"
    m = re.match(r"0x[0-9A-Fa-f]+: (.*?)(?: \((?:in )?[^()]*\))?$", f)
    s = m.group(1) if m else f
    return re.sub(r"::h[0-9a-f]{16}", "", s)


def main():
    path = sys.argv[1]
    div = float(sys.argv[2]) if len(sys.argv) > 2 else 1.0
    top = int(sys.argv[3]) if len(sys.argv) > 3 else 25
    d = json.load(open(path))
    ftbl = d["ftbl"]
    sites = defaultdict(lambda: [0, 0])
    total = total_blocks = 0
    for pp in d["pps"]:
        gb, gbk = pp.get("gb", 0), pp.get("gbk", 0)
        if not gb:
            continue
        names = [frame_name(ftbl[i]) for i in pp["fs"]]
        alloc = next((n for n in names if not SKIP.search(n)), names[0] if names else "?")
        ours = next((n for n in names if "c1m::" in n), alloc)
        key = (ours[:120], alloc[:90])
        sites[key][0] += gb
        sites[key][1] += gbk
        total += gb
        total_blocks += gbk
    print(f"# {path}: heap live at t-gmax {total:,} B in {total_blocks:,} blocks; "
          f"/{div:g} = {total/div:,.1f} B each")
    print(f"{'B each':>10} {'bytes':>12} {'blocks':>8}  site (first c1m frame) <- allocating frame")
    for (ours, alloc), (b, k) in sorted(sites.items(), key=lambda x: -x[1][0])[:top]:
        print(f"{b/div:10.1f} {b:12,} {k:8,}  {ours} <- {alloc}")


if __name__ == "__main__":
    main()
