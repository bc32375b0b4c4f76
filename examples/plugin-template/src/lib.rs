//! A complete warden metric plugin: copy this crate and change `Constant`.
use warden_plugin_api::prelude::*;

/// Config, checked by warden against the JSON Schema derived here.
#[derive(Deserialize, JsonSchema)]
#[serde(crate = "warden_plugin_api::serde", deny_unknown_fields)]
#[schemars(crate = "warden_plugin_api::schemars")]
pub struct Config {
    /// The value every measurement returns.
    pub value: f64,
}

pub struct Constant(Config);

impl MetricSource for Constant {
    type Config = Config;

    async fn new(config: Config) -> Result<Self, PluginError> {
        Ok(Constant(config))
    }

    async fn measure(&self) -> Result<Measurement, PluginError> {
        Ok(Measurement::new(self.0.value).unit("tasks"))
    }
}

export_plugin! { name: "template", metric_source: Constant }
