//! A real SeaweedFS owned by one test: an S3 endpoint on loopback for the object-store tests.
//!
//! - [`Seaweed::mini`]: `weed mini`, master, volume server, filer and S3 gateway in one process.
//! - [`Seaweed::cluster`]: one master (default replication `001`: every object on two volume
//!   servers), two volume servers and one filer with the S3 gateway, each its own process, so a
//!   test can kill a volume server ([`Seaweed::kill_volume`]).
//!
//! `weed` comes from `$QSNAP_WEED` or the project's virtualenv that `tests/seaweedfs/install.sh`
//! makes (`target/tools/seaweedfs-venv/bin/weed`). Every listener of every process is given a
//! free port on 127.0.0.1 — its gRPC port is always the HTTP port + 10000, the offset weed
//! assumes wherever a gRPC port is not passed (a server named by `host:port` is dialled on
//! `port + 10000`) — and everything binds 127.0.0.1 only. Telemetry, WebDAV, the Iceberg and
//! Lance catalogs and the admin UI are off (mini's admin server still listens, on its own
//! loopback pair). S3 requests must be signed with the fixture's key pair (an
//! identity of its own in an `-s3.config` file; an unsigned request gets 403).
//!
//! The processes run in the test's own process group (so a test runner that kills a timed-out
//! test's group kills them too), with their output in `DIR/logs/NAME.log`; they are killed
//! (SIGKILL) and reaped when the [`Seaweed`] is dropped, and a panicking test prints the logs'
//! tails. Every wait is bounded.
//!
//! Two things weed does that no flag changes: `weed mini` listens on
//! `/tmp/seaweedfs-{master,volume,filer,s3,admin}-grpc-PORT.sock` as well (removed on drop), and
//! it writes `DIR/data/mini.options` with the options it was started with.

use std::collections::hash_map::RandomState;
use std::fmt;
use std::fs::File;
use std::hash::{BuildHasher, Hasher};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a SeaweedFS gets to come up (S3 answering, bucket made, volume servers known).
pub const START_TIMEOUT: Duration = Duration::from_secs(60);

/// The region the fixture gives its clients.
pub const REGION: &str = "us-east-1";

