import re, glob, statistics, json
rows = {}
for who in ["old", "new"]:
    for n in [16384, 65536]:
        tr, inf, peak, ipeak, rss = [], [], set(), set(), []
        for f in sorted(glob.glob(f"./{who}-{n}-*.log")):
            for line in open(f):
                m = re.match(r"train step (\d+): ([\d.]+) s.*?peak ([\d.]+ MiB)", line)
                if m:
                    tr.append(float(m.group(2)))
                    if m.group(1) != "0": peak.add(m.group(3))
                m = re.match(r"inference pass \d+: ([\d.]+) s.*?peak ([\d.]+ MiB)", line)
                if m:
                    inf.append(float(m.group(1))); ipeak.add(m.group(2))
                m = re.search(r"peak RSS ([\d.]+) MiB", line)
                if m: rss.append(float(m.group(1)))
        rows[(who, n)] = dict(train=tr, infer=inf, peak=sorted(peak), ipeak=sorted(ipeak), rss=max(rss) if rss else None)
print("| length | side | training step, median (all) | forward, median (all) | pool peak train / forward | peak RSS |")
print("|---|---|---|---|---|---|")
for n in [16384, 65536]:
    for who in ["old", "new"]:
        r = rows[(who, n)]
        if not r["train"]: continue
        print(f"| {n} | {who} | {statistics.median(r['train']):.2f} s ({', '.join(f'{t:.1f}' for t in r['train'])}) | "
              f"{statistics.median(r['infer']):.2f} s ({', '.join(f'{t:.2f}' for t in r['infer'])}) | {'/'.join(r['peak'])} / {'/'.join(r['ipeak'])} | {r['rss']} MiB |")
    o, w = rows[("old", n)], rows[("new", n)]
    if o["train"] and w["train"]:
        print(f"| {n} | new/old | {statistics.median(w['train'])/statistics.median(o['train']):.3f} | {statistics.median(w['infer'])/statistics.median(o['infer']):.3f} | | |")
for f in sorted(glob.glob("./hf-*.json")):
    for r in json.load(open(f)):
        print(f"HF len {r['len']}: median {r['s_median']:.2f} s ({', '.join(f'{t:.1f}' for t in r['s_all'])}), peak RSS {r['peak_rss_bytes']/2**20:.0f} MiB, loss {r['loss']:.3f}")
