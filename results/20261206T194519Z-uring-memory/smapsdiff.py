import sys,re
def load(p):
    m={}; cur=None
    for line in open(p):
        if re.match(r'^[0-9a-f]+-[0-9a-f]+ ',line):
            parts=line.split()
            start,end=parts[0].split('-')
            name=parts[5] if len(parts)>5 else '[anon]'
            cur=(start,name,parts[1]); m[cur]={'size':(int(end,16)-int(start,16))//1024,'rss':0,'anon':0}
        elif cur and line.startswith('Rss:'): m[cur]['rss']=int(line.split()[1])
        elif cur and line.startswith('Anonymous:'): m[cur]['anon']=int(line.split()[1])
    return m
a=load(sys.argv[1]); b=load(sys.argv[2]); n=int(sys.argv[3])
keys=set(a)|set(b); tot=0; rows=[]
for k in keys:
    ra=a.get(k,{}).get('rss',0); rb=b.get(k,{}).get('rss',0)
    if ra!=rb: rows.append((rb-ra,k,a.get(k,{}).get('size'),b.get(k,{}).get('size'))); tot+=rb-ra
rows.sort(key=lambda r:-abs(r[0]))
print(f"total RSS delta {tot} KiB = {tot*1024/n:.1f} B/conn over {n}")
for d,k,sa,sb in rows[:25]:
    print(f"{d:>8} KiB {d*1024/n:7.1f} B/conn  {k[0]} {k[2]} {k[1]} size {sa}->{sb} KiB")
