//! The command-line tools as a user meets them: `train_text`, `evaluate`, `generate`,
//! `long_context` and `bench_attention` run as processes on the bad and edge inputs of issue 13, each case
//! asserting the exit code and the message. Runs lose nothing (a second run refuses the
//! folder, signals checkpoint, closed pipes are not crashes, metrics stay one row per step),
//! every numeric flag is refused before any work with its name, value and range, and every
//! path is named in its error.
//!
//! The tools are cargo examples: `cargo test` builds them beside this test (in
//! `target/<profile>/examples/`); with a test filter that skips building them, run
//! `cargo build --examples` (same profile) first. Everything runs the `tiny` preset on the CPU
//! on a few kB of text, so the whole file takes seconds.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use reformer::checkpoint;

/// The longest any one tool run may take before the test calls it a hang.
const HANG: Duration = Duration::from_secs(120);

/// The example binary `name`, built by `cargo test` beside this test.
fn tool(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    // target/<profile>/deps/cli_tools-HASH → target/<profile>/examples/NAME
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>")
        .join("examples");
    let path = dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(
        path.exists(),
        "{} is missing: `cargo test` builds the examples; with a test filter, run `cargo build \
         --examples --profile test` first",
        path.display()
    );
    // A filtered `cargo test --test cli_tools` does not rebuild the examples: refuse to test
    // a binary older than its sources rather than pass on stale code.
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let built = std::fs::metadata(&path).and_then(|m| m.modified()).unwrap();
    let mut sources = vec![root.join("examples").join(format!("{name}.rs"))];
    let mut dirs = vec![root.join("src")];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                sources.push(p);
            }
        }
    }
    for src in sources {
        let changed = std::fs::metadata(&src).and_then(|m| m.modified()).unwrap();
        assert!(
            changed <= built,
            "{} is older than {}: run `cargo test` without a filter (it rebuilds the examples) \
             or `cargo build --examples --profile test` first",
            path.display(),
            src.display()
        );
    }
    path
}

/// A test's scratch folder; removed when the test passes, kept for a look when it fails.
struct Scratch(PathBuf);

impl std::ops::Deref for Scratch {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for Scratch {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// A fresh scratch folder for one test, holding a small text.
fn scratch(name: &str) -> Scratch {
    let dir = std::env::temp_dir().join(format!("reformer-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let corpus = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/shakespeare-40k.txt"
    ))
    .unwrap();
    std::fs::write(dir.join("t.txt"), &corpus[..20_000]).unwrap();
    // Validation split of 100 bytes.
    std::fs::write(dir.join("short.txt"), &corpus[..2_000]).unwrap();
    Scratch(dir)
}

/// What a finished run left.
struct Run {
    status: ExitStatus,
    stdout: String,
    /// Bytes written to stdout (the text above is lossy).
    stdout_len: usize,
    stderr: String,
}

impl Run {
    fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// Asserts the exit code and that stderr holds every fragment.
    #[track_caller]
    fn expect(&self, code: i32, fragments: &[&str]) -> &Self {
        assert_eq!(
            self.code(),
            Some(code),
            "exit status {:?}, expected {code}\n--- stderr:\n{}\n--- stdout:\n{}",
            self.status,
            self.stderr,
            self.stdout
        );
        for f in fragments {
            assert!(
                self.stderr.contains(f),
                "stderr lacks `{f}`:\n{}",
                self.stderr
            );
        }
        assert!(
            !self.stderr.contains("panicked"),
            "a panic:\n{}",
            self.stderr
        );
        self
    }
}

/// Waits for `child` at most [`HANG`], killing it if it runs longer.
fn wait(mut child: Child) -> ExitStatus {
    let t0 = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if t0.elapsed() > HANG {
            let _ = child.kill();
            panic!("the tool ran past {HANG:?}: a hang");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `name` with `args` in `dir`, stdin closed, and collects its output.
fn run(dir: &Path, name: &str, args: &[&str]) -> Run {
    let mut child = Command::new(tool(name))
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = out.read_to_end(&mut s);
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = err.read_to_end(&mut s);
        s
    });
    let status = wait(child);
    let out = out.join().unwrap();
    Run {
        status,
        stdout: String::from_utf8_lossy(&out).into_owned(),
        stdout_len: out.len(),
        stderr: String::from_utf8_lossy(&err.join().unwrap()).into_owned(),
    }
}

/// `train_text`'s flags for the tests: the scratch text, the tiny preset on the CPU, short
/// windows, a short warmup, quick evaluations, no sample; a flag in `extra` replaces the
/// default of the same name.
fn train_args<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    const BASE: [(&str, &str); 9] = [
        ("--text", "t.txt"),
        ("--preset", "tiny"),
        ("--seq-len", "32"),
        ("--batch", "1"),
        ("--device", "cpu"),
        ("--warmup", "2"),
        ("--eval-every", "2"),
        ("--eval-windows", "4"),
        ("--sample-tokens", "0"),
    ];
    let overridden = |flag: &str| {
        extra
            .iter()
            .any(|e| *e == flag || e.strip_prefix(flag).is_some_and(|r| r.starts_with('=')))
    };
    let mut args: Vec<&str> = BASE
        .iter()
        .filter(|(f, _)| !overridden(f))
        .flat_map(|(f, v)| [*f, *v])
        .collect();
    args.extend_from_slice(extra);
    args
}

/// `train_text` with [`train_args`].
fn train(dir: &Path, extra: &[&str]) -> Run {
    run(dir, "train_text", &train_args(extra))
}

/// The `step` column of a metrics file, and whether each row has a validation figure.
fn metrics(path: &Path) -> Vec<(u64, bool)> {
    let text = std::fs::read_to_string(path).unwrap();
    let mut lines = text.lines();
    assert_eq!(
        lines.next(),
        Some(reformer::cli::METRICS_HEADER),
        "{}",
        path.display()
    );
    lines
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            assert_eq!(f.len(), 9, "row `{l}`");
            (f[0].parse().unwrap(), !f[8].is_empty())
        })
        .collect()
}

