//! The messages the typed variants print, and that each reason is said once.

use super::*;

fn qemu_refused() -> qsnap_qmp::Error {
    qsnap_qmp::Error::Qemu {
        command: "migrate-set-capabilities".into(),
        class: "GenericError".into(),
        desc: "Background-snapshot is not supported by guest memory configuration".into(),
    }
}

/// The typed refusals say word for word what the old stringly `Unsupported` variant said.
#[test]
fn typed_refusals_keep_their_messages() {
    let v = "8.2.2".to_string();
    let cases: Vec<(Error, String)> = vec![
        (
            Error::QemuLacks { feature: QemuFeature::BackgroundSnapshot, version: v.clone() },
            format!("point-in-time snapshots need background-snapshot, which QEMU {v} lacks; use --mode precopy"),
        ),
        (
            Error::QemuLacks { feature: QemuFeature::PausedBackgroundSnapshot, version: v.clone() },
            format!("QEMU {v} (< 9.0) would resume this paused VM during a point-in-time snapshot; use --mode precopy"),
        ),
        (
            Error::QemuLacks { feature: QemuFeature::MappedRam { snapshot: "s1".into() }, version: v.clone() },
            format!("loading snapshot s1: it was saved in QEMU's mapped-ram format, which this QEMU ({v}) cannot read; start the VM with QEMU ≥ 9.0 (snapshots taken with --no-mapped-ram load on any QEMU)"),
        ),
        (
            Error::QemuLacks { feature: QemuFeature::LazyRam, version: v.clone() },
            format!("lazy RAM needs QEMU ≥ 8.2 (x-ignore-shared, file: migration, a read-only private RAM mapping); this is QEMU {v}"),
        ),
        (
            Error::ForeignJob { job: "theirs".into() },
            "block-stream job theirs has ended but is not dismissed, and QEMU crashes when asked \
             for its block nodes in that state (a QEMU bug); its owner should dismiss it \
             (`job-dismiss`), then run qsnap again".into(),
        ),
        (
            Error::RemoveRefused { vm: "a".into(), reason: RemoveRefusal::NotAClone },
            "removing a: it is not a clone, and its overlays hold what its guest wrote; `qsnap delete a --all` merges them into its images".into(),
        ),
        (
            Error::RemoveRefused { vm: "a".into(), reason: RemoveRefusal::InUse { by: "b".into(), image: "/i/x.qcow2".into() } },
            "removing a: b runs on /i/x.qcow2 (a clone of one of its snapshots); remove b first".into(),
        ),
        (
            DeleteError::Refused { snapshot: "s1".into(), why: "it is in use".into() }.into(),
            "cannot delete s1: it is in use; nothing was changed".into(),
        ),
        (
            DeleteError::MergeUnfinished { vm: "g".into(), snapshots: vec!["s1".into(), "s2".into()], problem: Box::new(Error::Cancelled) }.into(),
            "s1, s2 deleted, but merging the layers left behind did not finish (cancelled; everything was rolled back); nothing is lost: `qsnap check g --repair` merges them".into(),
        ),
        (
            CreateError::QuiesceNeedsDiskOnly.into(),
            "quiescing is for disk-only snapshots: a memory snapshot already holds what the guest has not written, and would save its filesystems frozen".into(),
        ),
        (
            CreateError::CannotWriteProtect { qemu: qemu_refused() }.into(),
            format!("a point-in-time snapshot: QEMU cannot write-protect this VM's RAM ({}); a VM reverted lazily maps its RAM from a snapshot's image, which allows precopy snapshots only — use --mode precopy (or auto)", qemu_refused()),
        ),
        (
            LazyRamError::Refused { snapshot: "s1".into(), reason: LazyRamRefusal::NoSpace { free: 10 << 20, need: 200 << 20 } }.into(),
            "lazy RAM for snapshot s1: the memory directory has 10 MiB free; the RAM image needs about 200 MiB".into(),
        ),
        (
            LazyRamError::Refused { snapshot: "s1".into(), reason: LazyRamRefusal::DiskOnly }.into(),
            "lazy RAM for snapshot s1: it is a disk-only snapshot (no memory to map)".into(),
        ),
        (
            LazyRamError::Refused { snapshot: "s1".into(), reason: LazyRamRefusal::CommandLine { why: "no memory backend".into() } }.into(),
            "lazy RAM for snapshot s1: no memory backend".into(),
        ),
        (
            LazyRamError::Refused { snapshot: "s1".into(), reason: LazyRamRefusal::MemoryFileNotWhole { problem: Box::new(Error::Cancelled) } }.into(),
            "lazy RAM for snapshot s1: its memory file is not whole: cancelled; everything was rolled back".into(),
        ),
        (
            LazyRamError::Leftover { path: "/m/s1.ram".into(), vm: "a".into() }.into(),
            "/m/s1.ram exists but no snapshot names it (an interrupted lazy-ram?); `qsnap check a --repair` removes it".into(),
        ),
        (
            LazyRamError::HelperCommandLine { why: "x".into() }.into(),
            "lazy RAM: x".into(),
        ),
        (
            LazyRamError::NotDurable { vm: "a".into(), snapshot: "s1".into(), problem: Box::new(Error::Cancelled) }.into(),
            "the manifest names the RAM image, but that could not be made durable (cancelled; everything was rolled back); every memory file of s1 is kept, and `qsnap check a --repair` removes the one the manifest does not name".into(),
        ),
        (
            LazyRamError::SwitchUnknown { snapshot: "s1".into(), problem: Box::new(Error::Cancelled) }.into(),
            "the manifest could not be read back (cancelled; everything was rolled back), so whether it names the stream or the RAM image is unknown; every memory file of s1 is kept".into(),
        ),
    ];
    for (err, want) in cases {
        assert_eq!(err.to_string(), want, "{err:?}");
    }
}

