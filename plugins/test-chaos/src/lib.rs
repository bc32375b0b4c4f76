//! Test-only plugin that misbehaves on demand, so the host's containment can be proven
//! against a real `.so`: each `measure` takes the next step of a configured sequence.
//!
//! Steps: `ok:<value>`, `panic`, `hang` (sleeps for an hour; drop-cancelled), `garbage`
//! (a NaN value, which JSON carries as null), `error:<kind>` (transient, permanent,
//! config), `sleep:<ms>` (then returns 1), `log` (emits a tracing event, returns 2),
//! `file:<path>` (the number in that file; a transient error if it holds none).
//! `create_delay_ms` makes `new` slow (or, with a large value, hang). `segfault` and
//! `spin` (an endless loop that never yields) are for process isolation;
//! `spin_once:<marker>` spins if the marker file is absent (creating it first) and
//! returns 7 once it exists (a read that hung once); `block:<ms>` blocks its thread
//! (`std::thread::sleep`), then returns 1; `env:<NAME>`
//! (1 when the variable is in the plugin's environment, else 0), `uid` (the process's
//! effective uid) and `nofile` (its open-files limit) show what an isolated process got.
#![allow(unsafe_code)] // system calls (signals, namespaces, processes) in test code

use std::sync::atomic::{AtomicUsize, Ordering};

use warden_plugin_api::prelude::*;
use warden_plugin_api::{tokio, tracing};

#[derive(Deserialize, JsonSchema)]
#[serde(crate = "warden_plugin_api::serde", deny_unknown_fields)]
#[schemars(crate = "warden_plugin_api::schemars")]
pub struct Config {
    /// Steps taken in turn, cycling.
    pub sequence: Vec<String>,
    /// Panic inside `new`.
    #[serde(default)]
    pub panic_on_create: bool,
    /// A file written when a `hang` step is cancelled by the host.
    #[serde(default)]
    pub cancel_marker: Option<String>,
    /// `new` takes this long before it returns (a plugin slow or hanging at start).
    #[serde(default)]
    pub create_delay_ms: u64,
}

pub struct Chaos {
    config: Config,
    next: AtomicUsize,
}

/// Writes the cancel marker when a hanging step is dropped before it ends.
struct OnCancel(Option<String>);
impl Drop for OnCancel {
    fn drop(&mut self) {
        if let Some(path) = &self.0 {
            let _ = std::fs::write(path, "cancelled");
        }
    }
}

impl MetricSource for Chaos {
    type Config = Config;

    async fn new(config: Config) -> Result<Self, PluginError> {
        if config.create_delay_ms > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(config.create_delay_ms)).await;
        }
        if config.panic_on_create {
            panic!("asked to panic on create");
        }
        if config.sequence.is_empty() {
            return Err(PluginError::config("sequence: must not be empty"));
        }
        Ok(Chaos {
            config,
            next: AtomicUsize::new(0),
        })
    }

    async fn measure(&self) -> Result<Measurement, PluginError> {
        let i = self.next.fetch_add(1, Ordering::SeqCst) % self.config.sequence.len();
        let step = self.config.sequence[i].as_str();
        let (verb, arg) = step.split_once(':').unwrap_or((step, ""));
        match verb {
            "ok" => arg
                .parse()
                .map(Measurement::new)
                .map_err(|_| PluginError::config(format!("bad step {step}"))),
            "panic" => panic!("chaos step {i} asked for a panic"),
            "hang" => {
                let guard = OnCancel(self.config.cancel_marker.clone());
                tokio::time::sleep(std::time::Duration::from_secs(3600)).await;
                std::mem::forget(guard);
                Ok(Measurement::new(0.0))
            }
            "garbage" => Ok(Measurement::new(f64::NAN)),
            // A crash no guard can catch: only process isolation contains it.
            "segfault" => {
                // SAFETY: deliberately unsound: the point is to die with SIGSEGV.
                unsafe { std::ptr::null_mut::<u32>().write_volatile(1) };
                Ok(Measurement::new(0.0))
            }
            // An endless loop that never yields: cancellation cannot reach it.
            "spin" => loop {
                std::hint::spin_loop();
            },
            "spin_once" => {
                if std::fs::metadata(arg).is_ok() {
                    return Ok(Measurement::new(7.0));
                }
                let _ = std::fs::write(arg, "spun");
                loop {
                    std::hint::spin_loop();
                }
            }
            "block" => {
                let ms = arg.parse().unwrap_or(1000);
                std::thread::sleep(std::time::Duration::from_millis(ms));
                Ok(Measurement::new(1.0))
            }
            "error" => Err(match arg {
                "permanent" => PluginError::permanent("chaos asked for a permanent error"),
                "config" => PluginError::config("chaos asked for a config error"),
                _ => PluginError::transient("chaos asked for a transient error"),
            }),
            "sleep" => {
                let ms = arg.parse().unwrap_or(10);
                tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
                Ok(Measurement::new(1.0))
            }
            "file" => {
                let text = std::fs::read_to_string(arg)
                    .map_err(|e| PluginError::transient(format!("{arg}: {e}")))?;
                text.trim().parse().map(Measurement::new).map_err(|_| {
                    PluginError::transient(format!("{arg}: {:?} is not a number", text.trim()))
                })
            }
            "env" => Ok(Measurement::new(if std::env::var_os(arg).is_some() {
                1.0
            } else {
                0.0
            })),
            "uid" | "nofile" => {
                let (file, field, at) = if verb == "uid" {
                    ("/proc/self/status", "Uid:", 2)
                } else {
                    ("/proc/self/limits", "Max open files", 3)
                };
                let text = std::fs::read_to_string(file)
                    .map_err(|e| PluginError::transient(format!("{file}: {e}")))?;
                text.lines()
                    .find(|l| l.starts_with(field))
                    .and_then(|l| l.split_whitespace().nth(at))
                    .and_then(|v| v.parse().ok())
                    .map(Measurement::new)
                    .ok_or_else(|| PluginError::transient(format!("no {field} in {file}")))
            }
            "log" => {
                tracing::warn!(step = i, "chaos plugin says hello");
                Ok(Measurement::new(2.0))
            }
            _ => Err(PluginError::config(format!("unknown step {step:?}"))),
        }
    }
}

