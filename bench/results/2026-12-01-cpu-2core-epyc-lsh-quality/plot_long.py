#!/usr/bin/env python3
"""The long-window pair (long-windows.sh): validation bits/byte against minutes and against
steps for the LSH and exact arms, as long-4096.svg, and the comparison rows as long-4096.csv
(at equal wall-clock: each arm's last validation; at equal steps: the last step both
validated). Standard library only."""
import csv
import os

HERE = os.path.dirname(os.path.abspath(__file__))
ARMS = [("lsh", "#1f77b4"), ("exact", "#d62728")]


def rows(arm):
    with open(os.path.join(HERE, f"long-4096-{arm}", "metrics.csv")) as f:
        return [r for r in csv.DictReader(f)]


def validated(rs):
    return [(int(r["step"]), float(r["elapsed_s"]), float(r["val_bpb"]))
            for r in rs if r["val_bpb"]]


def panel(x0, y0, w, h, series, xlabel, lo, hi):
    xmax = max(p[0] for _, _, pts in series for p in pts) or 1
    px = lambda x: x0 + x / xmax * w
    py = lambda y: y0 + h - (y - lo) / (hi - lo) * h
    s = []
    for k in range(6):
        y = lo + (hi - lo) * k / 5
        s.append(f'<line x1="{x0}" y1="{py(y):.1f}" x2="{x0 + w}" y2="{py(y):.1f}" stroke="#ddd"/>'
                 f'<text x="{x0 - 6}" y="{py(y) + 4:.1f}" text-anchor="end">{y:.2f}</text>')
    for k in range(6):
        x = xmax * k / 5
        s.append(f'<text x="{px(x):.1f}" y="{y0 + h + 16}" text-anchor="middle">{x:.0f}</text>')
    s.append(f'<text x="{x0 + w / 2}" y="{y0 + h + 34}" text-anchor="middle">{xlabel}</text>')
    for name, color, pts in series:
        line = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)
        s.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{line}"/>')
    return "\n".join(s)


def main():
    data = {arm: validated(rows(arm)) for arm, _ in ARMS}
    all_y = [v for pts in data.values() for _, _, v in pts]
    lo, hi = min(all_y) - 0.05, max(all_y) + 0.05
    by_time = [(a, c, [(t / 60, v) for _, t, v in data[a]]) for a, c in ARMS]
    by_step = [(a, c, [(s, v) for s, _, v in data[a]]) for a, c in ARMS]
    w, h = 980, 420
    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
           'font-family="sans-serif" font-size="12">',
           '<rect width="100%" height="100%" fill="white"/>',
           f'<text x="{w / 2}" y="22" text-anchor="middle" font-size="15">cp6, 4096-token windows '
           '(batches of 2), one thread each, side by side: validation bits/byte</text>',
           panel(70, 50, 380, 300, by_time, "minutes", lo, hi),
           panel(560, 50, 380, 300, by_step, "steps", lo, hi)]
    for i, (a, c) in enumerate(ARMS):
        svg.append(f'<line x1="{380 + 110 * i}" y1="{h - 14}" x2="{400 + 110 * i}" y2="{h - 14}" '
                   f'stroke="{c}" stroke-width="3"/><text x="{406 + 110 * i}" y="{h - 10}">{a}</text>')
    svg.append("</svg>\n")
    with open(os.path.join(HERE, "long-4096.svg"), "w") as f:
        f.write("\n".join(svg))

    common = set(s for s, _, _ in data["lsh"]) & set(s for s, _, _ in data["exact"])
    eq_step = max(common) if common else None
    with open(os.path.join(HERE, "long-4096.csv"), "w") as f:
        out = csv.writer(f)
        out.writerow(["comparison", "arm", "step", "elapsed_s", "val_bpb", "s_per_step"])
        for minute in range(10, 60, 10):
            for arm, _ in ARMS:
                before = [p for p in data[arm] if p[1] <= minute * 60]
                if before and data[arm][-1][1] > minute * 60:
                    s, t, v = before[-1]
                    out.writerow([f"at {minute} min", arm, s, f"{t:.0f}", f"{v:.4f}", f"{t / s:.2f}"])
        for arm, _ in ARMS:
            s, t, v = data[arm][-1]
            out.writerow(["equal wall-clock (end)", arm, s, f"{t:.0f}", f"{v:.4f}", f"{t / s:.2f}"])
        for arm, _ in ARMS:
            if eq_step is not None:
                s, t, v = next(p for p in data[arm] if p[0] == eq_step)
                out.writerow(["equal steps", arm, s, f"{t:.0f}", f"{v:.4f}", f"{t / s:.2f}"])
    with open(os.path.join(HERE, "long-4096.csv")) as f:
        print(f.read())


if __name__ == "__main__":
    main()