fn steps(rows: &[(u64, bool)]) -> Vec<u64> {
    rows.iter().map(|r| r.0).collect()
}

// ---------------------------------------------------------------------------------------------
// train_text: runs are not lost

#[test]
fn a_second_fresh_run_refuses_the_folder_and_force_replaces_it() {
    let dir = scratch("refuse");
    // The first run on a fresh machine: the folder (nested, absent) is made.
    train(&dir, &["--steps", "3", "--out", "runs/a"]).expect(0, &["final validation"]);
    let ck = dir.join("runs/a/checkpoint.safetensors");
    let before = std::fs::read(&ck).unwrap();
    let rows = std::fs::read(dir.join("runs/a/metrics.csv")).unwrap();

    let again = train(&dir, &["--steps", "5", "--out", "runs/a"]);
    again.expect(
        1,
        &[
            "--out runs/a already holds a run (checkpoint.safetensors, metrics.csv)",
            "nothing was changed",
            "--resume",
            "--force",
            "another --out",
        ],
    );
    assert_eq!(std::fs::read(&ck).unwrap(), before, "checkpoint untouched");
    assert_eq!(
        std::fs::read(dir.join("runs/a/metrics.csv")).unwrap(),
        rows,
        "metrics untouched"
    );

    // A metrics file alone is a run too.
    std::fs::create_dir_all(dir.join("runs/b")).unwrap();
    std::fs::write(dir.join("runs/b/metrics.csv"), "x\n").unwrap();
    train(&dir, &["--steps", "2", "--out", "runs/b"])
        .expect(1, &["already holds a run (metrics.csv)"]);

    // --force replaces it.
    train(&dir, &["--steps", "5", "--out", "runs/a", "--force"])
        .expect(0, &["--force: replacing the run in runs/a"]);
    assert_eq!(
        steps(&metrics(&dir.join("runs/a/metrics.csv"))),
        [1, 2, 3, 4, 5]
    );
    assert_eq!(checkpoint::load(&ck).unwrap().state.step, 5);
}

#[test]
fn resuming_into_another_runs_folder_refuses() {
    let dir = scratch("other");
    train(&dir, &["--steps", "2", "--out", "a"]).expect(0, &[]);
    train(&dir, &["--steps", "2", "--out", "b"]).expect(0, &[]);
    let b_ck = std::fs::read(dir.join("b/checkpoint.safetensors")).unwrap();
    train(
        &dir,
        &[
            "--resume",
            "a/checkpoint.safetensors",
            "--steps",
            "4",
            "--out",
            "b",
        ],
    )
    .expect(
        1,
        &[
            "--out b already holds another run",
            "resuming a/checkpoint.safetensors there would overwrite it",
        ],
    );
    assert_eq!(
        std::fs::read(dir.join("b/checkpoint.safetensors")).unwrap(),
        b_ck
    );
    // Into a new folder it continues.
    train(
        &dir,
        &[
            "--resume",
            "a/checkpoint.safetensors",
            "--steps",
            "4",
            "--out",
            "c",
        ],
    )
    .expect(0, &["resuming a/checkpoint.safetensors at step 2"]);
    assert_eq!(steps(&metrics(&dir.join("c/metrics.csv"))), [3, 4]);
}

#[cfg(unix)]
fn signal_run(dir: &Path, signal: &str, out: &str) -> (Run, u64) {
    let mut child = Command::new(tool("train_text"))
        .args(train_args(&[
            "--steps",
            "1000000",
            "--eval-every",
            "0",
            "--out",
            out,
        ]))
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut stderr = String::new();
    // The last line before the loop; then let a few steps run.
    while !stderr.contains("validation:") {
        let mut line = String::new();
        assert!(err.read_line(&mut line).unwrap() > 0, "no start: {stderr}");
        stderr.push_str(&line);
    }
    std::thread::sleep(Duration::from_millis(300));
    let pid = child.id().to_string();
    // The shell's own `kill`: no separate binary needed.
    let sent = Command::new("sh")
        .args(["-c", &format!("kill {signal} {pid}")])
        .status()
        .unwrap();
    assert!(sent.success());
    let _ = err.read_to_string(&mut stderr);
    let status = wait(child);
    let step = checkpoint::load(&dir.join(out).join("checkpoint.safetensors"))
        .expect("the interrupted run's checkpoint loads")
        .state
        .step;
    (
        Run {
            status,
            stdout: String::new(),
            stdout_len: 0,
            stderr,
        },
        step,
    )
}

