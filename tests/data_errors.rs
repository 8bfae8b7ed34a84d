//! The data pipeline: typed errors that name the file and the lengths; the split; seeded
//! windows that depend only on (seed, step).

use std::path::PathBuf;

use reformer::data::{DataError, TextData};

fn temp_file(name: &str, contents: &[u8]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("reformer-data-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap();
    path
}

#[test]
fn missing_empty_and_short_files_are_typed_errors() {
    let missing = std::env::temp_dir().join("reformer-no-such-file.txt");
    let err = TextData::load(&missing, 0.05, 16).unwrap_err();
    assert!(matches!(err, DataError::Missing { .. }), "{err}");
    assert!(err.to_string().contains("reformer-no-such-file.txt"));

    let empty = temp_file("empty.txt", b"");
    let err = TextData::load(&empty, 0.05, 16).unwrap_err();
    assert!(matches!(err, DataError::Empty { .. }), "{err}");

    // 20 bytes, 1 held out: 19 for training, a sequence of 32 needs 33.
    let short = temp_file("short.txt", &[b'x'; 20]);
    let err = TextData::load(&short, 0.05, 32).unwrap_err();
    match &err {
        DataError::TooShort {
            len, need, seq_len, ..
        } => {
            assert_eq!((*len, *need, *seq_len), (19, 33, 32));
        }
        other => panic!("expected TooShort, got {other}"),
    }
    let msg = err.to_string();
    assert!(
        msg.contains("19") && msg.contains("33") && msg.contains("short.txt"),
        "{msg}"
    );

    // Exactly long enough: fine.
    let ok = temp_file("ok.txt", &[b'y'; 40]);
    let data = TextData::load(&ok, 0.05, 37).unwrap();
    assert_eq!(data.train.len(), 38);
    assert_eq!(data.valid.len(), 2);

    assert!(matches!(
        TextData::load(&ok, 1.5, 8),
        Err(DataError::Invalid(_))
    ));
}

#[test]
fn split_and_windows_are_deterministic() {
    let text: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
    let path = temp_file("numbers.bin", &text);
    let data = TextData::load(&path, 0.05, 64).unwrap();
    assert_eq!(data.valid.len(), 500);
    assert_eq!(data.train.len(), 9_500);
    assert_eq!(&data.valid[..], &text[9_500..]);

    let a = data.train_window(7, 3, 64).unwrap().to_vec();
    let b = data.train_window(7, 3, 64).unwrap().to_vec();
    let c = data.train_window(7, 4, 64).unwrap().to_vec();
    assert_eq!(a, b);
    assert_ne!(a, c);
    assert_eq!(a.len(), 65);
    // Windows cover the training part, including its very end, over many steps.
    let mut max_end = 0;
    for step in 0..2_000 {
        let w = data.train_window(1, step, 64).unwrap();
        let start = w.as_ptr() as usize - data.train.as_ptr() as usize;
        max_end = max_end.max(start + w.len());
        assert!(start + w.len() <= data.train.len());
    }
    assert!(max_end > data.train.len() - 20);

    let windows = data.valid_windows(64, 4);
    assert_eq!(windows.len(), 4);
    assert!(windows.iter().all(|w| w.len() == 65));
    assert_eq!(windows[3].as_ptr_range().end, data.valid.as_ptr_range().end);
    // A validation part shorter than a sequence gives one shorter window.
    let windows = data.valid_windows(4_096, 4);
    assert_eq!(windows.len(), 1);
    assert_eq!(windows[0].len(), 500);
}
