//! The QMP client against a real QEMU: negotiation, concurrency, errors, events, disconnects,
//! timeouts, fd passing and schema probing. Kernel-less VMs start in milliseconds, so each test
//! gets its own QEMU.

use nix::sys::signal::Signal;
use qsnap_qmp::{types, ConnectOptions, Endpoint, Error, Qmp};
use qsnap_testkit::{init_logging, require_qemu, VmBuilder};
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

#[tokio::test]
async fn negotiates_and_reports_version() {
    require_qemu!();
    init_logging();
    let vm = VmBuilder::idle().spawn().await;
    let qmp = vm.qmp().await;
    let v = &qmp.greeting().version.qemu;
    assert!(v.at_least(7, 2), "QEMU {v} is older than qsnap supports");
    // QEMU has offered OOB since 3.0; we must have switched it on.
    assert!(qmp.greeting().capabilities.iter().any(|c| c == "oob"));
    assert!(qmp.oob_enabled());
    let reply = qmp.execute(types::query_version {}).await.unwrap();
    assert_eq!(
        (reply.qemu.major, reply.qemu.minor, reply.qemu.micro),
        (v.major as i64, v.minor as i64, v.micro as i64)
    );
    let status = qmp.execute(types::query_status {}).await.unwrap();
    assert!(status.running);
    // The transcript shows the handshake and the calls.
    let t = qmp.transcript().join("\n");
    assert!(
        t.contains("qmp_capabilities") && t.contains("query-version"),
        "{t}"
    );
}

#[tokio::test]
async fn many_concurrent_commands_get_their_own_replies() {
    require_qemu!();
    let vm = VmBuilder::idle().args(["-name", "conc-vm"]).spawn().await;
    let qmp = vm.qmp().await;
    let calls = (0..60).map(|i| {
        let qmp = &qmp;
        async move {
            match i % 3 {
                0 => qmp
                    .execute(types::query_name {})
                    .await
                    .map(|r| format!("name:{}", r.name.unwrap_or_default())),
                1 => qmp
                    .execute(types::query_status {})
                    .await
                    .map(|r| format!("running:{}", r.running)),
                _ => qmp
                    .execute_raw("query-kvm", None)
                    .await
                    .map(|r| format!("kvm-present:{}", r["present"].is_boolean())),
            }
        }
    });
    let results = futures::future::join_all(calls).await;
    for (i, r) in results.into_iter().enumerate() {
        let expected = match i % 3 {
            0 => "name:conc-vm",
            1 => "running:true",
            _ => "kvm-present:true",
        };
        assert_eq!(r.unwrap(), expected, "call {i} got another call's reply");
    }
}

#[tokio::test]
async fn qemu_errors_keep_class_and_desc() {
    require_qemu!();
    let vm = VmBuilder::idle().spawn().await;
    let qmp = vm.qmp().await;
    let err = qmp.execute_raw("no-such-command", None).await.unwrap_err();
    match &err {
        Error::Qemu {
            command,
            class,
            desc,
        } => {
            assert_eq!(command, "no-such-command");
            assert_eq!(class, "CommandNotFound");
            assert!(desc.contains("no-such-command"), "{desc}");
        }
        other => panic!("expected a QEMU error, got {other:?}"),
    }
    assert_eq!(err.qemu_class(), Some("CommandNotFound"));
    // A typed command with a bad argument: GenericError, and the connection stays usable.
    let err = qmp
        .execute(types::remove_fd {
            fdset_id: 4242,
            fd: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.qemu_class(), Some("GenericError"), "{err}");
    assert!(qmp.execute(types::query_status {}).await.is_ok());
}

#[tokio::test]
async fn stop_and_cont_emit_timestamped_events() {
    require_qemu!();
    let vm = VmBuilder::idle().spawn().await;
    let qmp = vm.qmp().await;
    let mut events = qmp.events();
    let before = std::time::SystemTime::now();
    qmp.execute(types::stop {}).await.unwrap();
    let stop = events
        .wait_named("STOP", Duration::from_secs(5))
        .await
        .unwrap();
    qmp.execute(types::cont {}).await.unwrap();
    let resume = events
        .wait_named("RESUME", Duration::from_secs(5))
        .await
        .unwrap();
    assert!(stop.timestamp.to_system_time() + Duration::from_secs(1) >= before);
    assert!(resume.timestamp.to_system_time() >= stop.timestamp.to_system_time());
    assert!(resume.received >= stop.received);
    // Nothing else is pending; a wait for an event that never comes times out, bounded.
    let err = events
        .wait_named("SHUTDOWN", Duration::from_millis(300))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::EventTimeout { .. }), "{err}");
}

