//! A QEMU process owned by one test.
//!
//! Each VM gets its own temp dir (QMP socket, disks, logs). QEMU is killed when the [`Vm`] is
//! dropped, and when a test panics the drop prints QEMU's command line, its stderr and the
//! serial console's tail, so a failure explains itself.

use crate::{serial::SerialLog, GuestKit};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use qsnap_qmp::{ConnectOptions, Qmp};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::AsyncReadExt;
use tokio::process::{Child, Command};

/// The QEMU binary: `$QSNAP_QEMU` or `qemu-system-x86_64` from `PATH`.
pub fn qemu_binary() -> String {
    std::env::var("QSNAP_QEMU").unwrap_or_else(|_| "qemu-system-x86_64".into())
}

/// True when `/dev/kvm` can be opened read-write. (It may still be unable to boot Linux on a
/// nested host; tests that use KVM only need a kernel-less guest.)
pub fn kvm_available() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

/// Which accelerator QEMU uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// Software emulation: works everywhere.
    Tcg,
    /// KVM: only when asked for and [`kvm_available`].
    Kvm,
}

/// What the VM runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Firmware {
    /// The test guest (kernel + initramfs) with its tick interval and optional dirtying load.
    Guest {
        /// Pause between ticks.
        tick_ms: u32,
        /// MiB of RAM rewritten continuously (0: off).
        dirty_mb: u32,
    },
    /// No kernel: SeaBIOS finds nothing to boot and idles. Starts instantly; enough for QMP
    /// protocol tests and CPU-model tests under KVM.
    Idle,
}

/// How a disk is given to QEMU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskStyle {
    /// `-drive file=…,if=virtio` (QEMU names the nodes).
    Drive,
    /// `-blockdev` file + format nodes and a `-device virtio-blk-pci` (we name the nodes).
    Blockdev,
}

/// One disk.
#[derive(Debug, Clone)]
pub struct DiskSpec {
    /// Image path.
    pub path: PathBuf,
    /// `qcow2` or `raw`.
    pub format: String,
    /// `-drive` or `-blockdev`.
    pub style: DiskStyle,
}

/// Builds and starts a [`Vm`].
#[derive(Debug, Clone)]
pub struct VmBuilder {
    memory_mib: u32,
    firmware: Firmware,
    accel: Accel,
    cpu: Option<String>,
    disks: Vec<DiskSpec>,
    extra: Vec<String>,
    paused: bool,
}

impl VmBuilder {
    /// The test guest, 256 MiB, TCG, ticking every 200 ms, with one fresh 64 MiB qcow2 disk
    /// unless disks are added.
    pub fn guest() -> Self {
        Self {
            memory_mib: 256,
            firmware: Firmware::Guest {
                tick_ms: 200,
                dirty_mb: 0,
            },
            accel: Accel::Tcg,
            cpu: None,
            disks: Vec::new(),
            extra: Vec::new(),
            paused: false,
        }
    }

    /// A kernel-less VM (SeaBIOS idle), 64 MiB, TCG, no disks.
    pub fn idle() -> Self {
        Self {
            memory_mib: 64,
            firmware: Firmware::Idle,
            ..Self::guest()
        }
    }

    /// Guest RAM in MiB.
    pub fn memory(mut self, mib: u32) -> Self {
        self.memory_mib = mib;
        self
    }

    /// Turns on the guest's memory-dirtying load.
    pub fn dirty_mb(mut self, mb: u32) -> Self {
        if let Firmware::Guest { dirty_mb, .. } = &mut self.firmware {
            *dirty_mb = mb;
        }
        self
    }

    /// Sets the accelerator.
    pub fn accel(mut self, accel: Accel) -> Self {
        self.accel = accel;
        self
    }

    /// Sets `-cpu`.
    pub fn cpu(mut self, model: &str) -> Self {
        self.cpu = Some(model.into());
        self
    }

    /// Adds a disk.
    pub fn disk(mut self, path: impl Into<PathBuf>, format: &str, style: DiskStyle) -> Self {
        self.disks.push(DiskSpec {
            path: path.into(),
            format: format.into(),
            style,
        });
        self
    }

    /// Adds raw QEMU arguments.
    pub fn args<I: IntoIterator<Item = S>, S: Into<String>>(mut self, args: I) -> Self {
        self.extra.extend(args.into_iter().map(Into::into));
        self
    }

    /// Adds a virtio-serial port for the QEMU guest agent, on a unix socket at `socket` (the
    /// test guest runs `qemu-ga` on it, and freezes an ext2 filesystem on its second disk).
    pub fn guest_agent(self, socket: &Path) -> Self {
        self.args([
            "-device".to_owned(),
            "virtio-serial-pci,id=vser0".to_owned(),
            "-chardev".to_owned(),
            format!(
                "socket,id=qga0,path={},server=on,wait=off",
                socket.display()
            ),
            "-device".to_owned(),
            "virtserialport,bus=vser0.0,chardev=qga0,name=org.qemu.guest_agent.0".to_owned(),
        ])
    }

