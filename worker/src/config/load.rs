//! Loading: defaults ← file ← profile ← environment, with errors that name the file and key.

use super::{Config, ConfigError, ENV_CONFIG, ENV_PREFIX, ENV_PROFILE};
use figment::providers::{Env, Format, Toml};
use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider, Source};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Top-level key holding the profiles (`[profile.<name>]`).
const PROFILE_KEY: &str = "profile";
/// Metadata names of our layers, to tell them apart in errors.
const FILE_LAYER: &str = "config file";
const PROFILE_LAYER: &str = "profile ";
use super::SECTIONS;

/// Loads the config from `path` (or `$STEVEDORE_CONFIG`, or no file at all) with `profile` (or
/// `$STEVEDORE_PROFILE`, or none) and the `STEVEDORE_*` environment applied. A file given
/// explicitly or through the environment must exist.
pub fn load(path: Option<&Path>, profile: Option<&str>) -> Result<Config, ConfigError> {
    let (path, via_env) = match path {
        Some(p) => (Some(p.to_path_buf()), false),
        None => (
            std::env::var_os(ENV_CONFIG)
                .filter(|p| !p.is_empty())
                .map(PathBuf::from),
            true,
        ),
    };
    let Some(path) = path else {
        return build("", None, profile);
    };
    let label = path.display().to_string();
    let text = std::fs::read_to_string(&path).map_err(|e| ConfigError {
        file: Some(label.clone()),
        key: None,
        message: if via_env {
            format!("cannot read the config file named by {ENV_CONFIG}: {e}")
        } else {
            format!("cannot read the config file: {e}")
        },
    })?;
    build(&text, Some(&label), profile)
}

/// Loads the config from TOML text instead of a file; `profile` and the environment apply as in
/// [`load`]. Errors name no file.
pub fn from_toml_str(s: &str, profile: Option<&str>) -> Result<Config, ConfigError> {
    build(s, None, profile)
}

/// One layer of our own (the file's top level, or one profile), so errors can name it.
struct Layer {
    name: String,
    file: Option<String>,
    dict: Dict,
}

impl Provider for Layer {
    fn metadata(&self) -> Metadata {
        let md = Metadata::named(self.name.clone());
        match &self.file {
            Some(f) => md.source(Source::File(PathBuf::from(f))),
            None => md,
        }
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        Ok(Profile::Default.collect(self.dict.clone()))
    }
}

fn env() -> Env {
    // Filter before split: single-word variables (STEVEDORE_PROFILE, STEVEDORE_LOG...) are not keys.
    Env::prefixed(ENV_PREFIX)
        .filter(|k| k.as_str().contains("__"))
        .split("__")
}

fn build(text: &str, file: Option<&str>, profile: Option<&str>) -> Result<Config, ConfigError> {
    let (profile, profile_via_env) = match profile {
        Some(p) => (Some(p.to_string()), false),
        None => (
            std::env::var(ENV_PROFILE).ok().filter(|p| !p.is_empty()),
            true,
        ),
    };
    let at = |key: Option<&str>, message: String| ConfigError {
        file: file.map(str::to_string),
        key: key.map(str::to_string),
        message,
    };

    let mut dict = Toml::string(text)
        .data()
        .map_err(|e| at(None, format!("not valid TOML: {}", e.kind)))?
        .remove(&Profile::Default)
        .unwrap_or_default();
    let mut profiles = BTreeMap::new();
    match dict.remove(PROFILE_KEY) {
        None => {}
        Some(Value::Dict(_, all)) => {
            for (name, value) in all {
                let Value::Dict(_, d) = value else {
                    let key = format!("{PROFILE_KEY}.{name}");
                    return Err(at(
                        Some(&key),
                        "must be a table like [profile.name.worker]".into(),
                    ));
                };
                profiles.insert(name, d);
            }
        }
        Some(_) => {
            return Err(at(
                Some(PROFILE_KEY),
                "must be a table of profiles, like [profile.production.worker]".into(),
            ))
        }
    }

    let base = Layer {
        name: FILE_LAYER.into(),
        file: file.map(str::to_string),
        dict,
    };
    let layer = |name: &str, d: &Dict| Layer {
        name: format!("{PROFILE_LAYER}{name}"),
        file: file.map(str::to_string),
        dict: d.clone(),
    };

    // Every profile must at least parse, even the ones not selected, so typos surface early.
    for (name, d) in &profiles {
        let figment = Figment::new().merge(&base).merge(layer(name, d));
        figment
            .extract::<Config>()
            .map_err(|e| convert(e, &figment, file))?;
    }

    let mut figment = Figment::new().merge(&base);
    if let Some(name) = &profile {
        let Some(d) = profiles.get(name) else {
            let defined = if profiles.is_empty() {
                "none is defined".to_string()
            } else {
                let names: Vec<&str> = profiles.keys().map(String::as_str).collect();
                format!("defined: {}", names.join(", "))
            };
            let via = if profile_via_env {
                format!(" (from {ENV_PROFILE})")
            } else {
                String::new()
            };
            return Err(at(
                Some(PROFILE_KEY),
                format!("no profile \"{name}\"{via} in this config; {defined}"),
            ));
        };
        figment = figment.merge(layer(name, d));
    }
    let figment = figment.merge(env());
    let mut config: Config = figment.extract().map_err(|e| convert(e, &figment, file))?;
    config.source = file.map(str::to_string);
    config.profile = profile;
    config.origins = origins(&figment);
    Ok(config)
}

