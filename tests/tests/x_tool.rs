//! The `x` task runner refuses what it does not know.

use std::process::Command;
use std::time::Duration;

use porthole_tests::{repo_root, run, text};

#[test]
fn unknown_command_prints_usage_and_fails() {
    let out = run(Command::new(repo_root().join("x")).arg("frobnicate"), Duration::from_secs(10));
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("unknown command: frobnicate") && stderr.contains("Usage: ./x COMMAND"), "{stderr}");
}

#[test]
fn no_command_prints_usage_and_fails() {
    let out = run(&mut Command::new(repo_root().join("x")), Duration::from_secs(10));
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("Usage: ./x COMMAND"));
}

#[test]
fn help_succeeds() {
    let out = run(Command::new(repo_root().join("x")).arg("help"), Duration::from_secs(10));
    assert!(out.status.success());
    assert!(text(&out.stdout).contains("test-real"));
}
