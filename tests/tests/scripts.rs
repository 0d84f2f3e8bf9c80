//! The README's `scripts/run`, as a new user runs it: with no option it boots the
//! default guests (the two EL1 test-guest VMs of `docs/examples/two-test-guests.dts`),
//! which pass their checks, and the run powers off with success.

use std::time::Duration;

use integration::run_script;

#[test]
fn scripts_run_boots_the_default_guests() {
    // The images are built by scripts/build before the integration tests run.
    let r = run_script("scripts/run", &["--no-build"], Duration::from_secs(120));
    r.assert_success();
    for vm in ["alpha", "beta"] {
        r.assert_lines_in_order(&[
            &format!("VM {vm} created"),
            &format!("[{vm}] DONE pass="),
            &format!("VM {vm} powered off"),
        ]);
        assert!(
            r.lines_containing(&format!("[{vm}] FAIL")).is_empty(),
            "{vm} reported a failed check\n{}",
            r.stdout
        );
    }
    r.assert_lines_in_order(&["[beta] PASS injected-abort", "all VMs done: success"]);
}

#[test]
fn scripts_run_bare_boots_without_guests() {
    let r = run_script(
        "scripts/run",
        &["--no-build", "--bare", "--cpus", "2"],
        Duration::from_secs(60),
    );
    r.assert_success();
    r.assert_no_line("VM alpha created");
    r.assert_lines_in_order(&["all 2 CPUs online"]);
}