/// Where a value came from.
enum Origin {
    File,
    Profile(String),
    Env,
}

fn origin_of(md: Option<&Metadata>) -> Origin {
    match md {
        Some(md) if md.name.starts_with(PROFILE_LAYER) => {
            Origin::Profile(md.name[PROFILE_LAYER.len()..].to_string())
        }
        Some(md) if md.name != FILE_LAYER => Origin::Env,
        _ => Origin::File,
    }
}

/// The key as the user wrote it, given its path and origin.
fn written_key(path: &[String], origin: &Origin) -> String {
    match origin {
        Origin::File => path.join("."),
        Origin::Profile(p) => format!("{PROFILE_KEY}.{p}.{}", path.join(".")),
        Origin::Env => format!("{ENV_PREFIX}{}", path.join("__").to_ascii_uppercase()),
    }
}

/// Turns figment's first error into ours: key path (with the unknown field appended), the layer
/// that supplied the value, and a message that says what is allowed.
fn convert(err: figment::Error, figment: &Figment, file: Option<&str>) -> ConfigError {
    use figment::error::Kind;
    let Some(err) = err.into_iter().next() else {
        return ConfigError::new("invalid configuration");
    };
    let mut path = err.path.clone();
    let quoted = |names: &[&str]| {
        names
            .iter()
            .map(|n| format!("\"{n}\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let message = match &err.kind {
        Kind::UnknownField(field, allowed) => {
            if path.last() != Some(field) {
                path.push(field.clone());
            }
            if allowed.is_empty() {
                "unknown key: this table takes no keys".to_string()
            } else {
                format!("unknown key; allowed keys: {}", allowed.join(", "))
            }
        }
        Kind::UnknownVariant(value, allowed) => {
            format!("unknown value \"{value}\"; allowed: {}", quoted(allowed))
        }
        Kind::InvalidType(actual, expected) => format!("expected {expected}, found {actual}"),
        Kind::InvalidValue(actual, expected) => {
            format!("invalid value {actual}, expected {expected}")
        }
        other => other.to_string(),
    };
    let message = if path.last().is_some_and(|k| k == "bind") {
        format!("{message} (like \"127.0.0.1:9464\" or \"0.0.0.0:9464\")")
    } else if message.contains("time unit") || message.contains("expected a duration") {
        format!("{message} (durations look like \"500ms\", \"30s\", \"10m\", \"1h 30m\", \"7d\")")
    } else {
        message
    };
    let md = figment
        .find_metadata(&path.join("."))
        .or(err.metadata.as_ref());
    let origin = origin_of(md);
    ConfigError {
        file: match origin {
            Origin::Env => None,
            _ => file.map(str::to_string),
        },
        key: (!path.is_empty()).then(|| written_key(&path, &origin)),
        message,
    }
}

/// Keys set by the profile or the environment, mapped to where the user wrote them.
fn origins(figment: &Figment) -> BTreeMap<String, String> {
    fn walk(
        figment: &Figment,
        path: &mut Vec<String>,
        value: &Value,
        out: &mut BTreeMap<String, String>,
    ) {
        if let Value::Dict(_, dict) = value {
            for (k, v) in dict {
                path.push(k.clone());
                walk(figment, path, v, out);
                path.pop();
            }
            return;
        }
        let origin = origin_of(figment.get_metadata(value.tag()));
        if !matches!(origin, Origin::File) {
            out.insert(path.join("."), written_key(path, &origin));
        }
    }
    let mut out = BTreeMap::new();
    // Extraction succeeded, so these are the only top-level keys there can be.
    for section in SECTIONS {
        if let Ok(v) = figment.find_value(section) {
            walk(figment, &mut vec![section.to_string()], &v, &mut out);
        }
    }
    out
}
