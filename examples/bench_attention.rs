//! LSH attention against exact attention on this machine's CPU: for N = 2^10 … 2^19, forward
//! and forward+backward time per token, the pool's peak bytes, and the LSH/exact ratio, for
//! 2 heads × d_k 64, chunk 64, rounds 1, 2 and 4. Exact attention (blockwise, O(N) memory —
//! the strongest exact baseline this engine has) runs while its predicted time stays within
//! `--exact-budget` seconds. Writes a CSV, a JSON file and an SVG chart.
//!
//! cargo run --release --example bench_attention -- --out bench/out

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Instant;

use reformer_engine::{MemoryPool, Rng, Tensor};
use reformer_lsh::{
    exact_attention_backward, exact_attention_forward, lsh_attention_backward,
    lsh_attention_forward, shared_qk_grad, shared_qk_rule, unit_keys, Buckets, LshConfig,
    Rotations,
};

struct Args {
    min_log2: u32,
    max_log2: u32,
    heads: usize,
    d: usize,
    chunk: usize,
    rounds: Vec<usize>,
    exact_budget: f64,
    out: PathBuf,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        min_log2: 10,
        max_log2: 19,
        heads: 2,
        d: 64,
        chunk: 64,
        rounds: vec![1, 2, 4],
        exact_budget: 300.0,
        out: PathBuf::from("target/bench_attention"),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || it.next().ok_or(format!("{flag} needs a value"));
        let bad = |e: &dyn std::fmt::Display| format!("bad value for {flag}: {e}");
        match flag.as_str() {
            "--min-log2" => a.min_log2 = val()?.parse().map_err(|e| bad(&e))?,
            "--max-log2" => a.max_log2 = val()?.parse().map_err(|e| bad(&e))?,
            "--heads" => a.heads = val()?.parse().map_err(|e| bad(&e))?,
            "--d" => a.d = val()?.parse().map_err(|e| bad(&e))?,
            "--chunk" => a.chunk = val()?.parse().map_err(|e| bad(&e))?,
            "--rounds" => {
                a.rounds = val()?
                    .split(',')
                    .map(|s| s.trim().parse().map_err(|e| bad(&e)))
                    .collect::<Result<_, _>>()?
            }
            "--exact-budget" => a.exact_budget = val()?.parse().map_err(|e| bad(&e))?,
            "--out" => a.out = PathBuf::from(val()?),
            "-h" | "--help" => {
                println!(
                    "bench_attention [--min-log2 10] [--max-log2 19] [--heads 2] [--d 64] [--chunk 64] \
                     [--rounds 1,2,4] [--exact-budget SECONDS] [--out DIR]"
                );
                std::process::exit(0);
            }
            other => return Err(format!("unknown flag {other}; see --help")),
        }
    }
    Ok(a)
}

#[derive(Clone)]
struct Row {
    kind: String,
    len: usize,
    fwd_s: f64,
    fwd_bwd_s: f64,
    peak_fwd: usize,
    peak_fwd_bwd: usize,
}

/// Median of `reps` runs of `f`, which returns seconds.
fn median(mut f: impl FnMut() -> f64, reps: usize) -> f64 {
    let mut t: Vec<f64> = (0..reps).map(|_| f()).collect();
    t.sort_by(|a, b| a.total_cmp(b));
    t[t.len() / 2]
}

fn reps_for(len: usize) -> usize {
    if len <= 1 << 14 {
        5
    } else if len <= 1 << 17 {
        3
    } else {
        1
    }
}

/// Exact attention's repetitions: one run once a length takes tens of seconds.
fn exact_reps(len: usize) -> usize {
    if len >= 1 << 15 {
        1
    } else {
        reps_for(len)
    }
}

type Run<'a> = dyn Fn(bool) -> Result<(), Box<dyn std::error::Error>> + 'a;