#[cfg(unix)]
#[test]
fn sigint_and_sigterm_checkpoint_at_the_step_and_exit_nonzero() {
    let dir = scratch("signal");
    for (signal, name, code, out) in [
        ("-INT", "SIGINT", 130, "int"),
        ("-TERM", "SIGTERM", 143, "term"),
    ] {
        let (r, step) = signal_run(&dir, signal, out);
        let said = format!(
            "interrupted by {name} after step {step}: checkpoint saved to {out}/checkpoint.safetensors; continue with --resume"
        );
        r.expect(code, &[&said]);
        assert!(step >= 1, "{name}: stopped at step {step}");
        // The metrics hold every step up to the checkpoint's, once.
        let rows = metrics(&dir.join(out).join("metrics.csv"));
        assert_eq!(steps(&rows), (1..=step).collect::<Vec<_>>(), "{name}");
        // And the run continues from there.
        let target = (step + 2).to_string();
        train(&dir, &["--resume", "--steps", &target, "--out", out]).expect(
            0,
            &[&format!(
                "resuming {out}/checkpoint.safetensors at step {step}"
            )],
        );
        let rows = metrics(&dir.join(out).join("metrics.csv"));
        assert_eq!(steps(&rows), (1..=step + 2).collect::<Vec<_>>(), "{name}");
    }
}

#[test]
fn a_closed_pipe_is_not_a_crash() {
    // `train_text ... 2>&1 | head -1`: both streams into one pipe whose reader leaves after
    // the first line; training goes on to the end and saves.
    let dir = scratch("pipe");
    let (reader, writer) = std::io::pipe().unwrap();
    let child = Command::new(tool("train_text"))
        .args(train_args(&[
            "--steps",
            "60",
            "--eval-every",
            "5",
            "--eval-windows",
            "2",
            "--sample-tokens",
            "40",
            "--out",
            "run",
        ]))
        .current_dir(&dir)
        .stdin(Stdio::null())
        .stdout(writer.try_clone().unwrap())
        .stderr(writer)
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(reader).read_line(&mut first).unwrap();
    // The reader is dropped here: every later write meets a closed pipe.
    let status = wait(child);
    assert_eq!(
        status.code(),
        Some(0),
        "{status:?} after the first line `{first}`"
    );
    let ck = checkpoint::load(&dir.join("run/checkpoint.safetensors")).unwrap();
    assert_eq!(ck.state.step, 60);
    let rows = metrics(&dir.join("run/metrics.csv"));
    assert_eq!(steps(&rows), (1..=60).collect::<Vec<_>>());
    assert!(rows[59].1, "the final validation is in the last row");
}

#[test]
fn metrics_stay_one_row_per_step_across_resumes() {
    let dir = scratch("metrics");
    train(&dir, &["--steps", "4", "--out", "run"]).expect(0, &[]);
    let path = dir.join("run/metrics.csv");
    let rows = metrics(&path);
    assert_eq!(steps(&rows), [1, 2, 3, 4]);
    assert!(rows[3].1, "the final validation is written to the last row");
    // Rows written after the checkpoint (a run killed before its next save), and a line cut
    // by the kill.
    let mut text = std::fs::read_to_string(&path).unwrap();
    text.push_str("5,160,0.5,5.9,8.5,1e-4,2.0,300.0,\n6,192,0.6,5.9,8.5,1e-4,2.0,300.0,\n7,22");
    std::fs::write(&path, text).unwrap();
    train(&dir, &["--resume", "--steps", "7", "--out", "run"])
        .expect(0, &["dropped 3 rows written after the checkpoint's step 4"]);
    let rows = metrics(&path);
    assert_eq!(steps(&rows), [1, 2, 3, 4, 5, 6, 7]);
    assert!(
        rows[6].1,
        "the resumed run's final validation is written too"
    );
    // Elapsed time continues across the resume.
    let text = std::fs::read_to_string(&path).unwrap();
    let elapsed: Vec<f64> = text
        .lines()
        .skip(1)
        .map(|l| l.split(',').nth(2).unwrap().parse().unwrap())
        .collect();
    assert!(elapsed.windows(2).all(|w| w[0] <= w[1]), "{elapsed:?}");
}

// ---------------------------------------------------------------------------------------------
// train_text: flags checked before any work