/// Why a SeaweedFS could not be had.
#[derive(Debug)]
pub enum Error {
    /// `weed` is not installed (the message says how to install it).
    NotInstalled(String),
    /// It is installed but did not start or do what was asked; the message has its logs.
    Failed(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::NotInstalled(m) | Error::Failed(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for Error {}

/// The `weed` binary: `$QSNAP_WEED`, else the project's virtualenv
/// (`target/tools/seaweedfs-venv/bin/weed`, made by `tests/seaweedfs/install.sh`).
pub fn weed_binary() -> Result<PathBuf, Error> {
    let (path, from) = match std::env::var_os("QSNAP_WEED") {
        Some(p) => (PathBuf::from(p), "$QSNAP_WEED"),
        None => (
            crate::repo_root().join("target/tools/seaweedfs-venv/bin/weed"),
            "the project's virtualenv",
        ),
    };
    match std::process::Command::new(&path).arg("version").output() {
        Ok(out) if out.status.success() => Ok(path),
        Ok(out) => Err(Error::NotInstalled(format!(
            "SeaweedFS's weed ({from}: {}) does not run: {}; run tests/seaweedfs/install.sh",
            path.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ))),
        Err(e) => Err(Error::NotInstalled(format!(
            "SeaweedFS's weed is not installed ({from}: {}: {e}); run tests/seaweedfs/install.sh",
            path.display()
        ))),
    }
}

/// Returns from the test with a loud notice when SeaweedFS's `weed` is missing; panics instead
/// under CI, where `scripts/test.sh` installs it and its absence is a broken set-up.
#[macro_export]
macro_rules! require_weed {
    () => {
        if let Err(why) = $crate::seaweed::weed_binary() {
            if $crate::under_ci() {
                panic!("SeaweedFS is required under CI: {why}");
            }
            eprintln!("\n*** SKIPPED {}: {why} ***\n", module_path!());
            return;
        }
    };
}

/// One weed process.
struct Proc {
    name: String,
    argv: Vec<String>,
    log: PathBuf,
    child: Option<Child>,
}

impl Proc {
    fn spawn(weed: &Path, dir: &Path, name: &str, argv: Vec<String>) -> Result<Proc, Error> {
        let log = dir.join("logs").join(format!("{name}.log"));
        let out = File::create(&log).map_err(|e| failed(format!("{}: {e}", log.display())))?;
        let err = out
            .try_clone()
            .map_err(|e| failed(format!("{}: {e}", log.display())))?;
        let child = Command::new(weed)
            // Everything to the one log file (not weed.INFO… files beside the data).
            .arg("-logtostderr")
            .args(&argv)
            .current_dir(dir)
            // Only what it needs: no AWS_* credentials (weed s3 takes them as an admin identity
            // when no config is given), no WEED_* settings, no ~/.seaweedfs of the user.
            .env_clear()
            .env(
                "PATH",
                std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into()),
            )
            .env("HOME", dir)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| failed(format!("cannot start {}: {e}", weed.display())))?;
        Ok(Proc {
            name: name.to_owned(),
            argv,
            log,
            child: Some(child),
        })
    }

    /// Its exit status, if it has exited.
    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// SIGKILL, then reap it (bounded: 10 s).
    fn kill(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = child.kill();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            match child.try_wait() {
                Ok(Some(_)) | Err(_) => return,
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        eprintln!(
            "seaweed fixture: weed {} did not die within 10 s",
            self.name
        );
    }

    fn report(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        format!(
            "--- weed {} ({}): weed -logtostderr {}\n--- {} (last {lines} lines):\n{}",
            self.name,
            match &self.child {
                Some(c) => format!("pid {}", c.id()),
                None => "killed".into(),
            },
            self.argv.join(" "),
            self.log.display(),
            all[all.len().saturating_sub(lines)..].join("\n")
        )
    }
}

/// A SeaweedFS owned by a test, with one bucket and one S3 identity. Killed on drop.
pub struct Seaweed {
    weed: PathBuf,
    dir: PathBuf,
    procs: Vec<Proc>,
    /// Indexes into `procs` of the volume servers (cluster).
    volumes: Vec<usize>,
    master_port: u16,
    filer_port: u16,
    s3_port: u16,
    bucket: String,
    access_key: String,
    secret_key: String,
    /// Files weed leaves outside `dir` (its /tmp gRPC sockets), removed on drop.
    litter: Vec<PathBuf>,
}

impl fmt::Debug for Seaweed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Seaweed")
            .field("dir", &self.dir)
            .field("endpoint", &self.endpoint())
            .field("bucket", &self.bucket)
            .finish_non_exhaustive()
    }
}

impl Seaweed {
    /// `weed mini` in `dir` (data in `dir/data`, logs in `dir/logs`), with bucket `qsnap`.
    /// Returns once S3 answers and the bucket exists (at most [`START_TIMEOUT`]).
    pub fn mini(dir: impl AsRef<Path>) -> Result<Seaweed, Error> {
        let weed = weed_binary()?;
        let dir = prepare(dir.as_ref())?;
        let data = dir.join("data");
        mkdir(&data)?;
        // master, volume, filer, s3, admin: each an HTTP port and its gRPC port (+10000).
        let ports = free_port_pairs(5)?;
        let [master, volume, filer, s3, admin] = ports[..] else {
            unreachable!("five ports asked for")
        };
        let mut sw = Seaweed::new(weed, dir, master, filer, s3);
        let mut argv = vec![
            "mini".to_owned(),
            format!("-dir={}", data.display()),
            "-ip=127.0.0.1".into(),
            "-ip.bind=127.0.0.1".into(),
            format!("-master.port={master}"),
            format!("-master.port.grpc={}", grpc(master)),
            format!("-volume.port={volume}"),
            format!("-volume.port.grpc={}", grpc(volume)),
            format!("-filer.port={filer}"),
            format!("-filer.port.grpc={}", grpc(filer)),
            format!("-s3.port={s3}"),
            format!("-s3.port.grpc={}", grpc(s3)),
            // The admin server starts even with its UI off; its plugin worker dials the admin's
            // HTTP port + 10000 whatever -admin.port.grpc says.
            "-admin.ui=false".into(),
            format!("-admin.port={admin}"),
            format!("-admin.port.grpc={}", grpc(admin)),
            "-webdav=false".into(),
            "-s3.port.iceberg=0".into(),
            "-s3.port.lance=0".into(),
            "-master.telemetry=false".into(),
            format!("-s3.config={}", sw.s3_config()?.display()),
            format!("-bucket={}", sw.bucket),
        ];
        argv.push(format!(
            "-filer.localSocket={}",
            sw.socket_path("filer.sock", filer).display()
        ));
        argv.push(format!(
            "-s3.localSocket={}",
            sw.socket_path("s3.sock", s3).display()
        ));
        for (name, port) in [
            ("master", master),
            ("volume", volume),
            ("filer", filer),
            ("s3", s3),
            ("admin", admin),
        ] {
            sw.litter.push(PathBuf::from(format!(
                "/tmp/seaweedfs-{name}-grpc-{}.sock",
                grpc(port)
            )));
        }
        sw.spawn("mini", argv)?;
        let deadline = Instant::now() + START_TIMEOUT;
        sw.wait_s3(deadline)?;
        sw.wait_bucket(deadline)?;
        Ok(sw)
    }

