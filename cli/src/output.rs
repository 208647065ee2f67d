//! Everything the binary prints: human text or `--json`. Nothing else writes to stdout.

use qsnap_engine::VmInfo;
use serde_json::Value;

/// Prints a QMP reply as pretty JSON.
pub fn qmp_reply(reply: &Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(reply).unwrap_or_else(|_| reply.to_string())
    );
}

/// Prints a VM summary.
pub fn vm_info(info: &VmInfo, json: bool) {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(info).expect("VmInfo serialises")
        );
        return;
    }
    let yes_no = |b: bool| if b { "yes" } else { "no" };
    println!(
        "QEMU           {} ({})",
        info.qemu_version, info.qemu_package
    );
    println!(
        "state          {}{}",
        info.runstate,
        if info.running { " (vCPUs running)" } else { "" }
    );
    if let Some(m) = &info.migration_status {
        println!("migration      {m}");
    }
    if info.migration_blockers.is_empty() {
        println!("memory save    possible");
    } else {
        println!("memory save    BLOCKED:");
        for b in &info.migration_blockers {
            println!("               - {b}");
        }
    }
    println!(
        "mechanisms     background-snapshot: {}, file: migration to an fdset: {}",
        yes_no(info.background_snapshot),
        yes_no(info.file_migration)
    );
    println!("disks          {}", info.disks.len());
    for d in &info.disks {
        // -drive disks have a device id; -blockdev ones are known by their node name.
        let name = match (d.device.as_str(), d.node_name.as_deref()) {
            ("", Some(node)) => node,
            ("", None) => d.qdev.as_deref().unwrap_or("?"),
            (device, _) => device,
        };
        match &d.file {
            Some(file) => println!(
                "  {name:<12} {} [{}]{}",
                file,
                d.format.as_deref().unwrap_or("?"),
                if d.read_only { " read-only" } else { "" }
            ),
            None => println!("  {name:<12} (empty)"),
        }
    }
}
