#!/usr/bin/env python3
"""The one-page summary of a scripts/gpu-proof.sh run (standard library only).

Reads the run's work folder (runs.jsonl: one record per check; environment.json; each check's
folder with log.txt and its JSON), decides each check's final status from its figures as well
as its exit code, and writes <out>/summary.md (one table: every check, pass / fail / skipped,
figure, plan, ratio) and <out>/summary.json. Exit status 0 when it wrote both.

Figure rules on top of the exit code (a check that exited 0 can still fail here):
  long        the JSON must exist and say the runner was the GPU (else cpu-fallback); the pool's
              peak must be within 5% of the device plan (training and inference) and within the
              budget
  test        a libtest summary line must be there
  attn, torch-attn, torch-step   their JSON must exist with at least one measured row
"""
import argparse
import json
import os
import re
import sys

GIB = float(1 << 30)
PLAN_TOLERANCE = 0.05


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def read_text(path):
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def gib(b):
    return "—" if b is None else f"{b / GIB:.2f} GiB"


def secs(s):
    if s is None:
        return "—"
    return f"{s:.3f} s" if s < 10 else f"{s:.1f} s"


def test_counts(log):
    passed = failed = 0
    seen = False
    for m in re.finditer(r"^test result: \w+\. (\d+) passed; (\d+) failed", log, re.M):
        seen = True
        passed += int(m.group(1))
        failed += int(m.group(2))
    return seen, passed, failed


def failed_tests(log):
    names = []
    blocks = re.findall(r"^failures:\n((?:    \S+\n)+)", log, re.M)
    for b in blocks:
        names += [n.strip() for n in b.splitlines() if n.strip()]
    return sorted(set(names))


def first_error(log):
    """The first line that says why a process failed, shortened."""
    lines = log.splitlines()
    for i, line in enumerate(lines):
        if re.search(r"panicked at", line) and i + 1 < len(lines):
            line = lines[i + 1]
        elif not re.search(r"(^|: )error: |Error|REQUIRE_GPU=1 but", line):
            continue
        line = line.strip()
        return line if len(line) <= 200 else line[:197] + "..."
    return ""


def env_figures(rec, log, fig):
    m = None
    for m in re.finditer(r"^gpu-env: (\{.*\})\s*$", log, re.M):
        pass
    info = {}
    if m:
        try:
            info = json.loads(m.group(1))
        except ValueError:
            info = {}
    fig["env"] = info
    if info:
        fig["figure"] = (
            f"{info.get('device', '?')} {info.get('arch', '')}, "
            f"{gib(int(info['free_bytes'])) if 'free_bytes' in info else '?'} free; "
            f"NVRTC {info.get('nvrtc', '?')}, cuBLAS {info.get('cublas', '?')}; "
            f"{info.get('image', '?')} compiled in {float(info.get('compile_s', 'nan')):.1f} s, "
            f"loaded in {float(info.get('load_s', 'nan')):.2f} s")
    else:
        lines = [l[len("gpu-env: "):] for l in log.splitlines() if l.startswith("gpu-env: ")]
        fig["figure"] = "; ".join(lines[-3:]) if lines else "—"
    return None


