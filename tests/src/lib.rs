//! # qsnap-testkit — the rig that runs qsnap against a real QEMU and a real guest
//!
//! - `guest`: the test guest (Debian kernel + busybox initramfs whose `/init` keeps a counter in
//!   memory and in the first disk sector, see `tests/guest/init.sh`), built once and cached.
//! - `fixture`: a QEMU process owned by a test: own temp dir, own QMP socket, killed on drop,
//!   with QEMU's stderr and the serial console kept for the failure report.
//! - `restore`: loads a snapshot's memory into a fresh QEMU with plain QMP, to check it.
//! - `serial`: the serial console as timestamped lines, with bounded waits for `tick N`.
//! - `json_output`: every `--json` output a test gets, checked against its schema in
//!   `docs/json/`.
//! - `accounting`: what a store should hold (the chains it needs, the memory files its
//!   snapshots name), read from `qsnap list --json`, for tests that account for every file.
//! - `powercut`: a FUSE filesystem that loses what a host power loss loses (unsynced data,
//!   unsynced directory entries), cut after any numbered fsync/rename/create, for crash tests.
//! - `seaweed`: a real SeaweedFS (`weed mini`, or a master + two volume servers + filer/S3
//!   cluster) owned by one test, on loopback ports of its own, for the object-store tests;
//!   [`require_weed!`] skips loudly without it locally and fails under CI.
//! - [`require_qemu!`]: a loud skip when QEMU is missing locally, a failure under CI.
//!
//! Nothing here may wait without a deadline: a hung QEMU must fail one test, not the run.
#![deny(missing_docs)]

pub mod accounting;
pub mod disk_io;
pub mod fixture;
pub mod guest;
pub mod json_output;
pub mod powercut;
pub mod restore;
pub mod seaweed;
pub mod serial;

pub use fixture::{
    create_image, kvm_available, qemu_binary, Accel, DiskSpec, DiskStyle, Firmware, Vm, VmBuilder,
};
pub use guest::GuestKit;
pub use seaweed::Seaweed;
pub use serial::SerialLog;

use std::path::PathBuf;

/// The workspace root (parent of this crate's folder).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the workspace")
        .to_owned()
}

/// True when running under CI (`CI` set to anything but `false`/`0`/empty).
pub fn under_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0")
}

/// Sends test logs (`RUST_LOG`) to the test's captured output. Safe to call many times.
pub fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
}

/// Why QEMU cannot be used here, or `None` when it can.
pub fn qemu_missing() -> Option<String> {
    let bin = qemu_binary();
    match std::process::Command::new(&bin).arg("--version").output() {
        Ok(out) if out.status.success() => None,
        Ok(out) => Some(format!(
            "{bin} --version failed: {}",
            String::from_utf8_lossy(&out.stderr)
        )),
        Err(e) => Some(format!("{bin} not runnable: {e}")),
    }
}

/// Returns from the test with a loud notice when QEMU is missing; panics instead under CI,
/// where a missing QEMU is a broken set-up, not a reason to pass.
#[macro_export]
macro_rules! require_qemu {
    () => {
        if let Some(why) = $crate::qemu_missing() {
            if $crate::under_ci() {
                panic!("QEMU is required under CI: {why}");
            }
            eprintln!(
                "\n*** SKIPPED {}: {why} (run tests/guest/install-deps.sh) ***\n",
                module_path!()
            );
            return;
        }
    };
}

/// Whether this test may use KVM. Locally a missing or unusable `/dev/kvm` skips the test
/// with a loud notice; under `CI` (root, with `/dev/kvm`) it is a failure, not a pass.
pub fn kvm_or_skip(test: &str) -> bool {
    if fixture::kvm_available() {
        return true;
    }
    assert!(
        !under_ci(),
        "{test}: /dev/kvm is not usable, and CI must run the KVM tests"
    );
    eprintln!("\n*** SKIPPED {test}: /dev/kvm is not usable here (the CI machine has it) ***\n");
    false
}

/// Whether this test runs as root (mounts, other users' processes). Locally not being root
/// skips it loudly; under `CI`, which runs as root, it is a failure.
pub fn root_or_skip(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    assert!(!under_ci(), "{test}: needs root, and CI runs as root");
    eprintln!("\n*** SKIPPED {test}: needs root (CI runs as root) ***\n");
    false
}

