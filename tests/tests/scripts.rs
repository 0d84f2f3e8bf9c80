//! The README's `scripts/run`, as a new user runs it: with no option it boots the
//! default guests (the two EL1 test-guest VMs of `docs/examples/two-test-guests.dts`),
//! which pass their checks, and the run powers off with success; from a fresh clone it
//! installs and builds what it needs by itself.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use integration::{out_dir, root, run_script, Run};

fn assert_default_guests_passed(r: &Run) {
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
fn scripts_run_boots_the_default_guests() {
    // The images are built by `cargo xtask test` before the integration tests run.
    let r = run_script("scripts/run", &["--no-build"], Duration::from_secs(120));
    assert_default_guests_passed(&r);
}

#[test]
fn scripts_run_bare_boots_without_guests() {
    let r = run_script(
        "scripts/run",
        &["--no-build", "--bare", "--machine-cpus", "2"],
        Duration::from_secs(60),
    );
    r.assert_success();
    r.assert_no_line("VM alpha created");
    r.assert_lines_in_order(&["all 2 CPUs online"]);
}

/// Bad options and missing files get a one-line error naming them, and status 2.
#[test]
fn scripts_run_explains_bad_options() {
    for (args, says) in [
        (&["--no-build", "--cpus", "2"][..], "--linux|--kernel"),
        (
            &["--no-build", "--kernel", "/no/such/Image"],
            "no kernel file '/no/such/Image'",
        ),
        (
            &["--no-build", "--linux", "--kernel", "x"],
            "cannot be used with",
        ),
        (
            &["--no-build", "--kernel", "Cargo.toml", "--mem", "lots"],
            "'lots' is not a size",
        ),
        // Sizes and counts the machine's RAM is computed from, before any check of the
        // kernel: an error, not an overflow or an allocation per requested VM.
        (
            &[
                "--no-build",
                "--kernel",
                "Cargo.toml",
                "--mem",
                "17179869182G",
            ],
            "do not fit in the address space",
        ),
        (
            &[
                "--no-build",
                "--kernel",
                "Cargo.toml",
                "--vms-count",
                "4000000000",
            ],
            "the hypervisor brings up",
        ),
        (
            &[
                "--no-build",
                "--kernel",
                "Cargo.toml",
                "--abort-policy",
                "x",
            ],
            "possible values: inject, stop",
        ),
        (
            &["--no-build", "--vms", "/no/such.dts"],
            "no VM description file '/no/such.dts'",
        ),
        (&["--no-build", "--load", "x@0x1000"], "--vms"),
    ] {
        let r = run_script("scripts/run", args, Duration::from_secs(60));
        assert_eq!(r.status, Some(2), "{args:?}\n{}{}", r.stdout, r.stderr);
        assert!(
            r.stderr.contains(says),
            "{args:?}: no {says:?} in\n{}",
            r.stderr
        );
    }
    for args in [&["--help"][..], &["--kernel", "x", "--help"]] {
        let r = run_script("scripts/run", args, Duration::from_secs(60));
        r.assert_success();
        for option in [
            "--cpus",
            "--mem",
            "--cpu",
            "--gic-version",
            "--abort-policy",
            "--device",
            "--machine-opt",
        ] {
            assert!(
                r.stdout.contains(option),
                "{args:?}: {option} not in\n{}",
                r.stdout
            );
        }
    }
}

/// The device tree the xtask writes is the one of the machine QEMU runs, options and
/// extra arguments included: the hypervisor finds the GIC version asked for, and an ITS
/// turned off by an extra `-machine` argument is gone from the tree.
#[test]
fn machine_options_and_extra_arguments_reach_the_device_tree() {
    let its = |dtb: &Path| {
        let blob = std::fs::read(dtb).expect("the written DTB");
        let tree = xtask::dt::DeviceTree::from_dtb(&blob).expect("a DTB");
        tree.root.find_compatible(&["arm,gic-v3-its"]).is_some()
    };
    let dir = std::env::temp_dir().join(format!("twostage-run-{}", std::process::id()));
    let dir_arg = dir.to_str().expect("a UTF-8 temporary directory");
    let dtb = dir.join("host.dtb");
    let r = run_script(
        "scripts/run",
        &["--no-build", "--gic-version", "2"],
        Duration::from_secs(120),
    );
    // The option reached the machine; VMs need a GICv3's virtual CPU interface.
    r.assert_status(xtask::process::exit_status::STARTUP);
    r.assert_lines_in_order(&["gic: v2 distributor", "VMs need a GICv3"]);
    let r = run_script(
        "scripts/run",
        &["--no-build", "--run-dir", dir_arg],
        Duration::from_secs(120),
    );
    assert_default_guests_passed(&r);
    r.assert_lines_in_order(&["gic: v3 distributor"]);
    assert!(its(&dtb), "QEMU virt has an ITS by default");
    let r = run_script(
        "scripts/run",
        &[
            "--no-build",
            "--run-dir",
            dir_arg,
            "--",
            "-machine",
            "its=off",
        ],
        Duration::from_secs(120),
    );
    assert_default_guests_passed(&r);
    let written = its(&dtb);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        !written,
        "the extra -machine its=off did not reach the device tree"
    );
}