def long_figures(rec, d, fig):
    j = read_json(os.path.join(d, "long_context.json"))
    if j is None:
        return "fail", "no long_context.json"
    fig["json"] = j
    runner = str(j.get("runner", ""))
    if not runner.startswith("Cuda"):
        return "cpu-fallback", f"runner {runner or '?'}: not the GPU"
    parts, plans, ratios, notes = [], [], [], []
    status = None
    budget = j.get("budget_bytes")
    for key, plan_key, name in (("train", "device_train_plan_bytes", "train"),
                                ("infer", "device_infer_plan_bytes", "forward")):
        if f"{key}_peak_bytes" not in j:
            continue
        peak = j.get(f"{key}_peak_bytes")
        plan = j.get(plan_key)
        every = j.get(f"{key}_s_all") or []
        steady = every[-1] if every else j.get(f"{key}_s_median")
        drv = j.get(f"{key}_driver_used_bytes")
        first = f" (first {secs(every[0])})" if len(every) > 1 else ""
        tok = j.get("len", 0) / steady if steady else None
        parts.append(f"{name}: peak {gib(peak)}, driver {gib(drv)}, step {secs(steady)}{first}"
                     + (f", {tok:,.0f} tok/s" if tok else ""))
        plans.append(f"{name} {gib(plan)}")
        if peak is not None and plan:
            r = peak / plan
            ratios.append(f"{r:.4f}")
            if abs(r - 1) > PLAN_TOLERANCE:
                status = "fail"
                notes.append(f"{name} peak {r:.3f}× the plan (over {PLAN_TOLERANCE:.0%} off)")
        if peak is not None and budget and peak > budget:
            status = "fail"
            notes.append(f"{name} peak over the budget {gib(budget)}")
        fig[f"{key}_steady_s"] = steady
        fig[f"{key}_peak_bytes"] = peak
        fig[f"{key}_plan_bytes"] = plan
        fig[f"{key}_driver_bytes"] = drv
    if not parts:
        return "fail", "the JSON holds no measured step"
    fig["figure"] = "; ".join(parts) + (f" (budget {gib(budget)})" if budget else "")
    fig["plan"] = ", ".join(plans)
    fig["ratio"] = " / ".join(ratios) + " (peak/plan)" if ratios else "—"
    return status, "; ".join(notes)


def attn_rows(d):
    rows = read_json(os.path.join(d, "attention.json"))
    return rows if isinstance(rows, list) else None


def fb_us(rows, kind, n):
    for r in rows:
        if r.get("kind") == kind and r.get("len") == n and r.get("status") == "ok":
            return r.get("fwd_bwd_us_per_token"), r.get("fwd_us_per_token")
    return None, None


def attn_figures(rec, d, fig, torch_rows):
    rows = attn_rows(d)
    if not rows or not any(r.get("status") == "ok" for r in rows):
        return "fail", "no measured attention row"
    all_rows = rows + (torch_rows or [])
    parts, ratios = [], []
    for n in (1 << 16, 1 << 19):
        vals = []
        for kind, label in (("lsh r=1", "LSH1"), ("lsh r=2", "LSH2"), ("local", "local"),
                            ("exact", "exact"), ("torch-sdpa-flash", "flash")):
            fb, _ = fb_us(all_rows, kind, n)
            if fb is not None:
                vals.append(f"{label} {fb:.3f}")
        if vals:
            parts.append(f"2^{n.bit_length() - 1} fwd+bwd µs/tok: " + ", ".join(vals))
        lsh, _ = fb_us(rows, "lsh r=1", n)
        for kind, label in (("exact", "exact"), ("torch-sdpa-flash", "flash")):
            ex, _ = fb_us(all_rows, kind, n)
            if lsh and ex:
                ratios.append(f"{label}/LSH1 at 2^{n.bit_length() - 1}: {ex / lsh:.1f}×")
                fig[f"{kind}_over_lsh1_{n}"] = ex / lsh
    fig["figure"] = "; ".join(parts) or "—"
    fig["ratio"] = ", ".join(ratios) or "—"
    bad = sorted({f"{r.get('kind')}: {r.get('status')}" for r in rows if r.get("status") != "ok"})
    return None, "; ".join(bad)


def torch_attn_figures(rec, d, fig):
    rows = attn_rows(d)
    if not rows or not any(r.get("status") == "ok" for r in rows):
        return "fail", "no measured torch row"
    parts = []
    for r in rows:
        if r.get("status") == "ok":
            parts.append(f"2^{int(r['len']).bit_length() - 1} fwd {r['fwd_us_per_token']:.4f} / "
                         f"fwd+bwd {r['fwd_bwd_us_per_token']:.4f} µs/tok")
    fig["figure"] = f"{rows[0].get('kind')} {rows[0].get('dtype')}: " + "; ".join(parts)
    return None, ""


def torch_step_rows(d):
    j = read_json(os.path.join(d, "torch_step.json"))
    return (j or {}).get("rows") if isinstance(j, dict) else None