#[test]
fn bad_numbers_are_refused_before_any_work() {
    let dir = scratch("numbers");
    let cases: &[(&[&str], &str)] = &[
        (&["--minutes", "-1"], "invalid value '-1' for '--minutes <MINUTES>': expected a finite number in (0, 525600]"),
        (&["--minutes", "nan"], "invalid value 'nan' for '--minutes <MINUTES>': expected a finite number in (0, 525600]"),
        (&["--minutes", "1e30"], "invalid value '1e30' for '--minutes <MINUTES>'"),
        (&["--minutes", "0"], "invalid value '0' for '--minutes <MINUTES>'"),
        (&["--lr", "-1"], "invalid value '-1' for '--lr <LR>': expected a finite number in (0, 1]"),
        (&["--lr=-1"], "invalid value '-1' for '--lr <LR>'"),
        (&["--lr", "nan"], "invalid value 'nan' for '--lr <LR>'"),
        (&["--lr", "0"], "invalid value '0' for '--lr <LR>'"),
        (&["--lr", "inf"], "invalid value 'inf' for '--lr <LR>'"),
        (&["--beta1", "1"], "invalid value '1' for '--beta1 <BETA1>': expected a finite number in [0, 1)"),
        (&["--beta1", "-0.1"], "invalid value '-0.1' for '--beta1 <BETA1>'"),
        (&["--beta2", "1.5"], "invalid value '1.5' for '--beta2 <BETA2>'"),
        (&["--eps", "0"], "invalid value '0' for '--eps <EPS>': expected a finite number in (0, 1)"),
        (&["--eps", "nan"], "invalid value 'nan' for '--eps <EPS>'"),
        (&["--dropout", "1"], "invalid value '1' for '--dropout <DROPOUT>': expected a finite number in [0, 1)"),
        (&["--dropout", "-0.5"], "invalid value '-0.5' for '--dropout <DROPOUT>'"),
        (&["--warmup", "-1"], "invalid value '-1' for '--warmup <WARMUP>': expected a whole number ≥ 0"),
        (&["--eval-rounds", "0"], "invalid value '0' for '--eval-rounds <EVAL_ROUNDS>': expected a whole number in 1..=64"),
        (&["--eval-windows", "0"], "invalid value '0' for '--eval-windows <EVAL_WINDOWS>': expected a whole number ≥ 1"),
        (&["--eval-len", "0"], "invalid value '0' for '--eval-len <EVAL_LEN>': expected a whole number ≥ 1"),
        (&["--eval-len", "300"], "invalid value `300` for --eval-len: expected a whole number in 1..=256"),
        (&["--seq-len", "0"], "invalid value '0' for '--seq-len <SEQ_LEN>': expected a whole number ≥ 1"),
        (&["--seq-len", "257"], "invalid value `257` for --seq-len: expected a whole number in 1..=256, the tiny preset's capacity"),
        (&["--batch", "0"], "invalid value '0' for '--batch <BATCH>': expected a whole number in 1..=65536"),
        (&["--steps", "0"], "invalid value '0' for '--steps <STEPS>': expected a whole number ≥ 1"),
        (&["--steps", "-5"], "invalid value '-5' for '--steps <STEPS>'"),
        (&["--save-every", "-1"], "invalid value '-1' for '--save-every <SAVE_EVERY>'"),
        (&["--eval-every", "x"], "invalid value 'x' for '--eval-every <EVAL_EVERY>'"),
        (&["--sample-tokens", "-3"], "invalid value '-3' for '--sample-tokens <SAMPLE_TOKENS>'"),
        (&["--preset", "huge"], "invalid value 'huge' for '--preset <PRESET>'"),
        (&["--lsh-as", "fast"], "invalid value 'fast' for '--lsh-as <KIND>'"),
    ];
    for (flags, message) in cases {
        let mut args: Vec<&str> = flags.to_vec();
        if !flags.iter().any(|f| f.starts_with("--steps")) {
            args.extend(["--steps", "3"]);
        }
        args.extend(["--out", "run"]);
        let r = train(&dir, &args);
        r.expect(2, &[message]);
        assert!(!dir.join("run").exists(), "{flags:?}: no work, no folder");
    }
}

#[test]
fn evaluation_settings_that_change_the_figure_are_refused_or_said() {
    let dir = scratch("eval");
    // short.txt holds 2000 bytes: its validation split 100, so windows of at most 99 tokens.
    train(
        &dir,
        &["--text", "short.txt", "--eval-len", "120", "--out", "run"],
    )
    .expect(
        2,
        &[
            "invalid value `120` for --eval-len",
            "the validation split of short.txt (its last 5%) holds 100 bytes",
            "at most 99 tokens",
        ],
    );
    train(
        &dir,
        &["--text", "short.txt", "--seq-len", "128", "--out", "run"],
    )
    .expect(2, &["--eval-len (default: the sequence length)", "`128`"]);
    assert!(!dir.join("run").exists());
    // More windows than fit: a notice with the number used.
    train(
        &dir,
        &[
            "--text",
            "short.txt",
            "--eval-windows",
            "50",
            "--steps",
            "2",
            "--out",
            "run",
        ],
    )
    .expect(
        0,
        &[
            "notice: --eval-windows 50: only 3 windows of 32 tokens fit",
            "validation: 3 windows of 32 tokens",
        ],
    );
    // Evaluating past the training length: said.
    train(&dir, &["--eval-len", "64", "--steps", "2", "--out", "run2"]).expect(
        0,
        &["notice: --eval-len 64 is longer than the training windows (32)"],
    );
    // A warmup longer than the run: said.
    train(&dir, &["--warmup", "100", "--steps", "3", "--out", "run3"]).expect(
        0,
        &["notice: --warmup 100 is not shorter than the 3-step schedule"],
    );
}