/// Every command the set-up provides comes from the package `scripts/setup` names for it
/// (`dpkg -S` on the installed file): nothing works only because an unnamed package
/// happens to be installed.
#[test]
fn setup_names_the_package_of_every_command() {
    let setup = std::fs::read_to_string(root().join("scripts/setup")).expect("scripts/setup");
    let pairs: Vec<(&str, &str)> = setup
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            let (cmd, pkg) = l.strip_prefix('[')?.split_once("]=")?;
            Some((cmd, pkg.trim()))
        })
        .collect();
    assert!(
        pairs.len() >= 3,
        "no [command]=package lines in scripts/setup"
    );
    for (cmd, pkg) in pairs {
        // The pattern matches /bin/CMD and /usr/bin/CMD alike (merged /usr).
        let out = Command::new("dpkg")
            .args(["-S", &format!("*/bin/{cmd}")])
            .output()
            .expect("dpkg");
        let out = String::from_utf8_lossy(&out.stdout).into_owned();
        let owners: Vec<&str> = out
            .lines()
            .filter(|l| l.ends_with(&format!("/bin/{cmd}")))
            .filter_map(|l| l.split(": ").next())
            .flat_map(|o| o.split(", "))
            .map(|o| o.split(':').next().unwrap_or(o))
            .collect();
        assert!(
            owners.contains(&pkg),
            "{cmd} comes from {owners:?}, scripts/setup says {pkg}"
        );
    }
}

/// The README's first command on a fresh clone of the committed tree: scripts/run
/// installs what is missing, builds only what it needs and boots the default guests.
/// (It clones HEAD: uncommitted changes are not part of it.)
#[test]
fn scripts_run_works_from_a_fresh_clone() {
    let clone = out_dir().join("fresh-clone");
    let _ = std::fs::remove_dir_all(&clone);
    let st = Command::new("git")
        .args(["clone", "--quiet", "--no-hardlinks"])
        .arg(root())
        .arg(&clone)
        .status()
        .expect("git");
    assert!(st.success(), "git clone failed");
    let mut command = Command::new(clone.join("scripts/run"));
    command
        .current_dir(&clone)
        .env_remove("TWOSTAGE_OUT")
        .env_remove("CARGO_TARGET_DIR");
    let r = xtask::process::run_captured(command, Duration::from_secs(1200))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_default_guests_passed(&r);
    // It built from nothing: the clone's own images, and only the ones it needs.
    let out = clone.join("out");
    for image in ["hypervisor.bin", "test-guest.bin"] {
        assert!(out.join(image).is_file(), "no {image} in {}", out.display());
    }
    assert!(
        !out.join("hypervisor-fault-panic.bin").exists(),
        "scripts/run built a test-only image"
    );
    assert!(
        r.stderr.contains("xtask: building hypervisor"),
        "{}",
        r.stderr
    );
    let _ = std::fs::remove_dir_all(Path::new(&clone));
}