def torch_step_figures(rec, d, fig):
    rows = torch_step_rows(d)
    if not rows or not any(r.get("status") == "ok" for r in rows):
        return "fail", "no measured torch step"
    parts = []
    for r in rows:
        label = f"{r.get('preset')} 2^{int(r.get('len', 1)).bit_length() - 1}"
        if r.get("status") == "ok":
            parts.append(f"{label} {secs(r.get('step_s'))} ({gib(r.get('peak_bytes'))})")
        else:
            parts.append(f"{label} {r.get('status')}")
    fig["figure"] = "; ".join(parts)
    return None, ""


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--bit-for-bit", default="")
    a = ap.parse_args(argv)
    env = read_json(os.path.join(a.work, "environment.json")) or {}
    recs = []
    with open(os.path.join(a.work, "runs.jsonl")) as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    recs.append(json.loads(line))
                except ValueError:
                    pass
    torch_rows = attn_rows(os.path.join(a.work, "torch-attn")) or []
    torch_steps = torch_step_rows(os.path.join(a.work, "torch-step")) or []
    bit_tests = set(a.bit_for_bit.split())
    gpu = bool(env.get("gpu_present"))
    env_info = {}
    for rec in recs:
        d = os.path.join(a.work, rec["id"])
        log = read_text(os.path.join(d, "log.txt"))
        fig = {"figure": "—", "plan": "—", "ratio": "—"}
        status, note = rec["status"], rec.get("note", "")
        extra_status, extra_note = None, ""
        kind = rec["kind"]
        if status in ("pass", "fail", "timeout", "cpu-fallback") and log:
            if kind == "env":
                env_figures(rec, log, fig)
                env_info = fig.get("env", {})
            elif kind == "test":
                seen, p, fl = test_counts(log)
                fig["figure"] = f"{p} passed, {fl} failed" if seen else "—"
                names = failed_tests(log)
                if names:
                    extra_note = "failed: " + ", ".join(names)
                    if bit_tests & set(names):
                        extra_note += ("; a bit-for-bit f32/bf16 test failed: it depends on "
                                       "identical FMA contraction, rerun it with "
                                       "REFORMER_NVRTC_OPTIONS=--fmad=false before suspecting a kernel")
                if status == "pass" and not seen:
                    extra_status, extra_note = "fail", "no libtest summary line"
            elif kind == "long":
                extra_status, extra_note = long_figures(rec, d, fig)
                steady = fig.get("train_steady_s")
                j = fig.get("json") or {}
                for t in torch_steps:
                    if (t.get("status") == "ok" and t.get("preset") == j.get("preset")
                            and t.get("len") == j.get("len") and steady and t.get("step_s")):
                        fig["ratio"] += f"; ours/torch step {steady / t['step_s']:.2f}×"
                        fig["ours_over_torch_step"] = steady / t["step_s"]
            elif kind == "attn":
                extra_status, extra_note = attn_figures(rec, d, fig, torch_rows)
            elif kind == "torch-attn":
                extra_status, extra_note = torch_attn_figures(rec, d, fig)
            elif kind == "torch-step":
                extra_status, extra_note = torch_step_figures(rec, d, fig)
        if status not in ("pass", "skipped") and log and not extra_note:
            why = first_error(log)
            if why:
                extra_note = why
        if kind == "preflight":
            fig["figure"] = note or "ok"
            note = ""
        if status == "pass" and extra_status:
            status = extra_status
        if extra_note:
            note = f"{note}; {extra_note}" if note else extra_note
        fig.pop("json", None)
        fig.pop("env", None)
        rec.update(final_status=status, note=note, **fig)

    ran = [r for r in recs if r["final_status"] != "skipped"]
    bad = [r for r in ran if r["final_status"] != "pass"]
    skipped = [r for r in recs if r["final_status"] == "skipped"]
    ok = bool(ran) and not bad
    dry_ok = (any(r["id"] == "preflight" and r["final_status"] == "pass" for r in recs)
              and all(r["final_status"] in ("no-gpu", "skipped") for r in recs
                      if r["id"] != "preflight"))
    wall = max([r.get("at_s", 0) for r in recs] + [0])

    md = []
    title_dev = env_info.get("device") or env.get("device") or "no GPU"
    md.append(f"# GPU proof: {title_dev}, {env.get('started', '?')}")
    md.append("")
    if env.get("dry_run"):
        md.append("**Dry run** (no GPU expected): GPU checks must report `no-gpu`. "
                  f"Plumbing {'works' if dry_ok else 'BROKEN'}.")
        md.append("")
    md.append(f"- commit `{env.get('commit', '?')}`; binaries staged from "
              f"`{env.get('staged_commit') or 'nothing staged'}`")
    md.append(f"- device {env.get('device', '?')}, driver {env.get('driver') or '—'} "
              f"(CUDA {env.get('driver_cuda') or '—'}), memory free {env.get('memory_free_mib') or '?'} "
              f"of {env.get('memory_total_mib') or '?'} MiB")
    if env_info:
        md.append(f"- loaded: libcuda `{env_info.get('libcuda', '?')}` (CUDA {env_info.get('driver_cuda', '?')}), "
                  f"libnvrtc `{env_info.get('libnvrtc', '?')}` (NVRTC {env_info.get('nvrtc', '?')}), "
                  f"libcublas `{env_info.get('libcublas', '?')}` (cuBLAS {env_info.get('cublas', '?')}); "
                  f"kernels loaded as {env_info.get('image', '?')}")
    else:
        md.append(f"- found: libcuda in `{env.get('libcuda_dir') or 'NOT FOUND'}`, libnvrtc in "
                  f"`{env.get('nvrtc_dir') or 'NOT FOUND'}`, libcublas in `{env.get('cublas_dir') or 'NOT FOUND'}`")
    md.append(f"- torch {env.get('torch', '?')}; glibc {env.get('glibc') or '?'} "
              f"(binaries need {env.get('glibc_required') or '?'})")
    md.append(f"- deadline {env.get('deadline_s', '?')} s; the checks ended at {wall} s")
    md.append("")
    md.append("| # | check | status | figure | plan | ratio | s (expected) | note |")
    md.append("|---|---|---|---|---|---|---|---|")

    def cell(s):
        return str(s).replace("|", "\\|").replace("\n", " ")

    for i, r in enumerate(recs):
        st = r["final_status"]
        shown = f"**{st}**" if st not in ("pass", "skipped") else st
        took = f"{r['seconds']} ({r['expected_s']})" if r["final_status"] != "skipped" else f"— ({r['expected_s']})"
        md.append(f"| {i} | {cell(r['id'])} | {shown} | {cell(r['figure'])} | {cell(r['plan'])} | "
                  f"{cell(r['ratio'])} | {took} | {cell(r['note'])} |")
    md.append("")
    verdict = ("all passed" if ok else f"{len(bad)} did not pass: " + ", ".join(
        f"{r['id']} ({r['final_status']})" for r in bad))
    md.append(f"**{len(ran)} checks ran, {verdict}.**"
              + (f" Skipped by the deadline: {', '.join(r['id'] for r in skipped)}." if skipped else ""))
    md.append("")
    md.append("Statuses: `pass`; `fail` (exit code or figures); `timeout`; `cpu-fallback` (exit 0 "
              "but not on the GPU); `no-gpu` (no GPU on this machine); `not-staged`; `skipped` "
              "(its expected time did not fit before the deadline). Every log, JSON, CSV and SVG "
              "is in gpu-proof.tar.gz; gpu-proof.log has everything in order.")
    with open(os.path.join(a.out, "summary.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    summary = dict(environment=env, loaded=env_info, checks=recs, ok=ok, dry_run_ok=dry_ok,
                   gpu_present=gpu)
    with open(os.path.join(a.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1, default=str)
        f.write("\n")
    with open(os.path.join(a.work, "verdict"), "w") as f:
        f.write(f"ok={int(ok)} dry_run_ok={int(dry_ok)}\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
