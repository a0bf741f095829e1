//! The config loader: any TOML text (and profile) loads or fails with an error, never a panic,
//! and whatever loads validates or fails with an error naming a key.
#![no_main]

use libfuzzer_sys::fuzz_target;
use stevedore::config::from_toml_str;
use stevedore_core::memory::MemoryBroker;
use stevedore_core::Broker;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (profile, toml) = match text.split_once('\n') {
        Some((first, rest)) if first.starts_with("#profile ") => (Some(&first[9..]), rest),
        _ => (None, text),
    };
    let Ok(config) = from_toml_str(toml, profile) else {
        return;
    };
    let caps = MemoryBroker::new().capabilities().clone();
    if let Err(e) = config.validate(&caps) {
        assert!(!e.to_string().is_empty());
    }
});
