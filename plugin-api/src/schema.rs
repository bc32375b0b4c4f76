//! Checks an instance's config against the JSON Schema its plugin publishes, so a bad
//! config is refused with the key that is wrong before any plugin code runs. The host and
//! [`crate::testing`] use this one function, so a plugin's tests refuse exactly what
//! warden refuses.

/// Validates `config`; each error names the key (as a JSON pointer) and what was
/// expected, never the value found (a config may hold a password).
pub fn validate(schema: &serde_json::Value, config: &serde_json::Value) -> Result<(), Vec<String>> {
    let validator = match jsonschema::validator_for(schema) {
        Ok(v) => v,
        Err(e) => {
            return Err(vec![format!(
                "the plugin's config schema is itself invalid: {e}"
            )])
        }
    };
    let errors: Vec<String> = validator
        .iter_errors(config)
        .map(|e| {
            let at = e.instance_path().to_string();
            let at = if at.is_empty() {
                "(top level)".to_owned()
            } else {
                at.trim_start_matches('/').replace('/', ".")
            };
            format!("{at}: {}", e.masked_with("the value given"))
        })
        .collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}