/// Times forward and forward+backward and records the pool's peak for each.
fn measure(
    kind: &str,
    len: usize,
    reps: usize,
    pool: &MemoryPool,
    run: &Run,
) -> Result<Row, Box<dyn std::error::Error>> {
    let mut err = None;
    let mut timed = |backward: bool| {
        median(
            || {
                let t = Instant::now();
                if let Err(e) = run(backward) {
                    err = Some(e);
                }
                t.elapsed().as_secs_f64()
            },
            reps,
        )
    };
    pool.reset_peak();
    let fwd_s = timed(false);
    let peak_fwd = pool.peak_bytes();
    pool.reset_peak();
    let fwd_bwd_s = timed(true);
    let peak_fwd_bwd = pool.peak_bytes();
    if let Some(e) = err {
        return Err(e);
    }
    Ok(Row {
        kind: kind.to_string(),
        len,
        fwd_s,
        fwd_bwd_s,
        peak_fwd,
        peak_fwd_bwd,
    })
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = parse_args()?;
    std::fs::create_dir_all(&args.out)?;
    let threads = rayon::current_num_threads();
    println!(
        "bench_attention: {} heads × d_k {}, chunk {}, rounds {:?}, {} threads; times are medians; \
         peaks include the inputs (qk, v, d_out)",
        args.heads, args.d, args.chunk, args.rounds, threads
    );
    println!(
        "{:>14} {:>8} {:>12} {:>14} {:>12} {:>14} {:>10}",
        "kind",
        "N",
        "fwd µs/tok",
        "fwd+bwd µs/tok",
        "peak fwd B/tok",
        "peak f+b B/tok",
        "exact/this"
    );
    let mut rows: Vec<Row> = Vec::new();
    let mut exact_alive = true;
    for log2 in args.min_log2..=args.max_log2 {
        let len = 1usize << log2;
        let pool = MemoryPool::unlimited();
        let mut rng = Rng::new(log2 as u64);
        let shape = [args.heads, len, args.d];
        let qk = Tensor::randn(&pool, &shape, 1.0, &mut rng)?;
        let v = Tensor::randn(&pool, &shape, 1.0, &mut rng)?;
        let g = Tensor::randn(&pool, &shape, 1.0, &mut rng)?;
        let mut here: Vec<Row> = Vec::new();

        // Exact first: the ratio column needs it.
        let exact_prev = rows
            .iter()
            .rev()
            .find(|r| r.kind == "exact")
            .map(|r| r.fwd_bwd_s + r.fwd_s);
        // Exact attention's cost grows ~4x per doubling: stop before a length would take longer
        // than the budget; a budget of 0 skips exact attention altogether.
        if exact_alive
            && (args.exact_budget <= 0.0
                || exact_prev.is_some_and(|t| 4.2 * t * exact_reps(len) as f64 > args.exact_budget))
        {
            exact_alive = false;
            println!(
                "(exact attention stops here: the next length would take over {:.0} s)",
                args.exact_budget
            );
        }
        if exact_alive {
            let rule = shared_qk_rule(true);
            let row = measure("exact", len, exact_reps(len), &pool, &|backward| {
                let k = unit_keys(&qk)?;
                let (o, lse) = exact_attention_forward(&qk, &k, &v, rule, None)?;
                if backward {
                    let (dq, dk, dv) =
                        exact_attention_backward(&qk, &k, &v, &o, &lse, &g, rule, None)?;
                    drop((shared_qk_grad(&qk, dq, &dk), dv));
                }
                Ok(())
            })?;
            here.push(row);
        }
        for &rounds in &args.rounds {
            let rot = Rotations::random(args.d, rounds, Buckets::auto(len, args.chunk), &mut rng)?;
            let cfg = LshConfig {
                chunk_len: args.chunk,
                causal: true,
            };
            let row = measure(
                &format!("lsh r={rounds}"),
                len,
                reps_for(len),
                &pool,
                &|backward| {
                    let (o, saved) = lsh_attention_forward(&qk, &v, &rot, &cfg, None)?;
                    if backward {
                        drop(lsh_attention_backward(
                            &qk, &v, &o, &g, &saved, &rot, &cfg, None,
                        )?);
                    }
                    Ok(())
                },
            )?;
            here.push(row);
        }
        let exact_fb = here.iter().find(|r| r.kind == "exact").map(|r| r.fwd_bwd_s);
        for r in &here {
            let n = r.len as f64;
            let ratio = exact_fb
                .map(|e| format!("{:.2}", e / r.fwd_bwd_s))
                .unwrap_or_else(|| "-".into());
            println!(
                "{:>14} {:>8} {:>12.3} {:>14.3} {:>12.0} {:>14.0} {:>10}",
                r.kind,
                r.len,
                1e6 * r.fwd_s / n,
                1e6 * r.fwd_bwd_s / n,
                r.peak_fwd as f64 / n,
                r.peak_fwd_bwd as f64 / n,
                ratio
            );
        }
        rows.extend(here);
    }
    write_outputs(&args, &rows)?;
    Ok(())
}