#[tokio::test]
async fn killing_qemu_fails_pending_calls_and_waiters_at_once() {
    require_qemu!();
    let mut vm = VmBuilder::idle().spawn().await;
    let qmp = vm.qmp().await;
    let mut events = qmp.events();
    // A stopped process cannot answer: the call stays pending until QEMU dies.
    vm.signal(Signal::SIGSTOP);
    let call = qmp.execute_timeout(types::query_status {}, Duration::from_secs(60));
    let waiter = events.wait_named("NEVER", Duration::from_secs(60));
    // join! polls the call and the waiter first: both are registered before the kill.
    let killer = async {
        let t = Instant::now();
        vm.kill().await;
        t
    };
    let (call, waiter, killed_at) = tokio::join!(call, waiter, killer);
    assert!(
        killed_at.elapsed() < Duration::from_secs(5),
        "pending call was not failed promptly"
    );
    assert!(call.unwrap_err().is_disconnected());
    assert!(waiter.unwrap_err().is_disconnected());
    assert!(!qmp.is_connected());
    // Later calls fail immediately too.
    let err = qmp.execute(types::query_status {}).await.unwrap_err();
    assert!(err.is_disconnected(), "{err}");
}

#[tokio::test]
async fn a_call_times_out_and_the_connection_survives() {
    require_qemu!();
    let vm = VmBuilder::idle().spawn().await;
    let qmp = vm.qmp().await;
    vm.signal(Signal::SIGSTOP);
    let err = qmp
        .execute_timeout(types::query_status {}, Duration::from_millis(300))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Timeout { .. }), "{err}");
    vm.signal(Signal::SIGCONT);
    // The late reply to the timed-out call is dropped; the next call gets its own reply.
    let name = qmp.execute(types::query_name {}).await.unwrap();
    assert!(name.name.is_none());
    assert!(qmp.execute(types::query_status {}).await.unwrap().running);
}

#[tokio::test]
async fn a_second_client_gets_a_clear_busy_error() {
    require_qemu!();
    let vm = VmBuilder::idle().spawn().await;
    let _first = vm.qmp().await;
    let opts = ConnectOptions {
        greeting_timeout: Duration::from_millis(500),
        ..ConnectOptions::default()
    };
    let err = Qmp::connect_with(vm.qmp_path.clone(), &opts)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::GreetingTimeout { .. }), "{err}");
    assert!(err.to_string().contains("another client"), "{err}");
    drop(_first);
    // Once the first client leaves, the monitor serves the next one.
    let qmp = Qmp::connect(vm.qmp_path.clone()).await.unwrap();
    assert!(qmp.execute(types::query_status {}).await.is_ok());
}

#[tokio::test]
async fn connect_waits_for_a_socket_that_appears_and_rejects_wrong_paths() {
    require_qemu!();
    let dir = tempfile::tempdir().unwrap();
    // Nothing there: a clear connect error after the bounded retry.
    let opts = ConnectOptions {
        connect_retry: Duration::from_millis(300),
        ..ConnectOptions::default()
    };
    let t = Instant::now();
    let err = Qmp::connect_with(dir.path().join("nope.sock"), &opts)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Connect { .. }), "{err}");
    assert!(t.elapsed() < Duration::from_secs(3));
    // A regular file is not a socket.
    let file = dir.path().join("file");
    std::fs::write(&file, b"x").unwrap();
    let err = Qmp::connect_with(file.clone(), &opts).await.unwrap_err();
    assert!(matches!(err, Error::NotASocket { .. }), "{err}");
    // A socket QEMU creates after we start connecting: the retry finds it.
    let vm_fut = VmBuilder::idle().spawn();
    let vm = vm_fut.await;
    let qmp = Qmp::connect(Endpoint::parse(&format!("unix:{}", vm.qmp_path.display())))
        .await
        .unwrap();
    assert!(qmp.execute(types::query_status {}).await.is_ok());
}

#[tokio::test]
async fn add_fd_shows_in_query_fdsets_and_remove_fd_clears_it() {
    require_qemu!();
    let vm = VmBuilder::idle().spawn().await;
    let qmp = vm.qmp().await;
    let file = std::fs::File::create(vm.dir.path().join("fdtest")).unwrap();
    let info = qmp.add_fd(&file, None, Some("qsnap-test")).await.unwrap();
    let sets = qmp.query_fdsets().await.unwrap();
    let set = sets
        .iter()
        .find(|s| s.fdset_id == info.fdset_id)
        .expect("fdset listed");
    assert!(set
        .fds
        .iter()
        .any(|f| f.fd == info.fd && f.opaque.as_deref() == Some("qsnap-test")));
    qmp.remove_fd(info.fdset_id, None).await.unwrap();
    let sets = qmp.query_fdsets().await.unwrap();
    assert!(sets.iter().all(|s| s.fdset_id != info.fdset_id));
    // getfd/closefd round trip; closing an unknown name is QEMU's error.
    qmp.getfd("qsnap-named", &file).await.unwrap();
    qmp.closefd("qsnap-named").await.unwrap();
    assert!(qmp.closefd("qsnap-named").await.is_err());
}