    /// A cluster in `dir`: one master (`-defaultReplication=001`), two volume servers, one
    /// filer with the S3 gateway, each a process of its own (data in `dir/master`, `dir/volume0`,
    /// `dir/volume1`, `dir/filer`; logs in `dir/logs`), with bucket `qsnap`. Returns once both
    /// volume servers have joined, S3 answers and the bucket exists (at most
    /// [`START_TIMEOUT`]).
    pub fn cluster(dir: impl AsRef<Path>) -> Result<Seaweed, Error> {
        let weed = weed_binary()?;
        let dir = prepare(dir.as_ref())?;
        let ports = free_port_pairs(5)?;
        let [master, vol0, vol1, filer, s3] = ports[..] else {
            unreachable!("five ports asked for")
        };
        let mut sw = Seaweed::new(weed, dir.clone(), master, filer, s3);
        let deadline = Instant::now() + START_TIMEOUT;
        let common = |port: u16| {
            vec![
                "-ip=127.0.0.1".to_owned(),
                "-ip.bind=127.0.0.1".into(),
                format!("-port={port}"),
                format!("-port.grpc={}", grpc(port)),
            ]
        };

        let mdir = dir.join("master");
        mkdir(&mdir)?;
        let mut argv = vec!["master".to_owned()];
        argv.extend(common(master));
        argv.extend([
            format!("-mdir={}", mdir.display()),
            "-peers=none".into(),
            "-defaultReplication=001".into(),
            // Small volumes: growing one (two replicas) costs little.
            "-volumeSizeLimitMB=64".into(),
            "-telemetry=false".into(),
        ]);
        sw.spawn("master", argv)?;
        // One at a time: a volume server or filer that finds no master yet retries with a
        // back-off, which made the start take 8 s instead of 2 s now and then.
        let t0 = Instant::now();
        sw.wait_volume_servers(0, deadline)?;
        tracing::debug!("seaweed cluster: master answers after {:?}", t0.elapsed());

        for (i, port) in [vol0, vol1].into_iter().enumerate() {
            let vdir = dir.join(format!("volume{i}"));
            mkdir(&vdir)?;
            let mut argv = vec!["volume".to_owned()];
            argv.extend(common(port));
            argv.extend([
                format!("-dir={}", vdir.display()),
                format!("-master=127.0.0.1:{master}"),
                "-max=16".into(),
                "-preStopSeconds=0".into(),
            ]);
            sw.spawn(&format!("volume{i}"), argv)?;
            sw.volumes.push(sw.procs.len() - 1);
        }
        sw.wait_volume_servers(2, deadline)?;
        tracing::debug!(
            "seaweed cluster: volume servers joined after {:?}",
            t0.elapsed()
        );

        let fdir = dir.join("filer");
        mkdir(&fdir)?;
        let mut argv = vec!["filer".to_owned()];
        argv.extend(common(filer));
        argv.extend([
            format!("-master=127.0.0.1:{master}"),
            format!("-defaultStoreDir={}", fdir.display()),
            format!(
                "-localSocket={}",
                sw.socket_path("filer.sock", filer).display()
            ),
            "-s3".into(),
            format!("-s3.port={s3}"),
            format!("-s3.port.grpc={}", grpc(s3)),
            "-s3.port.iceberg=0".into(),
            "-s3.port.lance=0".into(),
            format!("-s3.config={}", sw.s3_config()?.display()),
            format!(
                "-s3.localSocket={}",
                sw.socket_path("s3.sock", s3).display()
            ),
        ]);
        sw.spawn("filer", argv)?;

        sw.wait_s3(deadline)?;
        tracing::debug!("seaweed cluster: S3 answers after {:?}", t0.elapsed());
        sw.create_bucket(deadline)?;
        tracing::debug!("seaweed cluster: bucket made after {:?}", t0.elapsed());
        sw.wait_bucket(deadline)?;
        Ok(sw)
    }