#[test]
fn resume_flags_that_would_change_the_run_are_refused() {
    let dir = scratch("resume");
    train(&dir, &["--steps", "4", "--out", "run"]).expect(0, &[]);
    let ck = "run/checkpoint.safetensors";
    let cases: &[(&[&str], i32, &[&str])] = &[
        (
            &["--steps", "3"],
            2,
            &[
                "invalid value `3` for --steps",
                "is at step 4: --steps must pass it",
            ],
        ),
        (&["--steps", "4"], 2, &["invalid value `4` for --steps"]),
        (
            &[],
            1,
            &[
                "is at step 4, the end of its 4-step schedule: nothing to train",
                "--steps N with N > 4",
            ],
        ),
        (
            &["--steps", "8", "--preset", "cp6"],
            2,
            &[
                "invalid value `cp6` for --preset",
                "`n_layers` is 2 there but 6 here",
                "drop --preset",
            ],
        ),
        (
            &["--steps", "8", "--lsh-as", "exact"],
            2,
            &[
                "invalid value `exact` for --lsh-as",
                "`attention` is local,lsh there but local,exact here",
            ],
        ),
        (
            &["--steps", "8", "--dropout", "0.1"],
            2,
            &[
                "invalid value `0.1` for --dropout",
                "(`dropout` is 0 there but 0.1 here)",
            ],
        ),
        (
            &["--steps", "8", "--seq-len", "64"],
            2,
            &[
                "invalid value `64` for --seq-len",
                "whose run has --seq-len 32",
            ],
        ),
        (
            &["--steps", "8", "--lr", "0.01"],
            2,
            &["invalid value `0.01` for --lr"],
        ),
        (
            &["--steps", "8", "--warmup", "5"],
            2,
            &["invalid value `5` for --warmup"],
        ),
        (&["--steps", "8", "--beta1", "0.8"], 2, &["for --beta1"]),
        (
            &["--steps", "8", "--seed", "3"],
            2,
            &["invalid value `3` for --seed"],
        ),
    ];
    let before = std::fs::read(dir.join(ck)).unwrap();
    for (flags, code, messages) in cases {
        let mut args = vec!["--resume", "--out", "run"];
        args.extend_from_slice(flags);
        train(&dir, &args).expect(*code, messages);
        assert_eq!(std::fs::read(dir.join(ck)).unwrap(), before, "{flags:?}");
    }
    // Repeating the run's own values is fine.
    train(
        &dir,
        &[
            "--resume",
            "--out",
            "run",
            "--steps",
            "6",
            "--preset",
            "tiny",
            "--seq-len",
            "32",
            "--warmup",
            "2",
        ],
    )
    .expect(
        0,
        &[
            "resuming run/checkpoint.safetensors at step 4",
            "schedule length changed from 4 to 6",
        ],
    );
    assert_eq!(
        steps(&metrics(&dir.join("run/metrics.csv"))),
        [1, 2, 3, 4, 5, 6]
    );
}

#[test]
fn paths_are_checked_first_and_named() {
    let dir = scratch("paths");
    std::fs::write(dir.join("file"), "not a folder").unwrap();
    let cases: &[(&[&str], i32, &str)] = &[
        (
            &["--text", "missing.txt", "--out", "run"],
            1,
            "--text missing.txt: no such file",
        ),
        (
            &["--text", ".", "--out", "run"],
            1,
            "--text .: is a folder, not a file",
        ),
        (
            &["--out", "file"],
            1,
            "--out file: exists and is not a folder",
        ),
        (
            &["--out", "file/sub"],
            1,
            "--out file/sub: cannot create the folder",
        ),
        (
            &["--resume", "nope.safetensors", "--out", "run"],
            1,
            "checkpoint nope.safetensors does not exist",
        ),
        (
            &["--resume", "--out", "run"],
            1,
            "checkpoint run/checkpoint.safetensors does not exist",
        ),
    ];
    for (flags, code, message) in cases {
        train(&dir, flags).expect(*code, &[message]);
    }
    #[cfg(target_os = "linux")]
    train(&dir, &["--out", "/proc/x"]).expect(1, &["--out /proc/x: cannot create the folder"]);
    assert!(!dir.join("run").exists());
    // The default text, where it is missing, says how to fetch it.
    run(
        &dir,
        "train_text",
        &["--preset", "tiny", "--seq-len", "32", "--device", "cpu"],
    )
    .expect(
        1,
        &[
            "data/shakespeare.txt",
            "scripts/fetch-shakespeare.sh",
            "--text FILE",
        ],
    );
}

