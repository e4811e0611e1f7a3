#!/usr/bin/env python3
"""Measures the supervisor on a release build: re-fork latency and job re-run latency after
kill -9 of a child, /livez latency, and RSS/PSS of the supervisor, the probe and an idle child.

Usage: cargo build --release && python3 scripts/measure_supervisor.py  (DATABASE_URL optional)
Runs 4 children in a scratch schema `measure_sup` (dropped at the end) with
FORKQ_HEALTHY_UPTIME_SECONDS=1, so that each kill, 2.5 s after the previous one, is a first crash
(re-forked at once) rather than a repeated fast crash (which backs off by design).
"""
import os, subprocess, time, json, socket, signal
DB = os.environ.get("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/test")
BIN=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "target", "release", "forkq")
env={"PATH":os.environ["PATH"],"DATABASE_URL":DB,
     "FORKQ_SCHEMA":"measure_sup","FORKQ_HEALTH_ADDR":"127.0.0.1:39281","FORKQ_CONCURRENCY":"4","FORKQ_LOG":"info","FORKQ_HEALTHY_UPTIME_SECONDS":"1"}
subprocess.run([BIN,"migrate"],env=env,check=True,capture_output=True)
log=open("/tmp/forkq-measure-supervisor.log","w")
d=subprocess.Popen([BIN,"run"],env=env,stdout=log,stderr=log,start_new_session=True)
def get(path):
    s=socket.create_connection(("127.0.0.1",39281),timeout=5)
    s.sendall(f"GET {path} HTTP/1.0\r\n\r\n".encode()); data=b""
    while True:
        c=s.recv(65536)
        if not c: break
        data+=c
    s.close(); head,_,body=data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body
def livez():
    c,b=get("/livez"); return c,json.loads(b)
def children(pid):
    try: return [int(x) for x in open(f"/proc/{pid}/task/{pid}/children").read().split()]
    except: return []
def alive(p):
    try: return open(f"/proc/{p}/stat").read().rsplit(")",1)[1].split()[0]!="Z"
    except: return False
for _ in range(200):
    try:
        c,b=livez()
        if c==200 and b["alive_children"]==4 and all(s["state"]!="starting" for s in b["slots"]): break
    except Exception: pass
    time.sleep(0.05)
time.sleep(1)
def psql(q):
    return subprocess.run(["psql","-XAtq",DB,"-c",q],capture_output=True,text=True).stdout.strip()
refork=[]; rerun=[]
for i in range(15):
    jid=int(psql("SELECT measure_sup.enqueue('default','sleep','{\"ms\":2000}'::jsonb)"))
    victim=None
    for _ in range(500):
        c,b=livez()
        for s in b["slots"]:
            if s["job_id"]==jid: victim=s["pid"]
        if victim: break
        time.sleep(0.005)
    before=set(children(d.pid))
    t0=time.monotonic(); os.kill(victim,signal.SIGKILL)
    while True:
        new=[p for p in children(d.pid) if p not in before and alive(p)]
        if new: refork.append(time.monotonic()-t0); break
        if time.monotonic()-t0>5: break
    while time.monotonic()-t0<5:
        c,b=livez(); el=time.monotonic()-t0
        hit=[s for s in b["slots"] if s["job_id"]==jid and s["pid"]!=victim]
        if hit: rerun.append(el-hit[0]["seconds_in_job"]); break
    time.sleep(2.5)  # let it finish; keep slots healthy
lat=[]
for _ in range(500):
    t=time.monotonic(); livez(); lat.append(time.monotonic()-t)
def pct(xs,p): xs=sorted(xs); return xs[round((len(xs)-1)*p)]
ms=lambda x: f"{x*1000:.2f} ms"
print(f"re-fork latency kill -9 -> new child in /proc ({len(refork)} runs): p50 {ms(pct(refork,.5))} max {ms(max(refork))}")
print(f"job re-run latency kill -9 -> job started again ({len(rerun)} runs, from /livez seconds_in_job, ms resolution): p50 {ms(pct(rerun,.5))} max {ms(max(rerun))}")
print(f"/livez latency (500 requests, new TCP connection each, python client): p50 {ms(pct(lat,.5))} p99 {ms(pct(lat,.99))}")
c,b=livez()
slots=[s["pid"] for s in b["slots"]]
probe=[p for p in children(d.pid) if p not in slots][0]
idle=[s["pid"] for s in b["slots"] if s["state"]=="idle"][0]
for who,p in [("supervisor",d.pid),("probe",probe),("idle child",idle)]:
    r={l.split(":")[0]:l.split()[1] for l in open(f"/proc/{p}/smaps_rollup") if l.split(":")[0] in ("Rss","Pss","Private_Clean","Private_Dirty")}
    th=[l for l in open(f"/proc/{p}/status") if l.startswith("Threads")][0].split()[1]
    print(f"{who} pid {p}: RSS {r['Rss']} kB, PSS {r['Pss']} kB, private {int(r['Private_Clean'])+int(r['Private_Dirty'])} kB, threads {th}")
os.kill(d.pid,signal.SIGTERM); d.wait(10)
psql("DROP SCHEMA measure_sup CASCADE")
