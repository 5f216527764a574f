//! The configuration document on disk, written atomically: a temporary
//! file beside it, fsync, rename over the old one, fsync of the directory.
//! A crash at any point leaves either the old or the new document.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use iscsi_target::Config;

/// Serialises `config` as TOML and replaces `path` with it.
pub fn save(path: &Path, config: &Config) -> Result<(), String> {
    let text = toml::to_string(config).map_err(|e| format!("cannot serialise: {e}"))?;
    let text = format!(
        "# Ironstar iscsitd configuration. Written by iscsitd on every change made\n\
         # with itadm/stmfadm; edit it by hand only while the daemon is stopped.\n\n{text}"
    );
    write_atomic(path, text.as_bytes()).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

fn dir_and_name(path: &Path) -> (std::path::PathBuf, String) {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "config".into());
    (dir, name)
}

/// Removes temporary files an earlier daemon left beside `path` when it
/// was killed between creating one and renaming it (they hold a document
/// that never became the configuration). Returns how many went.
pub fn sweep_stale_temps(path: &Path) -> usize {
    let (dir, name) = dir_and_name(path);
    let prefix = format!(".{name}.tmp.");
    let mine = format!("{prefix}{}", std::process::id());
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .filter(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            n.starts_with(&prefix) && n != mine
        })
        .filter(|e| std::fs::remove_file(e.path()).is_ok())
        .count()
}

pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let (dir, name) = dir_and_name(path);
    let tmp = dir.join(format!(".{name}.tmp.{}", std::process::id()));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
        return result;
    }
    // The new document is in place: from here a failure cannot be undone,
    // and refusing the change would leave the file and the daemon
    // disagreeing. The rename reaches the disk with the directory's next
    // flush at the latest; say that it was not forced now.
    if let Err(e) = File::open(&dir).and_then(|d| d.sync_all()) {
        tracing::warn!(dir = %dir.display(), error = %e, "configuration written, but its directory could not be flushed");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saved_config_loads_back_equal() {
        let dir = std::env::temp_dir().join(format!("ironstar-store-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.toml");
        let mut c = Config::embedded_default();
        c.defaults.isns_servers = vec!["10.0.0.1:3205".into()];
        save(&path, &c).unwrap();
        let back = Config::load(path.to_str().unwrap()).unwrap();
        assert_eq!(back, c);
        // No temporary file is left behind.
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn stale_temporary_files_of_a_killed_daemon_are_swept() {
        let dir = std::env::temp_dir().join(format!("ironstar-sweep-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.toml");
        std::fs::write(&path, "x").unwrap();
        std::fs::write(dir.join(".c.toml.tmp.1"), "half").unwrap();
        std::fs::write(dir.join(".other.toml.tmp.1"), "not ours").unwrap();
        assert_eq!(sweep_stale_temps(&path), 1);
        let mut left: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, vec![".other.toml.tmp.1", "c.toml"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
