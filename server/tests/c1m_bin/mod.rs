//! The operators' tools binary, `c1m` (`token`, `push`, `watch-events`;
//! package c1m-tools), beside the server's in the same target directory.
//! `cargo test` at the workspace root builds it (c1m-tools has tests of its
//! own); a run of this package alone (`cargo test -p c1m-server`) builds it
//! here when it is missing.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

pub fn c1m_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let server = Path::new(env!("CARGO_BIN_EXE_server"));
        let bin = server.with_file_name("c1m");
        if !bin.exists() {
            let release = server
                .parent()
                .and_then(Path::file_name)
                .is_some_and(|p| p == "release");
            let mut cmd = Command::new(env!("CARGO"));
            cmd.args(["build", "-p", "c1m-tools", "--bin", "c1m"]);
            if release {
                cmd.arg("--release");
            }
            assert!(
                cmd.status().expect("cargo build").success(),
                "building the c1m tools failed"
            );
        }
        bin
    })
}