    fn new(weed: PathBuf, dir: PathBuf, master_port: u16, filer_port: u16, s3_port: u16) -> Self {
        Seaweed {
            weed,
            dir,
            procs: Vec::new(),
            volumes: Vec::new(),
            master_port,
            filer_port,
            s3_port,
            bucket: "qsnap".into(),
            access_key: format!("QSNAP{:016X}", random_u64()),
            secret_key: format!("{:016x}{:016x}", random_u64(), random_u64()),
            litter: Vec::new(),
        }
    }

    /// The S3 endpoint, `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.s3_port)
    }

    /// The filer's HTTP endpoint (unauthenticated; for looking behind S3).
    pub fn filer_endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.filer_port)
    }

    /// The master's HTTP endpoint.
    pub fn master_endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.master_port)
    }

    /// The bucket made at start.
    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// The S3 access key id (the only identity SeaweedFS accepts).
    pub fn access_key(&self) -> &str {
        &self.access_key
    }

    /// The S3 secret access key.
    pub fn secret_key(&self) -> &str {
        &self.secret_key
    }

    /// The directory holding its data and logs.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// What an S3 client needs, as environment variables: `AWS_ENDPOINT_URL`,
    /// `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`, `AWS_ALLOW_HTTP=true`.
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("AWS_ENDPOINT_URL", self.endpoint()),
            ("AWS_ACCESS_KEY_ID", self.access_key.clone()),
            ("AWS_SECRET_ACCESS_KEY", self.secret_key.clone()),
            ("AWS_REGION", REGION.to_owned()),
            ("AWS_ALLOW_HTTP", "true".to_owned()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    }

    /// Number of volume servers started as processes of their own (0 for `mini`).
    pub fn volume_servers(&self) -> usize {
        self.volumes.len()
    }

    /// Kills volume server `i` (SIGKILL, reaped) of a [`Seaweed::cluster`].
    pub fn kill_volume(&mut self, i: usize) -> Result<(), Error> {
        let Some(&p) = self.volumes.get(i) else {
            return Err(failed(format!(
                "no volume server {i}: this SeaweedFS has {} as processes of their own",
                self.volumes.len()
            )));
        };
        self.procs[p].kill();
        Ok(())
    }

    /// Resident memory of each running weed process, in KiB (from `/proc/PID/status`).
    pub fn memory_kib(&self) -> Vec<(String, u64)> {
        self.procs
            .iter()
            .filter_map(|p| {
                let pid = p.child.as_ref()?.id();
                let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
                let kib = status
                    .lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))?
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse()
                    .ok()?;
                Some((p.name.clone(), kib))
            })
            .collect()
    }

    /// Every process's command line and the tail of its log: what a failed test should show.
    pub fn report(&self) -> String {
        let mut r: Vec<String> = self.procs.iter().map(|p| p.report(40)).collect();
        r.push("---".into());
        r.join("\n")
    }

    fn spawn(&mut self, name: &str, argv: Vec<String>) -> Result<(), Error> {
        let p = Proc::spawn(&self.weed, &self.dir, name, argv)?;
        self.procs.push(p);
        Ok(())
    }

    /// The S3 identities file: one identity, this fixture's key pair, allowed everything; no
    /// anonymous identity, so unsigned requests are refused.
    fn s3_config(&self) -> Result<PathBuf, Error> {
        let path = self.dir.join("s3.json");
        let config = serde_json::json!({
            "identities": [{
                "name": "qsnap-test",
                "credentials": [{ "accessKey": self.access_key, "secretKey": self.secret_key }],
                "actions": ["Admin", "Read", "List", "Tagging", "Write"],
            }]
        });
        std::fs::write(&path, serde_json::to_vec_pretty(&config).expect("json"))
            .map_err(|e| failed(format!("{}: {e}", path.display())))?;
        Ok(path)
    }

    /// A unix socket path in the directory, or in /tmp when that would be longer than a socket
    /// address holds.
    fn socket_path(&mut self, name: &str, port: u16) -> PathBuf {
        let p = self.dir.join(name);
        if p.as_os_str().len() < 100 {
            return p;
        }
        let p = PathBuf::from(format!("/tmp/qsnap-seaweed-{port}-{name}"));
        self.litter.push(p.clone());
        p
    }

    /// Fails with the logs when a process has exited, or when `deadline` has passed.
    fn check(&mut self, deadline: Instant, waiting_for: &str) -> Result<(), Error> {
        let gone = self
            .procs
            .iter_mut()
            .find_map(|p| p.exited().map(|status| (p.name.clone(), status)));
        if let Some((name, status)) = gone {
            return Err(failed(format!(
                "weed {name} exited ({status}) while waiting for {waiting_for}\n{}",
                self.report()
            )));
        }
        if Instant::now() > deadline {
            return Err(failed(format!(
                "SeaweedFS: no {waiting_for} within {} s\n{}",
                START_TIMEOUT.as_secs(),
                self.report()
            )));
        }
        std::thread::sleep(Duration::from_millis(100));
        Ok(())
    }

    /// Until the S3 gateway answers HTTP (403 to an unsigned request).
    fn wait_s3(&mut self, deadline: Instant) -> Result<(), Error> {
        loop {
            if http_get(self.s3_port, "/").is_some() {
                return Ok(());
            }
            self.check(deadline, "answer from the S3 gateway")?;
        }
    }

    /// Until the filer lists the bucket's directory.
    fn wait_bucket(&mut self, deadline: Instant) -> Result<(), Error> {
        let path = format!("/buckets/{}/", self.bucket);
        loop {
            if let Some((200, _)) = http_get(self.filer_port, &path) {
                return Ok(());
            }
            self.check(deadline, &format!("bucket {} in the filer", self.bucket))?;
        }
    }

    /// Until the master answers and knows `n` volume servers.
    fn wait_volume_servers(&mut self, n: usize, deadline: Instant) -> Result<(), Error> {
        loop {
            if let Some((200, body)) = http_get(self.master_port, "/dir/status") {
                if data_nodes(&body) >= n {
                    return Ok(());
                }
            }
            self.check(deadline, &format!("{n} volume servers in the master"))?;
        }
    }

    /// `s3.bucket.create` through `weed shell` (the standalone S3 gateway has no `-bucket`).
    fn create_bucket(&mut self, deadline: Instant) -> Result<(), Error> {
        let mut tries = Vec::new();
        loop {
            let log = self.dir.join("logs").join("shell.log");
            let out = File::create(&log).map_err(|e| failed(format!("{}: {e}", log.display())))?;
            let err = out.try_clone().map_err(|e| failed(e.to_string()))?;
            let mut shell = Command::new(&self.weed)
                .arg("shell")
                .arg(format!("-master=127.0.0.1:{}", self.master_port))
                .arg(format!("-filer=127.0.0.1:{}", self.filer_port))
                .current_dir(&self.dir)
                .env_clear()
                .env("HOME", &self.dir)
                .stdin(Stdio::piped())
                .stdout(out)
                .stderr(err)
                .spawn()
                .map_err(|e| failed(format!("weed shell: {e}")))?;
            if let Some(mut stdin) = shell.stdin.take() {
                let _ = writeln!(stdin, "s3.bucket.create -name {}", self.bucket);
            }
            // Bounded: the shell exits at the end of its input.
            let until = Instant::now() + Duration::from_secs(20);
            let status = loop {
                match shell.try_wait() {
                    Ok(Some(s)) => break Some(s),
                    Ok(None) if Instant::now() < until => {
                        std::thread::sleep(Duration::from_millis(50))
                    }
                    _ => {
                        let _ = shell.kill();
                        let _ = shell.wait();
                        break None;
                    }
                }
            };
            let said = std::fs::read_to_string(&log).unwrap_or_default();
            if status.is_some_and(|s| s.success()) && said.contains("created bucket") {
                return Ok(());
            }
            tries.push(format!("{status:?}: {said}"));
            self.check(
                deadline,
                &format!("weed shell to create the bucket: {}", tries.join(" / ")),
            )?;
            std::thread::sleep(Duration::from_millis(400));
        }
    }
}

