#!/usr/bin/env python3
"""Writes results/README.md: one line per committed run (directory, what it
shows, the command that made it, where the docs cite it), then the runs the
docs cite that are not in results/. Run it after adding a run or a citation:
    python3 scripts/results-index.py"""
import glob, os, re

os.chdir(os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
KIND = {
    'core': 'server core: CPU per connection and per heartbeat, conn/s, RSS (bench/core.sh)',
    'syscalls': 'system calls per heartbeat, by kind (bench/syscalls.sh)',
    'drain': 'the paced drain: first to last Close 1001 against devices / --drain-rate (bench/drain.sh)',
    'reconnect-storm': 'the whole fleet resets and reconnects: time back, connect latency, probe RTT (bench/reconnect-storm.sh)',
    'expiry': 'an expiry wave of silent devices: lag, deletion rate, connects during it (bench/expiry.sh)',
    'profile': 'perf profile of the server during a heartbeat hold (bench/profile.sh)',
    'autobahn': 'Autobahn RFC 6455 conformance (conformance/autobahn.sh)',
    'exhaustion': 'out of descriptors: accept backoff, the server keeps serving (bench/exhaustion.sh)',
    'faults': 'killed clients, SIGTERM under load, idle handshakes (bench/faults.sh)',
    'interop': 'real clients: Python websockets, Node ws, websocat (conformance/interop.sh)',
    'fuzz': 'cargo-fuzz runs of the parsers (fuzz/run.sh)',
    '10000': 'the quick start: 10,000 devices, 10% silent (bench/demo.sh)',
    '15000': 'the load client against a 2-core server, 15,000 devices (bench/client-15k.sh)',
    'scale-200000': 'a 200,000-device exploration run of the client',
    'client-ab': 'client and server of an older build against this one (bench/client-ab.sh)',
    'client-pair': 'two clients against the same server binary, each its own CPU per connection (bench/client-pair.sh)',
    'client-cost': "the client's user instructions (callgrind) and system calls (strace) per connection, by client build (bench/client-cost.sh)",
    'devices': 'device takeovers and lookups at scale (bench/devices.sh)',
    'idle': 'an idle server: RSS and CPU under glommio and on plain threads (bench/idle.sh)',
    'uring-cancels': 'no kernel cancel path in an io_uring profile (bench/uring-cancels.sh)',
    'scrape': 'what an admin /metrics scrape costs the shards (bench/scrape.sh)',
    'front': 'nginx and HAProxy fronts, ws and wss, against direct (bench/front.sh)',
    'tls': 'TLS in the shard: memory per idle wss device, handshake and heartbeat CPU (bench/tls.sh)',
    'publisher': 'the NATS publisher\'s CPU by phase (bench/publisher.sh)',
    'fleet-of-servers': 'NATS off/on/down, two servers on one broker, pushes (bench/fleet-of-servers.sh)',
    'budget-profile': 'callgrind and dhat: where the CPU and bytes per connection went (bench/profile-budget.sh)',
    'udp': 'UDP heartbeats against pings and the bare receiver (bench/udp-heartbeat.sh)',
    'udp-expiry': 'expiry lag and the --go-silent burst with UDP heartbeats (bench/udp-expiry.sh)',
    'udp-idle': 'the UDP server\'s ticks and stats at rest (bench/udp-idle.sh)',
    'upgrade': 'hot upgrade under load: every connection handed to a new process (bench/upgrade.sh)',
    'upgrade-control': 'the same run as bench/upgrade.sh without the upgrade (UPGRADE=0)',
    'upgrade-procs4': 'hot upgrade under --procs 4: the supervisor hands each worker to a new process in turn (bench/upgrade.sh PROCS=4)',
    'upgrade-procs4-control': 'the same run as bench/upgrade.sh PROCS=4 without the upgrade (UPGRADE=0)',
    'loadgen-vs-client': 'bench/core.sh measured by loadgen and by the client in one sitting: the change of measuring tool',
    '1m': 'one million devices on this machine (bench/one-million.sh)',
    '1m-udp': 'one million devices with UDP heartbeats (UDP=1 bench/one-million.sh)',
}
DOCS = ['README.md', 'CONTRIBUTING.md', 'SECURITY.md', 'kernel-tuning/README.md', 'fuzz/README.md']
DOCS += sorted(glob.glob('docs/**/*.md', recursive=True))
cites = {}
for f in DOCS:
    if not os.path.exists(f):
        continue
    heading = ''
    for line in open(f, encoding='utf-8'):
        if line.startswith('#') and not line.startswith('#!'):
            heading = line.lstrip('#').strip()
        for m in re.finditer(r'results/((?:1m-)?\d{8}T\d{6}Z[\w.-]*|1m-\d{8}T\d{6}Z[\w-]*)', line):
            name = m.group(1).rstrip('.')
            where = f'{f} ({heading})' if heading else f
            cites.setdefault(name, [])
            if where not in cites[name]:
                cites[name].append(where)

def kind(name):
    if name.startswith('1m-'):
        return '1m-udp' if name.endswith('-udp') else '1m'
    return name.split('Z-', 1)[1] if 'Z-' in name else ''

def command(d):
    p = os.path.join('results', d, 'command.txt')
    if os.path.exists(p):
        c = open(p, encoding='utf-8', errors='replace').read().strip().splitlines()
        c = ' '.join(x.strip() for x in c)[:160]
        return f'`{c}`' if c else ''
    return ''

def note(d):
    for n in ('NOTE.md', 'REPORT.md', 'summary.md'):
        if os.path.exists(os.path.join('results', d, n)):
            return n
    return ''

runs = sorted(x for x in os.listdir('results') if os.path.isdir(os.path.join('results', x)))
out = ['# results/: which run backs which claim', '',
       'Every committed benchmark run, one line each: the directory, what kind of',
       'run it is, the command that made it (its `command.txt`), and where the',
       'documentation cites it (file and section). Written by',
       '`python3 scripts/results-index.py`; run it again after adding a run or a',
       'citation. The figures themselves, with their commands, are in',
       '[docs/benchmarks.md](../docs/benchmarks.md).', '',
       'Each directory has `command.txt` and `git.txt` (the commit, `-dirty` when',
       'the tree had changes); most have a `summary.md`, some a `NOTE.md` that',
       'explains a defect or a comparison. Runs cited nowhere are kept as the',
       'history of the work (explorations, reruns, superseded figures).', '',
       '| run | what it shows | command | cited in |', '|---|---|---|---|']
for d in runs:
    what = KIND.get(kind(d), kind(d) or 'run')
    n = note(d)
    if n and n != 'summary.md':
        what += f'; see its {n}'
    where = '; '.join(cites.get(d, [])) or 'not cited'
    out.append(f'| [{d}/]({d}/) | {what} | {command(d)} | {where} |')
missing = sorted(c for c in cites if c not in runs)
out += ['', '## Cited but missing', '']
if missing:
    out += [f'- `results/{c}/`, cited in {"; ".join(cites[c])}' for c in missing]
else:
    out.append('None: every `results/...` run the documentation cites is here.')
out += ['', 'Claims whose run was never kept:', '',
        '- the 2026-11-24 measurements once cited as DESIGN.md (stock glommio spending',
        '  28-46% of its CPU in `io_poll_find`, quoted in `bench/uring-cancels.sh`; 9.6 KiB',
        '  of kernel slab per idle loopback pair and 0.5-0.7 KB against ~160 B of',
        '  kernel memory per idle io_uring against epoll connection, in',
        '  [kernel-tuning/README.md](../kernel-tuning/README.md) and',
        '  [docs/benchmarks.md](../docs/benchmarks.md)): the notes are not in this',
        '  repository and no run here backs those figures.']
open('results/README.md', 'w').write('\n'.join(out) + '\n')
print(f'results/README.md: {len(runs)} runs, {sum(1 for d in runs if d in cites)} cited, {len(missing)} cited but missing')
