//! Service definitions from a TOML or JSON file, picked up when the file changes.
//!
//! Operators who do not label their containers describe services in a file. A bad edit
//! must never take routes away: the last good set is kept and the error, with line and
//! column, is logged and returned by `generation` callers through the log.
//!
//! ```toml
//! [[services]]
//! name = "web"
//! port = 80
//! frontends = ["example.com", "example.com/api/"]
//! frontend_port = 8001
//! elb = "web-elb"
//! match = { image_prefix = "registry.example/web" }
//! ```
//! A `.json` file holds the same as `{"services": [...]}`.
//!
//! A `.json` file whose top level is an array is a service file of the original warden:
//! the Perl version's (`Name`, `BackendName`, `ContainerName`, ...) or the Go version's
//! (`name`, `backendName`, `containerName`, ...), mapped onto warden's model by
//! [`legacy`] (the README's table says what each field becomes).
//!
//! The file enrols the host in load balancers and names what the manager runs, so it
//! gets the same check as a plugin file (StrictModes: not writable by group or others,
//! owned by root or warden's user, every directory up to `/` likewise), at start and at
//! every re-read: a file that fails it is refused (at start) or ignored, keeping the
//! last good services.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use warden_plugin_api::prelude::*;
use warden_plugin_api::serde::de::DeserializeOwned;
use warden_plugin_api::{serde, serde_json, tracing};

#[derive(Deserialize, JsonSchema)]
#[serde(crate = "warden_plugin_api::serde", deny_unknown_fields)]
#[schemars(crate = "warden_plugin_api::schemars")]
pub struct Config {
    /// Path of the services file (`.json` for JSON, anything else is TOML).
    pub path: String,
}

#[derive(Deserialize)]
#[serde(crate = "warden_plugin_api::serde", deny_unknown_fields)]
struct ServicesFile {
    #[serde(default)]
    services: Vec<ServiceDefinition>,
}

/// Parses and checks a services file. Errors name the line and column, or the service
/// and field, that is wrong.
pub fn parse_services(text: &str, json: bool) -> Result<Vec<ServiceDefinition>, String> {
    if json && text.trim_start().starts_with('[') {
        return validate(legacy::parse(text)?);
    }
    let file: ServicesFile = if json {
        strict(&mut serde_json::Deserializer::from_str(text)).map_err(|e| e.to_string())?
    } else {
        strict(toml::Deserializer::new(text))
            .map_err(|e| e.to_string().trim_end().replace('\n', " "))?
    };
    validate(file.services)
}

/// Deserializes, turning any key the types do not know into an error (a typo in a
/// services file must not silently drop a setting).
fn strict<'de, D, T>(de: D) -> Result<T, String>
where
    D: serde::Deserializer<'de>,
    D::Error: std::fmt::Display,
    T: DeserializeOwned,
{
    let mut unknown = Vec::new();
    let value: T = serde_ignored::deserialize(de, |path| unknown.push(path.to_string()))
        .map_err(|e| e.to_string())?;
    match unknown.first() {
        Some(key) => Err(format!("unknown key `{key}`")),
        None => Ok(value),
    }
}

fn validate(mut services: Vec<ServiceDefinition>) -> Result<Vec<ServiceDefinition>, String> {
    let mut names = BTreeSet::new();
    let mut ports = BTreeSet::new();
    for (i, s) in services.iter_mut().enumerate() {
        let at = format!("services[{i}] ({:?})", s.name);
        if s.name.trim().is_empty() {
            return Err(format!("services[{i}].name: must not be empty"));
        }
        if !names.insert(s.name.clone()) {
            return Err(format!("{at}.name: another service has this name"));
        }
        if s.matches.is_empty() {
            return Err(format!(
                "{at}.match: say how its containers are recognised (image, image_prefix, name, labels or ecs_family)"
            ));
        }
        if s.port == Some(0) {
            return Err(format!("{at}.port: must be 1-65535"));
        }
        if let Some(p) = s.frontend_port {
            if p == 0 {
                return Err(format!("{at}.frontend_port: must be 1-65535"));
            }
            if !ports.insert(p) {
                return Err(format!(
                    "{at}.frontend_port: {p} is already another service's front-end port"
                ));
            }
        }
        for f in s.frontends.iter_mut() {
            *f = normalise_frontend(f).map_err(|e| format!("{at}.frontends: {e}"))?;
        }
    }
    Ok(services)
}