// ---------------------------------------------------------------------------------------------
// held-out evaluation: train_text --eval-text and evaluate

/// The figure of `evaluate`'s stdout line (bits per byte), and its other fields.
fn evaluation(r: &Run) -> (f64, Vec<String>) {
    let fields: Vec<String> = r.stdout.trim().split('\t').map(str::to_string).collect();
    assert_eq!(fields.len(), 6, "stdout `{}`", r.stdout);
    (fields[0].parse().unwrap(), fields)
}

#[test]
fn evaluate_measures_a_checkpoint_as_train_text_validated_it() {
    let dir = scratch("evaluate");
    let corpus = std::fs::read(dir.join("t.txt")).unwrap();
    std::fs::write(dir.join("held.txt"), &corpus[..3_000]).unwrap();
    // Validation on --eval-text: its final figure is the checkpoint's on that file.
    let r = train(
        &dir,
        &["--eval-text", "held.txt", "--steps", "3", "--out", "run"],
    );
    r.expect(0, &["validation: 4 windows of 32 tokens of held.txt"]);
    let line = r
        .stderr
        .lines()
        .find(|l| l.starts_with("final validation: "))
        .expect("a final validation line");
    let trained: f64 = line["final validation: ".len()..]
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let ck = "run/checkpoint.safetensors";
    let flags = ["--checkpoint", ck, "--text", "held.txt", "--windows", "4"];
    let e = run(&dir, "evaluate", &flags);
    e.expect(0, &["held.txt", "bits/byte", "over 4 windows of 32 tokens"]);
    let (bpb, fields) = evaluation(&e);
    assert!((bpb - trained).abs() < 6e-5, "{bpb} vs {trained}");
    assert_eq!(&fields[2..], ["4", "32", "128", "2"]);
    // The rounds and the length are options; another length is another figure.
    let mut more = flags.to_vec();
    more.extend(["--rounds", "1", "--len", "16", "--batch", "2"]);
    let (other, fields) = evaluation(run(&dir, "evaluate", &more).expect(0, &[]));
    assert_eq!(&fields[2..], ["4", "16", "64", "1"]);
    assert_ne!(other, bpb);
}

#[test]
fn evaluate_names_what_is_wrong() {
    let dir = scratch("evaluate-errors");
    let ck = tiny_checkpoint(&dir);
    let ck = ck.to_str().unwrap();
    std::fs::write(dir.join("empty.txt"), "").unwrap();
    std::fs::write(dir.join("tiny.txt"), "0123456789").unwrap();
    let cases: &[(&[&str], i32, &[&str])] = &[
        (
            &["--text", "empty.txt"],
            1,
            &["text file empty.txt is empty"],
        ),
        (
            &["--text", "tiny.txt"],
            1,
            &["tiny.txt is too short", "10 bytes", "33 are needed"],
        ),
        (
            &["--text", "absent.txt"],
            1,
            &["--text absent.txt: no such file"],
        ),
        (
            &["--text", "t.txt", "--len", "300"],
            2,
            &["invalid value `300` for --len", "1..=256"],
        ),
        (&["--text", "t.txt", "--rounds", "0"], 2, &["--rounds"]),
        (&["--text", "t.txt", "--len", "-3"], 2, &["--len"]),
    ];
    for (flags, code, messages) in cases {
        let mut args = vec!["--checkpoint", ck];
        args.extend_from_slice(flags);
        let r = run(&dir, "evaluate", &args);
        r.expect(*code, messages);
        assert!(r.stdout.is_empty(), "no figure on an error: `{}`", r.stdout);
    }
    run(
        &dir,
        "evaluate",
        &["--checkpoint", "none.safetensors", "--text", "t.txt"],
    )
    .expect(1, &["none.safetensors does not exist"]);
    // train_text refuses a held-out file that holds no window before any work.
    train(&dir, &["--eval-text", "tiny.txt", "--out", "run"]).expect(
        2,
        &[
            "invalid value `32` for --eval-len",
            "--eval-text tiny.txt (10 bytes)",
        ],
    );
    train(&dir, &["--eval-text", "absent.txt", "--out", "run"])
        .expect(1, &["--eval-text absent.txt: no such file"]);
    assert!(!dir.join("run").exists());
}

// ---------------------------------------------------------------------------------------------
// generate

/// A tiny checkpoint at `dir/model/checkpoint.safetensors`.
fn tiny_checkpoint(dir: &Path) -> PathBuf {
    train(dir, &["--steps", "2", "--out", "model"]).expect(0, &[]);
    dir.join("model/checkpoint.safetensors")
}