    /// Starts with `-S` (vCPUs paused until `cont`).
    pub fn paused(mut self) -> Self {
        self.paused = true;
        self
    }

    /// The guest kit (built on first use, on the blocking pool), if this VM boots the guest.
    async fn kit(&self) -> Option<&'static GuestKit> {
        match self.firmware {
            Firmware::Guest { .. } => Some(
                tokio::task::spawn_blocking(GuestKit::get)
                    .await
                    .expect("guest kit builder panicked"),
            ),
            Firmware::Idle => None,
        }
    }

    fn argv(&self, kit: Option<&GuestKit>, qmp: &Path) -> Vec<String> {
        let mut a: Vec<String> = vec![
            "-nodefaults".into(),
            "-no-user-config".into(),
            "-display".into(),
            "none".into(),
            "-accel".into(),
            match self.accel {
                Accel::Tcg => "tcg".into(),
                Accel::Kvm => "kvm".into(),
            },
            "-m".into(),
            self.memory_mib.to_string(),
            "-qmp".into(),
            format!("unix:{},server=on,wait=off", qmp.display()),
            "-serial".into(),
            "stdio".into(),
            "-no-reboot".into(),
        ];
        if let Some(cpu) = &self.cpu {
            a.extend(["-cpu".into(), cpu.clone()]);
        }
        if let (Firmware::Guest { tick_ms, dirty_mb }, Some(kit)) = (&self.firmware, kit) {
            let mut cmdline = format!("console=ttyS0 quiet panic=-1 qsnap.tick_ms={tick_ms}");
            if *dirty_mb > 0 {
                cmdline.push_str(&format!(" qsnap.dirty_mb={dirty_mb}"));
            }
            a.extend([
                "-kernel".into(),
                kit.kernel.display().to_string(),
                "-initrd".into(),
                kit.initrd.display().to_string(),
                "-append".into(),
                cmdline,
            ]);
        }
        for (i, d) in self.disks.iter().enumerate() {
            match d.style {
                DiskStyle::Drive => a.extend([
                    "-drive".into(),
                    format!(
                        "file={},if=virtio,format={},id=drive{i}",
                        d.path.display(),
                        d.format
                    ),
                ]),
                DiskStyle::Blockdev => a.extend([
                    "-blockdev".into(),
                    format!(
                        "driver=file,filename={},node-name=file{i}",
                        d.path.display()
                    ),
                    "-blockdev".into(),
                    format!("driver={},file=file{i},node-name=disk{i}", d.format),
                    "-device".into(),
                    format!("virtio-blk-pci,drive=disk{i},id=vd{i}"),
                ]),
            }
        }
        if self.paused {
            a.push("-S".into());
        }
        a.extend(self.extra.iter().cloned());
        a
    }

    /// The full command line (binary first) for a VM that something else starts — e.g.
    /// `qsnap run` — with no monitor (the starter adds its own) and the console appended to
    /// `serial` (follow it with [`SerialLog::follow`]). Disks must have been added.
    pub async fn command_line(&self, serial: &Path) -> Vec<String> {
        let kit = self.kit().await;
        let mut a = self.argv(kit, Path::new("/unused"));
        // Drop our monitor and stdio console; append the console to a file instead.
        if let Some(i) = a.iter().position(|x| x == "-qmp") {
            a.drain(i..=i + 1);
        }
        if let Some(i) = a.iter().position(|x| x == "-serial") {
            a.drain(i..=i + 1);
        }
        a.extend([
            "-chardev".into(),
            format!("file,id=qsnapser,path={},append=on", serial.display()),
            "-serial".into(),
            "chardev:qsnapser".into(),
        ]);
        a.insert(0, qemu_binary());
        a
    }

    /// The command line (binary first) of a kernel-less 64 MiB VM with one new qcow2 disk of
    /// `disk_size` at `disk` (`-blockdev`, guest device `vd0`), its console appended to
    /// `serial`: the VM the command-line tests hand to `qsnap run`.
    pub async fn idle_with_disk(disk: &Path, disk_size: &str, serial: &Path) -> Vec<String> {
        create_image(disk, "qcow2", disk_size).await;
        VmBuilder::idle()
            .memory(64)
            .disk(disk, "qcow2", DiskStyle::Blockdev)
            .command_line(serial)
            .await
    }

    /// Creates the temp dir (and the default disk), starts QEMU and waits until its QMP socket
    /// answers (at most 20 s). Panics with QEMU's report when it does not come up.
    pub async fn spawn(self) -> Vm {
        match self.try_spawn().await {
            Ok(vm) => vm,
            Err(report) => panic!("{report}"),
        }
    }

    /// Like [`VmBuilder::spawn`], but a QEMU that does not come up is an `Err` with its report
    /// (for probing what this host can run, e.g. a KVM CPU model).
    pub async fn try_spawn(mut self) -> Result<Vm, String> {
        let dir = tempfile::Builder::new()
            .prefix("qsnap-test-")
            .tempdir()
            .expect("temp dir");
        let kit = self.kit().await;
        if kit.is_some() && self.disks.is_empty() {
            let disk = dir.path().join("disk0.qcow2");
            create_image(&disk, "qcow2", "64M").await;
            self.disks.push(DiskSpec {
                path: disk,
                format: "qcow2".into(),
                style: DiskStyle::Drive,
            });
        }
        let qmp_path = dir.path().join("qmp.sock");
        let argv = self.argv(kit, &qmp_path);
        let mut vm = Vm::start(dir, qmp_path, argv).await;
        // A socket that never answers means QEMU failed to start: fail with its stderr.
        match Qmp::connect_with(vm.qmp_path.clone(), &connect_opts(Duration::from_secs(20))).await {
            Ok(_) => Ok(vm),
            Err(e) => {
                // Its stderr holds the reason once it has exited (bounded wait).
                vm.kill_and_collect().await;
                Err(format!("QEMU did not come up: {e}\n{}", vm.report()))
            }
        }
    }
}

