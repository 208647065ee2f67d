//! What the commands that move snapshots between hosts print: `export`, `import`, `keygen`,
//! `push`, `pull`, `remote list` and `remote gc`. Like the rest of `output`, it decides
//! nothing and reads nothing: it formats the reports it is handed.

use super::{json, mib, moved};

/// Prints what an export did: on stderr when the bundle went to stdout.
pub fn exported(
    r: &qsnap_engine::ExportReport,
    file: Option<&std::path::Path>,
    as_json: bool,
    to_stdout: bool,
) {
    let out = |line: String| {
        if to_stdout {
            eprintln!("{line}");
        } else {
            println!("{line}");
        }
    };
    if as_json {
        return out(json::render(r));
    }
    let size: u64 = r.files.iter().map(|f| f.size).sum();
    let shipped: u64 = r.files.iter().map(|f| f.shipped).sum();
    out(format!(
        "exported {}/{}{} to {} in {:.1} s: {} files, {} of data ({} read, holes and zero blocks skipped), bundle {}",
        r.vm,
        r.snapshot,
        r.base
            .as_ref()
            .map(|b| format!(" (incremental on {b})"))
            .unwrap_or_default(),
        file.map_or_else(|| "stdout".to_owned(), |p| p.display().to_string()),
        r.total_ms / 1e3,
        r.files.len(),
        mib(size),
        mib(shipped),
        mib(r.bundle_bytes)
    ));
    for f in &r.files {
        out(format!(
            "  {:<24} {:>10} ({} shipped{})",
            f.name,
            mib(f.size),
            mib(f.shipped),
            if f.delta { ", delta" } else { "" }
        ));
    }
    for n in &r.notes {
        eprintln!("note: {n}");
    }
}

/// Prints what a push did.
pub fn pushed(r: &qsnap_remote::PushReport, as_json: bool) {
    if as_json {
        return json::print(r);
    }
    println!(
        "pushed {} to {} in {:.1} s: {} files, {} of data in {} chunks; uploaded {} chunks ({} compressed), {} already there ({})",
        r.name,
        r.url,
        r.total_ms / 1e3,
        r.files,
        mib(r.size_bytes),
        r.chunks,
        r.uploaded_chunks,
        mib(r.uploaded_bytes),
        r.deduplicated_chunks,
        mib(r.deduplicated_bytes),
    );
    for n in &r.notes {
        eprintln!("note: {n}");
    }
}

/// Prints what a pull did.
pub fn pulled(r: &qsnap_remote::PullReport, as_json: bool) {
    if as_json {
        return json::print(r);
    }
    println!(
        "pulled {} from {} in {:.1} s: {} chunks, {} downloaded ({}), {} from the local cache ({})",
        r.name,
        r.url,
        r.total_ms / 1e3,
        r.chunks,
        r.downloaded_chunks,
        mib(r.downloaded_bytes),
        r.cached_chunks,
        mib(r.cached_bytes),
    );
    imported(&r.import, false);
}

/// Prints the snapshots a remote holds.
pub fn remote_list(url: &str, list: &[qsnap_remote::RemoteEntry], as_json: bool) {
    if as_json {
        return json::print_each(list);
    }
    if list.is_empty() {
        println!("{url} holds no snapshot");
        return;
    }
    println!(
        "{:<32} {:<22} {:>12} {:>8}  signed",
        "snapshot", "pushed", "size", "chunks"
    );
    for e in list {
        if let Some(p) = &e.problem {
            println!("{:<32} unreadable: {p}", e.name);
            continue;
        }
        println!(
            "{:<32} {:<22} {:>12} {:>8}  {}{}",
            e.name,
            e.pushed_at,
            mib(e.size_bytes),
            e.chunks,
            if e.signed { "yes" } else { "no" },
            e.incremental_on
                .as_ref()
                .map(|b| format!("  (also incremental on {b})"))
                .unwrap_or_default()
        );
    }
}

/// Prints what `remote gc` did.
pub fn collected(r: &qsnap_remote::GcReport, as_json: bool) {
    if as_json {
        return json::print(r);
    }
    println!(
        "{}: {} snapshots use {} of {} chunks; removed {} ({}), kept {} unused but younger than the grace period",
        r.url,
        r.snapshots,
        r.referenced,
        r.chunks,
        r.removed,
        mib(r.removed_bytes),
        r.kept_young
    );
}

/// Prints where `keygen` put the keys.
pub fn keys(sk: &std::path::Path, pk: &std::path::Path) {
    println!(
        "secret key {} (0600: keep it; `qsnap export … --sign {}`)",
        sk.display(),
        sk.display()
    );
    println!(
        "public key {} (give it to importers: `qsnap import … --trust {}`)",
        pk.display(),
        pk.display()
    );
}

/// Prints what an import did.
pub fn imported(r: &qsnap_engine::ImportReport, as_json: bool) {
    if as_json {
        return json::print(r);
    }
    if r.new_vm {
        println!(
            "imported {} as VM {} (stopped) holding snapshot {}, in {:.1} s; `qsnap revert {} {}` starts it from the snapshot",
            r.source, r.vm, r.snapshot, r.total_ms / 1e3, r.vm, r.snapshot
        );
    } else {
        println!(
            "imported {} into VM {} as snapshot {} (on {}), in {:.1} s",
            r.source,
            r.vm,
            r.snapshot,
            r.base.as_deref().unwrap_or("?"),
            r.total_ms / 1e3
        );
    }
    for f in &r.files {
        println!("  {}", f.display());
    }
    moved(&r.moved);
    for n in &r.notes {
        eprintln!("note: {n}");
    }
}
