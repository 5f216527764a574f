//! `config`: any text into `Config::from_toml`; a configuration that passes
//! validation is also built into a `Registry` when that is cheap (memory and
//! null LUs of at most 1 MiB, no file backends: building opens files).
//!
//! The JSON-RPC request parser has no target yet: it does not exist. When it
//! lands, add `fuzz_targets/rpc_request.rs` next to this one.

use iscsi_target::config::{parse_size, Config};
use iscsi_target::Registry;

const MAX_LU_BYTES: u64 = 1 << 20;
const MAX_LUS: usize = 16;

/// Walks the configuration as TOML values rather than by field, so LU
/// definitions added to the schema later are clamped too: every table with a
/// `backend` must be memory or null with a `size` of at most 1 MiB.
fn cheap_to_build(cfg: &Config) -> bool {
    fn walk(v: &toml::Value, lus: &mut usize) -> bool {
        match v {
            toml::Value::Table(t) => {
                if let Some(backend) = t.get("backend") {
                    *lus += 1;
                    let small = t
                        .get("size")
                        .and_then(toml::Value::as_str)
                        .and_then(parse_size)
                        .is_some_and(|s| s <= MAX_LU_BYTES);
                    let in_memory = matches!(backend.as_str(), Some("memory" | "null"));
                    if !small || !in_memory || *lus > MAX_LUS {
                        return false;
                    }
                }
                t.values().all(|v| walk(v, lus))
            }
            toml::Value::Array(a) => a.iter().all(|v| walk(v, lus)),
            _ => true,
        }
    }
    toml::Value::try_from(cfg).is_ok_and(|v| walk(&v, &mut 0))
}

pub fn run(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(cfg) = Config::from_toml(text) else {
        return;
    };
    assert!(
        cfg.validate().is_ok(),
        "validate() disagrees with from_toml()"
    );
    // Config derives Serialize: what we would write back must read the same.
    match toml::to_string(&cfg) {
        Ok(again) => match Config::from_toml(&again) {
            Ok(back) => assert_eq!(back, cfg, "config changed through TOML:\n{again}"),
            Err(e) => panic!("our own TOML does not load ({e}):\n{again}"),
        },
        Err(e) => panic!("a loaded config does not serialize: {e}"),
    }
    if !cheap_to_build(&cfg) {
        return;
    }
    let registry = match Registry::build(&cfg) {
        Ok(r) => r,
        Err(e) => panic!("a validated configuration does not build: {e}\n{text}"),
    };
    for t in &cfg.targets {
        assert!(
            registry.target(&t.iqn).is_some(),
            "target {} missing from the registry",
            t.iqn
        );
    }
}
