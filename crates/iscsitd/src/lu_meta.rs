//! An LU's identity kept beside its data, so `stmfadm import-lu PATH`
//! can re-adopt a file LU after `delete-lu`, on another host, or after the
//! configuration was lost (what sbd's metadata in the LU file was for).
//!
//! The identity lives in a small sidecar, `PATH.ironstar-lu` (TOML): GUID,
//! size, block size, serial, alias, vendor and product ids, and the
//! write-cache / write-protect / thin-provisioning settings, and how the
//! file is opened (`direct`, `io_threads`). A sidecar
//! rather than a header region keeps the data file a plain image (usable
//! by `qemu-img`, `dd` and loop devices, no offset to remember). It is
//! written atomically on create-lu and on every modify-lu, and left in
//! place by delete-lu. Block devices get no sidecar (it cannot live in
//! /dev); `import-lu -m META` names one kept elsewhere.

use std::path::{Path, PathBuf};

use iscsi_target::config::{is_guid, BackendKind, LuDef};

use iscsi_target::registry::LuEntry;
use serde::{Deserialize, Serialize};

/// The sidecar's format version.
const FORMAT: u32 = 1;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LuMeta {
    pub format: u32,
    pub guid: String,
    /// Bytes.
    pub size: u64,
    pub block_size: u32,
    pub serial: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alias: Option<String>,
    pub vid: String,
    pub pid: String,
    pub write_cache: bool,
    pub read_only: bool,
    pub thin: bool,
    /// O_DIRECT (LU property `direct`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub direct: bool,
    /// LU property `io_threads`, when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub io_threads: Option<u32>,
}

/// Where the sidecar of data file `path` lives.
pub fn sidecar(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".ironstar-lu");
    PathBuf::from(s)
}

/// Whether `path` gets a sidecar (a regular file, not a device).
fn wants_sidecar(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file())
}

impl LuMeta {
    pub fn of(e: &LuEntry) -> LuMeta {
        let c = e.lu.config();
        LuMeta {
            format: FORMAT,
            guid: e.def.guid.clone(),
            size: e
                .lu
                .num_blocks()
                .saturating_mul(u64::from(e.lu.block_size())),
            block_size: e.lu.block_size(),
            serial: c.serial.clone(),
            alias: e.def.alias.clone(),
            vid: c.vendor.clone(),
            pid: c.product.clone(),
            write_cache: e.def.write_cache.unwrap_or(true),
            read_only: c.read_only,
            thin: c.thin_provisioning,
            direct: e.def.direct,
            io_threads: e.def.io_threads,
        }
    }

    /// The LU definition that re-creates this identity on `path`. Built
    /// through serde so fields other backends add to `LuDef` keep their
    /// defaults.
    pub fn to_def(&self, path: &str) -> Result<LuDef, String> {
        serde_json::from_value(serde_json::json!({
            "guid": self.guid,
            "alias": self.alias,
            "backend": "file",
            "size": self.size.to_string(),
            "path": path,
            "block_size": self.block_size,
            "serial": self.serial,
            "vid": self.vid,
            "pid": self.pid,
            "write_cache": self.write_cache,
            "read_only": self.read_only,
            "thin": self.thin,
            "direct": self.direct,
            "io_threads": self.io_threads,
            "online": true,
        }))
        .map_err(|e| format!("LU metadata: {e}"))
    }
}

/// Writes (replaces) the sidecar of a file LU; other LUs have none.
pub fn save(e: &LuEntry) -> Result<Option<PathBuf>, String> {
    let Some(path) = e
        .def
        .path
        .as_deref()
        .filter(|_| e.def.backend == BackendKind::File)
    else {
        return Ok(None);
    };
    let path = Path::new(path);
    if !wants_sidecar(path) {
        return Ok(None);
    }
    let meta = sidecar(path);
    write_meta(&meta, &LuMeta::of(e))?;
    Ok(Some(meta))
}

pub fn write_meta(meta: &Path, m: &LuMeta) -> Result<(), String> {
    let text = toml::to_string(m).map_err(|e| format!("cannot serialise LU metadata: {e}"))?;
    let text = format!(
        "# Ironstar LU metadata: the identity of the logical unit whose data is beside\n\
         # this file. `stmfadm import-lu DATAFILE` registers it again with it.\n{text}"
    );
    crate::store::write_atomic(meta, text.as_bytes())
        .map_err(|e| format!("cannot write {}: {e}", meta.display()))
}

/// Reads and checks the metadata for data file `path` (from `meta`, or the
/// sidecar beside it).
pub fn load(path: &Path, meta: Option<&Path>) -> Result<LuMeta, String> {
    let at = meta.map(Path::to_path_buf).unwrap_or_else(|| sidecar(path));
    let text = std::fs::read_to_string(&at).map_err(|e| {
        format!(
            "{}: {e} (an LU made by create-lu keeps its identity there; name another with -m)",
            at.display()
        )
    })?;
    let m: LuMeta =
        toml::from_str(&text).map_err(|e| format!("{}: not LU metadata: {e}", at.display()))?;
    if m.format != FORMAT {
        return Err(format!(
            "{}: metadata format {} is not {FORMAT}",
            at.display(),
            m.format
        ));
    }
    if !is_guid(&m.guid) {
        return Err(format!(
            "{}: guid {:?} is not 16 hex digits starting with 6",
            at.display(),
            m.guid
        ));
    }
    if !m.block_size.is_power_of_two() || !(512..=65536).contains(&m.block_size) {
        return Err(format!(
            "{}: block size {} is not valid",
            at.display(),
            m.block_size
        ));
    }
    if m.size == 0 || m.size % u64::from(m.block_size) != 0 {
        return Err(format!(
            "{}: size {} is not a whole number of blocks",
            at.display(),
            m.size
        ));
    }
    let have = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if have.is_file() && have.len() < m.size {
        return Err(format!(
            "{}: holds {} bytes but its metadata says the LU is {} bytes",
            path.display(),
            have.len(),
            m.size
        ));
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir() -> PathBuf {
        let d = std::env::temp_dir().join(format!("ironstar-lumeta-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn meta() -> LuMeta {
        LuMeta {
            format: FORMAT,
            guid: "600144F000000001".into(),
            size: 1 << 20,
            block_size: 4096,
            serial: "s1".into(),
            alias: Some("db".into()),
            vid: "IRONSTAR".into(),
            pid: "FILE LU".into(),
            write_cache: false,
            read_only: false,
            thin: true,
            direct: true,
            io_threads: Some(8),
        }
    }

    #[test]
    fn metadata_round_trips_and_checks_the_data_file() {
        let d = dir();
        let data = d.join("a.img");
        std::fs::write(&data, vec![0u8; 1 << 20]).unwrap();
        write_meta(&sidecar(&data), &meta()).unwrap();
        let back = load(&data, None).unwrap();
        assert_eq!(back, meta());
        let def = back.to_def(data.to_str().unwrap()).unwrap();
        assert_eq!(
            (def.block_size, def.size.as_deref()),
            (4096, Some("1048576"))
        );
        assert_eq!((def.direct, def.io_threads), (true, Some(8)));
        // A data file shorter than its metadata says is refused.
        std::fs::write(&data, vec![0u8; 4096]).unwrap();
        assert!(load(&data, None).unwrap_err().contains("holds 4096 bytes"));
        // No sidecar: the error says where it looked.
        let other = d.join("b.img");
        std::fs::write(&other, b"x").unwrap();
        assert!(load(&other, None)
            .unwrap_err()
            .contains("b.img.ironstar-lu"));
        std::fs::remove_dir_all(&d).unwrap();
    }
}
