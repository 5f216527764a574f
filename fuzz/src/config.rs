//! `config`: any text into `Config::from_toml`; a configuration that passes
//! validation is also built into a `Registry` when that is cheap (memory and
//! null LUs of at most 1 MiB, no file backends: building opens files).

use iscsi_target::config::{parse_size, BackendKind, Config};
use iscsi_target::Registry;

const MAX_LU_BYTES: u64 = 1 << 20;
const MAX_LUS: usize = 16;

fn cheap_to_build(cfg: &Config) -> bool {
    let luns = cfg.targets.iter().map(|t| t.luns.len()).sum::<usize>();
    luns <= MAX_LUS
        && cfg.targets.iter().flat_map(|t| &t.luns).all(|l| {
            l.backend != BackendKind::File
                && l.size.as_deref().and_then(parse_size).is_some_and(|s| s <= MAX_LU_BYTES)
        })
}

pub fn run(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(cfg) = Config::from_toml(text) else {
        return;
    };
    assert!(cfg.validate().is_ok(), "validate() disagrees with from_toml()");
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
        assert!(registry.target(&t.iqn).is_some(), "target {} missing from the registry", t.iqn);
    }
}