/// A KVM test's VM could not start (`report` says why): a loud skip locally, a failure under
/// `CI`, where KVM works.
pub fn kvm_vm_failed(test: &str, report: &str) {
    assert!(
        !under_ci(),
        "{test}: KVM could not start the VM under CI:\n{report}"
    );
    eprintln!("\n*** SKIPPED {test}: KVM could not start the VM here:\n{report} ***\n");
}

/// QEMU 7.2 from `tests/qemu-old/fetch.sh` (no `file:` migration; its background snapshot
/// resumes the guest by itself), when fetched. Under `CI` its absence is a failure.
pub fn old_qemu() -> Option<PathBuf> {
    let dir = std::env::var_os("QSNAP_OLD_QEMU_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/qemu-7.2"));
    let wrapper = dir.join("qemu-system-x86_64");
    if wrapper.exists() {
        return Some(wrapper);
    }
    assert!(
        !under_ci(),
        "QEMU 7.2 is missing under CI: run tests/qemu-old/fetch.sh"
    );
    eprintln!(
        "SKIPPED: QEMU 7.2 is not fetched ({}); run tests/qemu-old/fetch.sh to test old QEMU",
        wrapper.display()
    );
    None
}

/// Kills, when dropped, the QEMU that a qsnap store records for a VM: VMs started through
/// `qsnap run`/`Engine::run` are detached from the test, so a failing test must not leak them.
/// Reads the record at drop time (a revert changes the pid).
#[derive(Debug)]
pub struct KillRecordedQemu {
    record: PathBuf,
}

impl KillRecordedQemu {
    /// Guards VM `vm` of the store at `store`.
    pub fn new(store: &std::path::Path, vm: &str) -> Self {
        KillRecordedQemu {
            record: store.join("vms").join(vm).join("vm.json"),
        }
    }
}

impl Drop for KillRecordedQemu {
    fn drop(&mut self) {
        let Some(record) = std::fs::read(&self.record)
            .ok()
            .and_then(|t| serde_json::from_slice::<serde_json::Value>(&t).ok())
        else {
            return;
        };
        let Some(pid) = record["pid"].as_i64() else {
            return;
        };
        let is_qemu = std::fs::read(format!("/proc/{pid}/cmdline"))
            .map(|c| String::from_utf8_lossy(&c).contains("qemu"))
            .unwrap_or(false);
        // The same process the record names, not a QEMU of another test that was given its
        // number since (a record a power cut rolled back names a long-dead pid).
        let same = match record["pid-start"].as_u64() {
            Some(start) => u32::try_from(pid)
                .ok()
                .and_then(powercut::procs::stat)
                .is_some_and(|st| st.starttime == start),
            None => true,
        };
        if let (true, true, Ok(pid)) = (is_qemu, same, i32::try_from(pid)) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// The failpoints of a `failpoints` build of the engine, for one test (dropping it clears
/// them). Panics when the engine was built without them: `scripts/test.sh` builds with them,
/// and a fault-injection test that cannot inject is a failure, not a pass.
pub fn failpoints() -> fail::FailScenario<'static> {
    assert!(
        failpoints_enabled(),
        "this test needs the engine's failpoints: run it through scripts/test.sh (cargo ... --features qsnap-engine/failpoints)"
    );
    fail::FailScenario::setup()
}

/// Whether this test can inject faults. Locally a build without the engine's failpoints skips
/// it with a loud notice; under `CI` (which runs `scripts/test.sh`, building them in) it is a
/// failure, not a pass.
pub fn failpoints_or_skip(test: &str) -> bool {
    if failpoints_enabled() {
        return true;
    }
    assert!(
        !under_ci(),
        "{test}: the engine's failpoints are off under CI"
    );
    eprintln!(
        "\n*** SKIPPED {test}: build with --features qsnap-engine/failpoints (scripts/test.sh does) ***\n"
    );
    false
}

/// Whether the failpoints are compiled in (the `fail` crate's `failpoints` feature, which the
/// engine's `failpoints` feature turns on).
pub fn failpoints_enabled() -> bool {
    fail::has_failpoints()
}
