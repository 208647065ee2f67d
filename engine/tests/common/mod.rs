//! Shared by the tests that relaunch QEMU: a launcher that gives every QEMU its own console
//! file, so a test can tell the reverted guest's first tick from the last ticks of the QEMU it
//! replaced (both would otherwise append to one file, in a racy order).

use qsnap_engine::launch::{LaunchSpec, Launched, Launcher, ProcessLauncher};
use qsnap_testkit::serial::SerialLog;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

/// Rewrites the console path (`-chardev file,id=qsnapser,path=…`) to `serial-N.log`, N
/// counting launches, and follows the newest file.
pub struct PerLaunchSerial {
    dir: PathBuf,
    launches: AtomicUsize,
    current: Mutex<Option<SerialLog>>,
}

impl PerLaunchSerial {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        PerLaunchSerial {
            dir: dir.into(),
            launches: AtomicUsize::new(0),
            current: Mutex::new(None),
        }
    }

    /// The console of the QEMU launched last.
    pub fn serial(&self) -> SerialLog {
        self.current
            .lock()
            .unwrap()
            .clone()
            .expect("nothing launched yet")
    }

    /// Its file.
    pub fn path(&self) -> PathBuf {
        let n = self.launches.load(Ordering::SeqCst);
        self.dir.join(format!("serial-{n}.log"))
    }
}

impl Launcher for PerLaunchSerial {
    async fn launch(&self, spec: &LaunchSpec) -> qsnap_engine::Result<Launched> {
        let n = self.launches.fetch_add(1, Ordering::SeqCst) + 1;
        let path = self.dir.join(format!("serial-{n}.log"));
        let mut spec = spec.clone();
        for a in &mut spec.command.argv {
            if a.starts_with("file,id=qsnapser,") {
                *a = format!("file,id=qsnapser,path={},append=on", path.display());
            }
        }
        *self.current.lock().unwrap() = Some(SerialLog::follow(&path));
        ProcessLauncher::default().launch(&spec).await
    }
}