pub use warden_plugin_api::model::normalise_frontend;

use warden_plugin_common::legacy;

#[derive(PartialEq, Clone, Copy)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
    #[cfg(unix)]
    inode: u64,
}

fn stamp(path: &Path) -> std::io::Result<Stamp> {
    let m = std::fs::metadata(path)?;
    Ok(Stamp {
        modified: m.modified().ok(),
        len: m.len(),
        #[cfg(unix)]
        inode: std::os::unix::fs::MetadataExt::ino(&m),
    })
}

struct State {
    stamp: Option<Stamp>,
    text: String,
    services: Vec<ServiceDefinition>,
    generation: u64,
}

pub struct FileServices {
    path: PathBuf,
    json: bool,
    state: Mutex<State>,
}

impl FileServices {
    /// Re-reads the file if its metadata changed. A bad edit keeps the last good set.
    fn refresh(&self) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = stamp(&self.path).ok();
        if now == st.stamp {
            return;
        }
        st.stamp = now;
        if let Err(e) = warden_plugin_api::sdk::trust::check_file(&self.path) {
            tracing::error!(path = %self.path.display(), "the services file is not safe to act on, keeping the last good services: {e}");
            return;
        }
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) => {
                tracing::error!(path = %self.path.display(), "cannot read the services file, keeping the last good services: {e}");
                return;
            }
        };
        if text == st.text {
            return;
        }
        match parse_services(&text, self.json) {
            Ok(services) => {
                st.generation += 1;
                tracing::info!(path = %self.path.display(), count = services.len(), generation = st.generation, "services file reloaded");
                st.services = services;
                st.text = text;
            }
            Err(e) => {
                tracing::error!(path = %self.path.display(), "services file is invalid, keeping the last good services: {e}");
            }
        }
    }
}

impl ServiceDefinitions for FileServices {
    type Config = Config;

    async fn new(config: Config) -> Result<Self, PluginError> {
        let path = PathBuf::from(&config.path);
        let json = path.extension().is_some_and(|e| e == "json");
        warden_plugin_api::sdk::trust::check_file(&path).map_err(|e| {
            PluginError::config(format!(
                "path: {e} (a services file steers load balancers and ECS: whoever can write it must be trusted like root)"
            ))
        })?;
        let text = std::fs::read_to_string(&path).map_err(|e| {
            PluginError::config(format!("path: cannot read {}: {e}", path.display()))
        })?;
        let services = parse_services(&text, json)
            .map_err(|e| PluginError::config(format!("{}: {e}", path.display())))?;
        let state = State {
            stamp: stamp(&path).ok(),
            text,
            services,
            generation: 1,
        };
        Ok(FileServices {
            path,
            json,
            state: Mutex::new(state),
        })
    }

    async fn list(&self) -> Result<Vec<ServiceDefinition>, PluginError> {
        self.refresh();
        Ok(self
            .state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .services
            .clone())
    }

    async fn generation(&self) -> Result<u64, PluginError> {
        self.refresh();
        Ok(self
            .state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .generation)
    }
}