impl Drop for Seaweed {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.report());
        }
        for p in self.procs.iter_mut().rev() {
            p.kill();
        }
        for f in &self.litter {
            let _ = std::fs::remove_file(f);
        }
    }
}

fn failed(msg: String) -> Error {
    Error::Failed(msg)
}

fn mkdir(p: &Path) -> Result<(), Error> {
    std::fs::create_dir_all(p).map_err(|e| failed(format!("{}: {e}", p.display())))
}

/// The directory made absolute (weed is started in it), with `logs/` inside.
fn prepare(dir: &Path) -> Result<PathBuf, Error> {
    mkdir(&dir.join("logs"))?;
    std::fs::canonicalize(dir).map_err(|e| failed(format!("{}: {e}", dir.display())))
}

/// The gRPC port weed pairs with an HTTP port.
fn grpc(port: u16) -> u16 {
    port + 10000
}

fn random_u64() -> u64 {
    let mut h = RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.write_u32(std::process::id());
    h.finish()
}

/// `n` ports P, each with P + 10000 free too, on 127.0.0.1: P in 10000..22768, so that neither
/// falls in Linux's ephemeral range (32768 up) where outgoing connections take their ports.
/// Every port is held while the others are chosen, then all are released for weed to bind (a
/// race with another process is possible but unlikely in the random spread).
fn free_port_pairs(n: usize) -> Result<Vec<u16>, Error> {
    let mut held: Vec<TcpListener> = Vec::new();
    let mut ports = Vec::new();
    for _ in 0..2000 {
        if ports.len() == n {
            break;
        }
        let p = 10000 + u16::try_from(random_u64() % 12768).expect("below 12768");
        if ports.contains(&p) || ports.contains(&grpc(p)) || ports.iter().any(|&q| grpc(q) == p) {
            continue;
        }
        let bind = |port| TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, port)));
        if let (Ok(a), Ok(b)) = (bind(p), bind(grpc(p))) {
            held.extend([a, b]);
            ports.push(p);
        }
    }
    if ports.len() < n {
        return Err(failed(format!(
            "found only {} free loopback port pairs (P, P+10000) of {n}",
            ports.len()
        )));
    }
    Ok(ports)
}