fn connect_opts(retry: Duration) -> ConnectOptions {
    ConnectOptions {
        connect_retry: retry,
        greeting_timeout: Duration::from_secs(10),
        command_timeout: Duration::from_secs(30),
        ..ConnectOptions::default()
    }
}

/// `qemu-img create -f FORMAT PATH SIZE`, panicking with qemu-img's message on failure.
pub async fn create_image(path: &Path, format: &str, size: &str) {
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", format])
        .arg(path)
        .arg(size)
        .output()
        .await
        .expect("qemu-img is installed");
    assert!(
        out.status.success(),
        "qemu-img create {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A running QEMU owned by a test. Killed on drop.
pub struct Vm {
    /// The VM's private temp dir (removed on drop).
    pub dir: tempfile::TempDir,
    /// Its QMP socket.
    pub qmp_path: PathBuf,
    /// Its serial console.
    pub serial: SerialLog,
    /// QEMU's arguments (without the binary).
    pub argv: Vec<String>,
    child: Child,
    stderr: Arc<Mutex<String>>,
    stderr_reader: Option<tokio::task::JoinHandle<()>>,
}

impl Vm {
    async fn start(dir: tempfile::TempDir, qmp_path: PathBuf, argv: Vec<String>) -> Vm {
        let mut child = Command::new(qemu_binary())
            .args(&argv)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", qemu_binary()));
        let serial = SerialLog::spawn(child.stdout.take().expect("piped stdout"));
        let stderr = Arc::new(Mutex::new(String::new()));
        let sink = stderr.clone();
        let mut err = child.stderr.take().expect("piped stderr");
        let stderr_reader = tokio::spawn(async move {
            let mut buf = [0u8; 4096];
            while let Ok(n) = err.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Vm {
            dir,
            qmp_path,
            serial,
            argv,
            child,
            stderr,
            stderr_reader: Some(stderr_reader),
        }
    }

    /// A new QMP connection (the monitor serves one client at a time: drop it when done).
    pub async fn qmp(&self) -> Qmp {
        match Qmp::connect_with(self.qmp_path.clone(), &connect_opts(Duration::from_secs(5))).await
        {
            Ok(q) => q,
            Err(e) => panic!("QMP connect failed: {e}\n{}", self.report()),
        }
    }

    /// QEMU's pid.
    pub fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id().expect("QEMU still running") as i32)
    }

    /// Sends a signal to QEMU (e.g. `SIGSTOP` to make it stop answering).
    pub fn signal(&self, sig: Signal) {
        kill(self.pid(), sig).expect("signal QEMU");
    }

    /// Waits (up to 2 s) for a QEMU that failed to exit, killing it otherwise, and for its
    /// stderr to be read to the end.
    async fn kill_and_collect(&mut self) {
        if self.wait_exit(Duration::from_secs(2)).await.is_none() {
            self.kill().await;
        }
        if let Some(reader) = self.stderr_reader.take() {
            let _ = tokio::time::timeout(Duration::from_secs(2), reader).await;
        }
    }

    /// Kills QEMU with SIGKILL and reaps it.
    pub async fn kill(&mut self) {
        let _ = self.child.start_kill();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await;
    }

    /// Waits up to `timeout` for QEMU to exit by itself; its exit status if it did.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        tokio::time::timeout(timeout, self.child.wait())
            .await
            .ok()
            .and_then(Result::ok)
    }

    /// Waits (bounded) until the guest prints `ready` and then at least one tick; returns the
    /// first tick value. Panics with the report when it does not.
    pub async fn wait_booted(&self, timeout: Duration) -> u64 {
        match self.serial.wait_tick_from(0, timeout).await {
            Ok((_, n)) => n,
            Err(e) => panic!("guest did not tick: {e}\n{}", self.report()),
        }
    }

    /// What QEMU printed to stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Command line, stderr and console tail: what a failed test should show.
    pub fn report(&self) -> String {
        format!(
            "--- QEMU: {} {}\n--- stderr:\n{}\n--- serial (last 30 lines):\n{}\n---",
            qemu_binary(),
            self.argv.join(" "),
            self.stderr(),
            self.serial.tail(30)
        )
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.report());
        }
        let _ = self.child.start_kill();
    }
}