/// A service source that misbehaves on demand: each `list` takes the next step of its
/// sequence: `ok` (the configured services), `spin`, `spin_once:<marker>` (as for
/// metrics; the services once the marker exists), `block:<ms>` (blocks its thread, then
/// the services), `error` (a transient error).
#[derive(Deserialize, JsonSchema)]
#[serde(crate = "warden_plugin_api::serde", deny_unknown_fields)]
#[schemars(crate = "warden_plugin_api::schemars")]
pub struct ServicesConfig {
    /// Steps taken in turn, cycling.
    pub sequence: Vec<String>,
    /// The service definitions answered (as a services file holds them).
    pub services: Vec<warden_plugin_api::serde_json::Value>,
}

pub struct ChaosServices {
    sequence: Vec<String>,
    services: Vec<ServiceDefinition>,
    next: AtomicUsize,
}

impl ServiceDefinitions for ChaosServices {
    type Config = ServicesConfig;

    async fn new(config: ServicesConfig) -> Result<Self, PluginError> {
        if config.sequence.is_empty() {
            return Err(PluginError::config("sequence: must not be empty"));
        }
        let services = config
            .services
            .into_iter()
            .map(warden_plugin_api::serde_json::from_value)
            .collect::<Result<Vec<ServiceDefinition>, _>>()
            .map_err(|e| PluginError::config(format!("services: {e}")))?;
        Ok(ChaosServices {
            sequence: config.sequence,
            services,
            next: AtomicUsize::new(0),
        })
    }

    async fn list(&self) -> Result<Vec<ServiceDefinition>, PluginError> {
        let i = self.next.fetch_add(1, Ordering::SeqCst) % self.sequence.len();
        let step = self.sequence[i].as_str();
        let (verb, arg) = step.split_once(':').unwrap_or((step, ""));
        match verb {
            "ok" => {}
            "spin" => loop {
                std::hint::spin_loop();
            },
            "spin_once" => {
                if std::fs::metadata(arg).is_err() {
                    let _ = std::fs::write(arg, "spun");
                    loop {
                        std::hint::spin_loop();
                    }
                }
            }
            "block" => std::thread::sleep(std::time::Duration::from_millis(
                arg.parse().unwrap_or(1000),
            )),
            "error" => return Err(PluginError::transient("chaos asked for an error")),
            _ => return Err(PluginError::config(format!("unknown step {step:?}"))),
        }
        Ok(self.services.clone())
    }

    async fn generation(&self) -> Result<u64, PluginError> {
        Ok(1)
    }
}

export_plugin! { name: "test-chaos", metric_source: Chaos, service_definitions: ChaosServices }