/// `GET path` on 127.0.0.1:port (HTTP/1.0, `Accept: application/json`): status and body, or
/// `None` when nothing answers within 2 s.
fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.set_write_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nAccept: application/json\r\n\r\n"
    )
    .ok()?;
    let mut buf = Vec::new();
    s.take(1 << 20).read_to_end(&mut buf).ok()?;
    let text = String::from_utf8_lossy(&buf);
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Some((status, body))
}

/// Volume servers in a master's `/dir/status`.
fn data_nodes(status: &str) -> usize {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(status) else {
        return 0;
    };
    let empty = Vec::new();
    let list = |v: &serde_json::Value, key: &str| v[key].as_array().unwrap_or(&empty).clone();
    list(&v["Topology"], "DataCenters")
        .iter()
        .flat_map(|dc| list(dc, "Racks"))
        .map(|rack| list(&rack, "DataNodes").len())
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_data_nodes_of_a_dir_status() {
        let s = r#"{"Topology":{"Max":32,"Free":32,"DataCenters":[{"Id":"DefaultDataCenter",
            "Racks":[{"Id":"DefaultRack","DataNodes":[{"Url":"127.0.0.1:12002"},
            {"Url":"127.0.0.1:12003"}]}]}],"Layouts":null}}"#;
        assert_eq!(data_nodes(s), 2);
        assert_eq!(data_nodes(r#"{"Topology":{"DataCenters":null}}"#), 0);
        assert_eq!(data_nodes("garbage"), 0);
    }

    #[test]
    fn port_pairs_are_distinct_and_below_the_ephemeral_range() {
        let ports = free_port_pairs(5).unwrap();
        let mut all: Vec<u16> = ports.iter().flat_map(|&p| [p, grpc(p)]).collect();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), 10);
        assert!(all.iter().all(|&p| (10000..32768).contains(&p)));
    }
}
