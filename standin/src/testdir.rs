//! Test-only: a temporary directory removed when dropped (the unit tests' scratch space).

use std::path::PathBuf;

/// A directory under the system temp dir, removed on drop.
pub struct Tmp(pub PathBuf);

impl Drop for Tmp {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A fresh, empty `fc-standin-<tag>-<pid>` directory.
pub fn tmp(tag: &str) -> Tmp {
    let d = std::env::temp_dir().join(format!("fc-standin-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("creating a test directory");
    Tmp(d)
}