fn write_outputs(args: &Args, rows: &[Row]) -> std::io::Result<()> {
    let mut csv = String::from("kind,len,fwd_s,fwd_bwd_s,fwd_us_per_token,fwd_bwd_us_per_token,peak_fwd_bytes,peak_fwd_bwd_bytes\n");
    let mut json = String::from("[\n");
    for (i, r) in rows.iter().enumerate() {
        let n = r.len as f64;
        let _ = writeln!(
            csv,
            "{},{},{:.6},{:.6},{:.4},{:.4},{},{}",
            r.kind,
            r.len,
            r.fwd_s,
            r.fwd_bwd_s,
            1e6 * r.fwd_s / n,
            1e6 * r.fwd_bwd_s / n,
            r.peak_fwd,
            r.peak_fwd_bwd
        );
        let _ = writeln!(
            json,
            "  {{\"kind\": \"{}\", \"len\": {}, \"fwd_s\": {:.6}, \"fwd_bwd_s\": {:.6}, \"peak_fwd_bytes\": {}, \"peak_fwd_bwd_bytes\": {}, \"heads\": {}, \"d_k\": {}, \"chunk\": {}}}{}",
            r.kind, r.len, r.fwd_s, r.fwd_bwd_s, r.peak_fwd, r.peak_fwd_bwd, args.heads, args.d, args.chunk,
            if i + 1 < rows.len() { "," } else { "" }
        );
    }
    json.push_str("]\n");
    std::fs::write(args.out.join("attention.csv"), csv)?;
    std::fs::write(args.out.join("attention.json"), json)?;
    std::fs::write(args.out.join("attention.svg"), svg_chart(rows))?;
    println!(
        "wrote {0}/attention.csv, {0}/attention.json, {0}/attention.svg",
        args.out.display()
    );
    Ok(())
}

/// A log–log chart of forward+backward time per token against length, one line per kind.
fn svg_chart(rows: &[Row]) -> String {
    let (w, h, left, right, top, bottom) = (760.0, 460.0, 80.0, 170.0, 40.0, 60.0);
    let pts: Vec<(f64, f64)> = rows
        .iter()
        .map(|r| (r.len as f64, 1e6 * r.fwd_bwd_s / r.len as f64))
        .collect();
    let (xmin, xmax) = pts
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.0), b.max(p.0)));
    let (ymin, ymax) = pts
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.1), b.max(p.1)));
    let (lx0, lx1) = (xmin.log2(), xmax.log2().max(xmin.log2() + 1.0));
    let (ly0, ly1) = (
        ymin.log10().floor(),
        ymax.log10().ceil().max(ymin.log10().floor() + 1.0),
    );
    let px = |x: f64| left + (x.log2() - lx0) / (lx1 - lx0) * (w - left - right);
    let py = |y: f64| h - bottom - (y.log10() - ly0) / (ly1 - ly0) * (h - top - bottom);
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{}\" y=\"22\" text-anchor=\"middle\" font-size=\"15\">Attention forward+backward time per token (CPU, log–log)</text>\n",
        (w - right + left) / 2.0
    );
    for e in (lx0 as i64)..=(lx1 as i64) {
        let x = px(2f64.powi(e as i32));
        let _ = writeln!(s, "<line x1=\"{x}\" y1=\"{top}\" x2=\"{x}\" y2=\"{}\" stroke=\"#ddd\"/><text x=\"{x}\" y=\"{}\" text-anchor=\"middle\">2^{e}</text>", h - bottom, h - bottom + 18.0);
    }
    for e in (ly0 as i64)..=(ly1 as i64) {
        let y = py(10f64.powi(e as i32));
        let _ = writeln!(s, "<line x1=\"{left}\" y1=\"{y}\" x2=\"{}\" y2=\"{y}\" stroke=\"#ddd\"/><text x=\"{}\" y=\"{}\" text-anchor=\"end\">1e{e} µs</text>", w - right, left - 6.0, y + 4.0);
    }
    let _ = writeln!(
        s,
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">sequence length N</text>",
        (w - right + left) / 2.0,
        h - 15.0
    );
    let colors = [
        "#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b",
    ];
    let mut kinds: Vec<&str> = rows.iter().map(|r| r.kind.as_str()).collect();
    kinds.dedup();
    kinds.sort();
    kinds.dedup();
    for (i, kind) in kinds.iter().enumerate() {
        let c = colors[i % colors.len()];
        let line: Vec<String> = rows
            .iter()
            .filter(|r| r.kind == *kind)
            .map(|r| {
                format!(
                    "{:.1},{:.1}",
                    px(r.len as f64),
                    py(1e6 * r.fwd_bwd_s / r.len as f64)
                )
            })
            .collect();
        let _ = writeln!(
            s,
            "<polyline fill=\"none\" stroke=\"{c}\" stroke-width=\"2\" points=\"{}\"/>",
            line.join(" ")
        );
        for p in &line {
            let (x, y) = p.split_once(',').unwrap_or(("0", "0"));
            let _ = writeln!(s, "<circle cx=\"{x}\" cy=\"{y}\" r=\"3\" fill=\"{c}\"/>");
        }
        let ly = top + 20.0 + 20.0 * i as f64;
        let _ = writeln!(s, "<line x1=\"{}\" y1=\"{ly}\" x2=\"{}\" y2=\"{ly}\" stroke=\"{c}\" stroke-width=\"3\"/><text x=\"{}\" y=\"{}\">{kind}</text>", w - right + 15.0, w - right + 40.0, w - right + 46.0, ly + 4.0);
    }
    s.push_str("</svg>\n");
    s
}
