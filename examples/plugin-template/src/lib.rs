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

#[cfg(test)]
mod tests {
    use super::*;
    use warden_plugin_api::serde_json::json;
    use warden_plugin_api::testing;

    // Tokio's test attribute, through warden_plugin_api (no tokio dependency of our own).
    #[warden_plugin_api::tokio::test(crate = "warden_plugin_api::tokio")]
    async fn measures_the_configured_value_as_warden_would() {
        let source = testing::metric_source::<Constant>(json!({ "value": 3.0 })).unwrap();
        let m = source.measure().await.unwrap();
        assert_eq!(m.value, 3.0);
        assert_eq!(m.unit.as_deref(), Some("tasks"));
        // Not offered: said, not a panic.
        let e = source.map(1.0).await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::Unsupported);
    }

    #[test]
    fn a_config_off_the_schema_is_refused_naming_the_field() {
        let e = testing::metric_source::<Constant>(json!({ "value": "three" }))
            .err()
            .unwrap();
        assert_eq!(e.kind, ErrorKind::Config);
        assert!(e.message.contains("value"), "{}", e.message);
        let e = testing::metric_source::<Constant>(json!({ "value": 1, "extra": 2 }))
            .err()
            .unwrap();
        assert!(e.message.contains("extra"), "{}", e.message);
    }
}