export_plugin! { name: "file-services", service_definitions: FileServices }

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[[services]]
name = "web"
port = 80
frontends = ["Example.com", "example.com/api"]
frontend_port = 8001
match = { image_prefix = "registry.example/web" }
"#;

    #[test]
    fn parses_toml_and_normalises_frontends() {
        let s = parse_services(GOOD, false).unwrap();
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].frontends, vec!["example.com", "example.com/api/"]);
        assert_eq!(
            s[0].matches.image_prefix.as_deref(),
            Some("registry.example/web")
        );
    }

    #[warden_plugin_api::tokio::test(crate = "warden_plugin_api::tokio")]
    async fn a_file_others_can_write_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("services.toml");
        std::fs::write(&f, GOOD).unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o666)).unwrap();
        let e = FileServices::new(Config {
            path: f.to_str().unwrap().to_owned(),
        })
        .await
        .err()
        .expect("refused");
        assert!(e.message.contains("writable by"), "{e}");
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        let fs = FileServices::new(Config {
            path: f.to_str().unwrap().to_owned(),
        })
        .await
        .unwrap();
        assert_eq!(fs.list().await.unwrap().len(), 1);
        // Made writable later, with a new content: ignored, the last good set kept.
        std::fs::write(&f, "").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o666)).unwrap();
        assert_eq!(fs.list().await.unwrap().len(), 1);
    }

    #[test]
    fn parses_json() {
        let s = parse_services(
            r#"{"services":[{"name":"a","match":{"ecs_family":"a"}}]}"#,
            true,
        )
        .unwrap();
        assert_eq!(s[0].matches.ecs_family.as_deref(), Some("a"));
    }

    #[test]
    fn syntax_errors_name_line_and_column() {
        let e = parse_services("[[services]]\nname = \"web\"\nport = \n", false).unwrap_err();
        assert!(e.contains("line 3"), "{e}");
        let e = parse_services("{\"services\": [\n  {\"name\": }]}", true).unwrap_err();
        assert!(e.contains("line 2 column"), "{e}");
    }

    #[test]
    fn unknown_keys_and_bad_values_are_named() {
        let e = parse_services(&GOOD.replace("port = 80", "prot = 80"), false).unwrap_err();
        assert!(e.contains("prot"), "{e}");
        let e = parse_services(&GOOD.replace("port = 80", "port = 70000"), false).unwrap_err();
        assert!(e.contains("line 4"), "{e}");
        let e = parse_services("[[services]]\nname = \"x\"\n", false).unwrap_err();
        assert!(e.contains("services[0] (\"x\").match"), "{e}");
        let dup = format!("{GOOD}{}", GOOD.replace("\"web\"", "\"api\""));
        let e = parse_services(&dup, false).unwrap_err();
        assert!(e.contains("frontend_port: 8001"), "{e}");
    }

    const PERL: &str = include_str!("../fixtures/perl-services.json");
    const GO: &str = include_str!("../fixtures/go-services.json");

    #[test]
    fn the_original_wardens_files_are_read_in_both_spellings() {
        for text in [PERL, GO] {
            let s = parse_services(text, true).unwrap();
            assert_eq!(s.len(), 2, "{text}");
            assert_eq!(s[0].name, "service-1");
            assert_eq!(s[0].backend.as_deref(), Some("backend-1"));
            assert_eq!(
                s[0].matches.image.as_deref(),
                Some("amazon/amazon-ecs-sample")
            );
            assert_eq!(s[0].elb.as_deref(), Some("load-balancer-1"));
            assert_eq!(s[0].port, Some(80));
            assert_eq!(s[0].frontends, vec!["load-balancer-1.warden"]);
            assert_eq!(s[1].frontends, vec!["load-balancer-2.warden/fcgi-bin/"]);
        }
    }

    #[test]
    fn an_unknown_field_of_an_original_file_is_named_with_line_and_column() {
        let bad = PERL.replacen("\"Site\"", "\"Sitee\"", 1);
        let e = parse_services(&bad, true).unwrap_err();
        assert!(e.contains("unknown field `Sitee`"), "{e}");
        assert!(e.contains("line 9 column"), "{e}");
        let bad = GO.replacen("\"port\": 80", "\"port\": \"80\"", 1);
        let e = parse_services(&bad, true).unwrap_err();
        assert!(e.contains("line 8 column"), "{e}");
    }

    #[test]
    fn a_bad_edit_keeps_the_last_good_set() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("services.toml");
        std::fs::write(&path, GOOD).unwrap();
        let plugin = __warden_plugin_descriptor()
            .create_local(
                warden_plugin_api::Kind::ServiceDefinitions,
                serde_json::json!({ "path": path.to_str().unwrap() }),
            )
            .unwrap();
        let call = |op: &str| {
            let plugin = plugin.clone();
            let op = op.to_owned();
            warden_plugin_api::sdk::runtime()
                .block_on(async move { plugin.call(op, String::new()).await.unwrap() })
        };
        assert_eq!(call("generation"), "1");
        // A broken edit (rename so that the stamp surely changes).
        let tmp = dir.path().join("tmp");
        std::fs::write(&tmp, "[[services]\n").unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        assert_eq!(call("generation"), "1");
        assert!(call("list").contains("\"web\""));
        // A good edit.
        std::fs::write(&tmp, GOOD.replace("\"web\"", "\"shop\"")).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        assert_eq!(call("generation"), "2");
        let listed = call("list");
        assert!(
            listed.contains("\"shop\"") && !listed.contains("\"web\""),
            "{listed}"
        );
    }
}
