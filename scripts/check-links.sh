#!/usr/bin/env bash
# Every relative link in the project's documentation must resolve to a file
# or directory in this tree: README.md, CONTRIBUTING.md, SECURITY.md,
# docs/**/*.md, results/README.md, kernel-tuning/README.md, fuzz/README.md. Exits 1 naming each broken link
# (file:line: target), 0 when all resolve.
#
# Checked: inline Markdown links and images, [text](target) and
# ![alt](target), and reference definitions, [name]: target.
# Not checked: absolute URLs (http:, https:, mailto:), links inside code
# blocks and code spans, and anchors: the part after '#' is dropped, so
# README.md#quick-start passes when README.md exists, whatever its headings.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python3 - "$@" <<'PY'
import glob, os, re, sys

files = ["README.md", "CONTRIBUTING.md", "SECURITY.md", "results/README.md",
         "kernel-tuning/README.md", "fuzz/README.md"]
files += sorted(glob.glob("docs/**/*.md", recursive=True))
inline = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
refdef = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)")
broken = checked = 0
for f in files:
    if not os.path.exists(f):
        if f in ("README.md", "CONTRIBUTING.md", "SECURITY.md", "results/README.md"):
            print(f"{f}: missing")
            broken += 1
        continue
    fence = False
    for n, line in enumerate(open(f, encoding="utf-8"), 1):
        if line.lstrip().startswith(("```", "~~~")):
            fence = not fence
            continue
        if fence:
            continue
        text = re.sub(r"`[^`]*`", "", line)
        targets = inline.findall(text)
        m = refdef.match(text)
        if m:
            targets.append(m.group(1))
        for t in targets:
            if re.match(r"^[a-z][a-z0-9+.-]*:", t, re.I) or t.startswith("#"):
                continue
            path = t.split("#", 1)[0].split("?", 1)[0]
            checked += 1
            full = os.path.normpath(os.path.join(os.path.dirname(f), path))
            if not os.path.exists(full):
                print(f"{f}:{n}: broken link: {t}")
                broken += 1
if broken:
    print(f"check-links: {broken} broken link(s) of {checked} checked", file=sys.stderr)
    sys.exit(1)
print(f"check-links: {checked} relative links resolve in {len(files)} files (anchors not checked)")
PY