#[tokio::test]
async fn migrate_writes_through_an_fdset_qemu_cannot_open_itself() {
    require_qemu!();
    let vm = VmBuilder::idle().memory(64).spawn().await;
    let qmp = vm.qmp().await;
    if !qmp.greeting().version.qemu.at_least(8, 2) {
        eprintln!("*** SKIPPED: file: migration URIs need QEMU >= 8.2 ***");
        return;
    }
    // The file lives in a 0700 dir and is 0600: we open it and hand QEMU the descriptor.
    let dir = vm.dir.path().join("private");
    std::fs::create_dir(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    let path = dir.join("mem");
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
        .unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let info = qmp.add_fd(&file, None, None).await.unwrap();
    // MIGRATION events are only sent with the `events` capability on.
    qmp.execute(types::migrate_set_capabilities {
        capabilities: vec![types::MigrationCapabilityStatus {
            capability: types::MigrationCapability::events,
            state: true,
        }],
    })
    .await
    .unwrap();
    let mut events = qmp.events();
    qmp.execute(types::migrate {
        uri: Some(format!("file:/dev/fdset/{}", info.fdset_id)),
        channels: None,
        detach: None,
        resume: None,
    })
    .await
    .unwrap();
    events
        .wait_for("MIGRATION completed", Duration::from_secs(60), |e| {
            e.name == "MIGRATION" && e.data["status"] == "completed"
        })
        .await
        .unwrap();
    // An idle 64 MiB guest is mostly zero pages, sent as flags only: expect the BIOS and
    // device state, behind QEMU's stream magic.
    let saved = std::fs::read(&path).unwrap();
    assert!(
        saved.len() > 64 << 10,
        "memory file only {} bytes",
        saved.len()
    );
    assert_eq!(&saved[..4], b"QEVM", "not a QEMU migration stream");
    // QEMU sends `completed` before its cleanup leaves finish-migrate: wait (bounded).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let status = loop {
        let st = qmp.execute(types::query_status {}).await.unwrap();
        if st.status != types::RunState::finish_migrate || std::time::Instant::now() > deadline {
            break st;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    assert_eq!(status.status, types::RunState::postmigrate);
    qmp.remove_fd(info.fdset_id, None).await.unwrap();
}

#[tokio::test]
async fn fd_passing_over_tcp_is_refused_clearly() {
    require_qemu!();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let _vm = VmBuilder::idle()
        .args(["-qmp", &format!("tcp:127.0.0.1:{port},server=on,wait=off")])
        .spawn()
        .await;
    let qmp = Qmp::connect(Endpoint::Tcp(format!("127.0.0.1:{port}")))
        .await
        .unwrap();
    assert!(qmp.execute(types::query_status {}).await.unwrap().running);
    let file = tempfile::tempfile().unwrap();
    let err = qmp.add_fd(&file, None, None).await.unwrap_err();
    assert!(matches!(err, Error::FdPassingUnsupported { .. }), "{err}");
}

#[tokio::test]
async fn schema_probing_answers_from_qemus_own_schema() {
    require_qemu!();
    let vm = VmBuilder::idle().spawn().await;
    let qmp = vm.qmp().await;
    let schema = qmp.schema().await.unwrap();
    assert!(schema.has_command("migrate"));
    assert!(schema.has_command("blockdev-snapshot"));
    assert!(!schema.has_command("no-such-command"));
    assert!(schema.has_event("MIGRATION"));
    assert!(schema.has_migration_capability("background-snapshot"));
    assert!(!schema.has_migration_capability("no-such-capability"));
    assert!(schema.has_argument("migrate-set-parameters", &["max-bandwidth"]));
    assert!(schema.has_argument("blockdev-add", &["driver"]));
    assert!(schema.has_argument("blockdev-add", &["backing"]));
    assert!(schema.has_return_member("query-migrate", &["blocked-reasons"]));
    assert!(schema.has_return_member("query-migrate", &["ram", "normal"]));
    // Cached: the same Arc comes back.
    let again = qmp.schema().await.unwrap();
    assert!(std::sync::Arc::ptr_eq(&schema, &again));
}