/// A reason wrapped in an engine error is said once: in the message, not again as its
/// `source()` (the CLI prints the chain).
#[test]
fn the_chain_says_each_reason_once() {
    use std::error::Error as _;
    let io = Error::Io {
        what: "writing the manifest",
        path: "/s/m.json".into(),
        source: std::io::Error::from_raw_os_error(28),
    };
    assert!(io.to_string().contains("No space left on device"), "{io}");
    assert!(io.source().is_none());
    let qmp = Error::qmp("setting migration capabilities")(qemu_refused());
    assert_eq!(
        qmp.to_string(),
        format!("setting migration capabilities: {}", qemu_refused())
    );
    assert!(qmp.source().is_none());
    let create: Error = CreateError::TakenBut {
        vm: "a".into(),
        snapshot: "s1".into(),
        problem: Box::new(io),
        journaled: true,
    }
    .into();
    assert!(
        create.to_string().contains("No space left on device"),
        "{create}"
    );
    assert!(create.source().is_none());
    let connect = qsnap_qmp::Error::Connect {
        endpoint: "/run/q.sock".into(),
        io: std::io::Error::from_raw_os_error(2),
    };
    assert!(connect.source().is_none());
}

/// A command whose answer could not be read ran (QEMU answered): undo paths treat it like one
/// that timed out — look at QEMU's state — never as a refusal that changed nothing.
#[test]
fn an_unreadable_answer_may_have_run_like_a_timeout() {
    let unreadable = Error::qmp("pausing the guest")(qsnap_qmp::Error::Unreadable {
        command: "stop".into(),
        reason: "nested 600 levels deep".into(),
    });
    assert!(unreadable.may_have_run());
    assert!(!unreadable.is_timeout());
    let timeout = Error::qmp("pausing the guest")(qsnap_qmp::Error::Timeout {
        command: "stop".into(),
        after: std::time::Duration::from_secs(30),
    });
    assert!(timeout.may_have_run() && timeout.is_timeout());
    assert!(!Error::qmp("pausing the guest")(qemu_refused()).may_have_run());
}
