//! Checks a plugin instance's config against the JSON Schema its plugin publishes, so a
//! bad config is refused with the key that is wrong before any plugin code runs.

/// Validates `config`; each error names the key (as a JSON pointer) and what was expected.
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
            format!("{at}: {e}")
        })
        .collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schema() -> serde_json::Value {
        json!({
            "type": "object",
            "properties": {
                "path": { "type": "string" },
                "limits": { "type": "object", "properties": { "max": { "type": "integer", "minimum": 1 } } }
            },
            "required": ["path"],
            "additionalProperties": false
        })
    }

    #[test]
    fn accepts_a_good_config() {
        validate(&schema(), &json!({ "path": "/x", "limits": { "max": 3 } })).unwrap();
    }

    #[test]
    fn names_the_wrong_key_and_the_expectation() {
        let e = validate(&schema(), &json!({ "path": 3 })).unwrap_err();
        assert_eq!(e.len(), 1);
        assert!(
            e[0].starts_with("path: ") && e[0].contains("string"),
            "{e:?}"
        );
        let e = validate(&schema(), &json!({ "path": "/x", "limits": { "max": 0 } })).unwrap_err();
        assert!(
            e[0].starts_with("limits.max: ") && e[0].contains("minimum"),
            "{e:?}"
        );
    }

    #[test]
    fn missing_and_unknown_keys_are_reported() {
        let e = validate(&schema(), &json!({ "pth": "/x" })).unwrap_err();
        let all = e.join("; ");
        assert!(all.contains("\"path\" is a required property"), "{all}");
        assert!(all.contains("pth"), "{all}");
    }
}