#[test]
fn generate_stops_when_its_reader_goes() {
    // `generate ... | head -c 10`: a million bytes asked for, ten read.
    let dir = scratch("head");
    let ck = tiny_checkpoint(&dir);
    let t0 = Instant::now();
    let mut child = Command::new(tool("generate"))
        .arg("--checkpoint")
        .arg(&ck)
        .args(["--tokens", "1000000", "--prompt", "ROMEO."])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut ten = [0u8; 10];
    out.read_exact(&mut ten).unwrap();
    drop(out);
    let status = wait(child);
    assert_eq!(status.code(), Some(0), "{status:?}");
    assert_eq!(&ten[..6], b"ROMEO.");
    // A million bytes would take hours; stopping takes the bytes already in flight.
    assert!(t0.elapsed() < Duration::from_secs(60), "{:?}", t0.elapsed());
}

#[test]
fn generate_names_what_is_wrong() {
    let dir = scratch("generate");
    let ck = tiny_checkpoint(&dir);
    let ck = ck.to_str().unwrap();
    // A prompt past the context: said.
    let long = "a".repeat(300);
    let r = run(
        &dir,
        "generate",
        &["--checkpoint", ck, "--prompt", &long, "--tokens", "3"],
    );
    r.expect(
        0,
        &["notice: the prompt has 300 bytes, more than the model's context of 256: only its last 256 bytes"],
    );
    assert_eq!(r.stdout_len, 300 + 3 + 1, "prompt, 3 bytes, newline");

    // Any bytes from a file, also non-UTF-8; the speeds are said, with or without caches.
    let bytes = dir.join("prompt.bin");
    std::fs::write(&bytes, [0xffu8, 0xfe, b'\n', 0x80]).unwrap();
    let p = bytes.to_str().unwrap();
    for (extra, said) in [
        (None, "bytes/s)"),
        (Some("--no-cache"), "bytes/s), without caches"),
    ] {
        let mut args = vec!["--checkpoint", ck, "--prompt-file", p, "--tokens", "5"];
        args.extend(extra);
        let r = run(&dir, "generate", &args);
        r.expect(0, &["prefill: 4 bytes in", "decode: 4 bytes in", said]);
        assert_eq!(r.stdout_len, 4 + 5 + 1, "prompt, 5 bytes, newline");
    }
    run(
        &dir,
        "generate",
        &["--checkpoint", ck, "--prompt-file", "no/such/file"],
    )
    .expect(2, &["--prompt-file"]);

    let cases: &[(&[&str], i32, &str)] = &[
        (&["--temperature", "-1"], 2, "invalid value '-1' for '--temperature <TEMPERATURE>': expected a finite number in [0, 100]"),
        (&["--temperature", "nan"], 2, "invalid value 'nan' for '--temperature <TEMPERATURE>'"),
        (&["--top-k", "300"], 2, "invalid value '300' for '--top-k <TOP_K>': expected a whole number in 0..=256"),
        (&["--rounds", "0"], 2, "invalid value '0' for '--rounds <ROUNDS>': expected a whole number in 1..=64"),
        (&["--tokens", "-1"], 2, "invalid value '-1' for '--tokens <TOKENS>'"),
        (&["--prompt", ""], 2, "invalid value `` for --prompt: expected at least one byte"),
    ];
    for (flags, code, message) in cases {
        let mut args = vec!["--checkpoint", ck];
        args.extend_from_slice(flags);
        run(&dir, "generate", &args).expect(*code, &[message]);
    }
    // Checkpoints: missing (the default, with a hint), not ours, corrupt.
    run(&dir, "generate", &[]).expect(
        1,
        &[
            "checkpoint runs/train_text/checkpoint.safetensors does not exist",
            "train one with",
            "--checkpoint FILE",
        ],
    );
    let data = [0u8; 16];
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![4], &data).unwrap();
    std::fs::write(
        dir.join("foreign.safetensors"),
        safetensors::serialize([("weight", view)], None).unwrap(),
    )
    .unwrap();
    run(&dir, "generate", &["--checkpoint", "foreign.safetensors"]).expect(
        1,
        &["foreign.safetensors is a valid safetensors file but not a reformer checkpoint"],
    );
    std::fs::write(dir.join("junk.safetensors"), b"hello, world, this is text").unwrap();
    run(&dir, "generate", &["--checkpoint", "junk.safetensors"])
        .expect(1, &["checkpoint junk.safetensors is corrupt"]);
}

// ---------------------------------------------------------------------------------------------
// long_context

#[test]
fn long_context_checks_paths_and_sizes_first() {
    let dir = scratch("long");
    // The tiny preset on 64 tokens, unless `extra` gives its own --len.
    let with = |extra: &[&str]| {
        let mut a = vec!["--preset", "tiny", "--device", "cpu"];
        if !extra.contains(&"--len") {
            a.extend(["--len", "64"]);
        }
        a.extend_from_slice(extra);
        run(&dir, "long_context", &a)
    };
    // --json: failing before the run, not after it.
    let r = with(&["--json", "no/such/dir/out.json"]);
    r.expect(1, &["--json no/such/dir/out.json: cannot be written"]);
    assert!(
        r.stdout.is_empty(),
        "no work before the error: {}",
        r.stdout
    );
    let r = with(&["--text", "missing.txt"]);
    r.expect(1, &["--text missing.txt: no such file"]);
    assert!(r.stdout.is_empty());
    for (budget, message) in [
        (
            "--mem-budget=-1GiB",
            "invalid value '-1GiB' for '--mem-budget <MEM_BUDGET>'",
        ),
        ("--mem-budget=-1GiB", "a size cannot be negative"),
        ("--mem-budget=12XB", "unknown unit `xb`"),
        ("--mem-budget=0", "from 1 byte to 8 PiB"),
        ("--mem-budget=nanGiB", "expected a positive size"),
    ] {
        with(&[budget]).expect(2, &[message]);
    }
    with(&["--mem-budget", "-1GiB"]).expect(2, &["a size cannot be negative"]);
    with(&["--len", "0"]).expect(2, &["invalid value '0' for '--len <LEN>'"]);
    with(&["--len", "100000"]).expect(
        2,
        &["invalid value `100000` for --len: expected a whole number in 1..=256, what the tiny preset serves"],
    );
    with(&["--rounds", "0"]).expect(2, &["invalid value '0' for '--rounds <ROUNDS>'"]);
    with(&["--layers", "0"]).expect(2, &["invalid value '0' for '--layers <LAYERS>'"]);
    // And a good run writes its summary.
    let r = with(&["--json", "ok.json", "--mem-budget=64MiB"]);
    r.expect(0, &[]);
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("ok.json")).unwrap()).unwrap();
    assert_eq!(summary["len"], 64);
    assert_eq!(summary["budget_bytes"], 64 << 20);
}

// ---------------------------------------------------------------------------------------------
// bench_attention

#[test]
fn bench_attention_takes_flag_equals_value_like_the_other_tools() {
    let dir = scratch("bench");
    let r = run(
        &dir,
        "bench_attention",
        &[
            "--device=cpu",
            "--min-log2=6",
            "--max-log2=7",
            "--rounds=1,2",
            "--exact-budget=30",
            "--reps=1",
            "--no-local",
            "--out=out",
        ],
    );
    r.expect(0, &[]);
    let csv = std::fs::read_to_string(dir.join("out/attention.csv")).unwrap();
    // Header + exact, lsh r=1, lsh r=2 at two lengths.
    assert_eq!(csv.lines().count(), 1 + 3 * 2, "{csv}");
    assert!(r.stdout.contains("wrote out/attention.csv"), "{}", r.stdout);
    // A budget of 0 skips exact attention, and says so.
    let r = run(
        &dir,
        "bench_attention",
        &[
            "--device",
            "cpu",
            "--min-log2",
            "6",
            "--max-log2",
            "6",
            "--rounds",
            "1",
            "--exact-budget",
            "0",
            "--reps",
            "1",
            "--out",
            "out0",
        ],
    );
    r.expect(0, &[]);
    assert!(
        r.stdout
            .contains("(exact attention skipped: --exact-budget 0)"),
        "{}",
        r.stdout
    );
}

#[test]
fn bench_attention_refuses_nonsense() {
    let dir = scratch("bench-bad");
    let cases: &[(&[&str], i32, &str)] = &[
        (&["--exact-budget", "nan"], 2, "invalid value 'nan' for '--exact-budget <EXACT_BUDGET>': expected a finite number in [0, 1000000000]"),
        (&["--exact-budget", "-1"], 2, "invalid value '-1' for '--exact-budget <EXACT_BUDGET>'"),
        (&["--exact-budget=inf"], 2, "invalid value 'inf' for '--exact-budget <EXACT_BUDGET>'"),
        (&["--min-log2", "12", "--max-log2", "10"], 2, "invalid value `12` for --min-log2: expected at most --max-log2 (10)"),
        (&["--max-log2", "31"], 2, "invalid value '31' for '--max-log2 <MAX_LOG2>': expected a whole number in 0..=30"),
        (&["--rounds", "1,0"], 2, "invalid value '0' for '--rounds <ROUNDS>'"),
        (&["--reps", "0"], 2, "invalid value '0' for '--reps <REPS>'"),
        (&["--heads=0"], 2, "invalid value '0' for '--heads <HEADS>'"),
        (&["--device", "tpu"], 2, "invalid value 'tpu' for '--device <DEVICE>'"),
        (&["--dtype", "bf16", "--device", "cpu"], 2, "invalid value `bf16` for --dtype: not with --device cpu"),
        (&["--frobnicate"], 2, "unexpected argument '--frobnicate'"),
        (&["--also", "missing.json"], 1, "--also missing.json"),
        (&["--out", "file/sub"], 1, "--out file/sub: cannot create the folder"),
    ];
    std::fs::write(dir.join("file"), "x").unwrap();
    for (flags, code, message) in cases {
        let r = run(&dir, "bench_attention", flags);
        r.expect(*code, &[message]);
        assert!(
            !r.stdout.contains(" exact "),
            "{flags:?}: no measurement before the error"
        );
    }
}
