//! Checks a plugin instance's config against the JSON Schema its plugin publishes, so a
//! bad config is refused with the key that is wrong before any plugin code runs.

pub use warden_plugin_api::schema::validate;

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
    fn a_wrong_value_is_not_echoed() {
        let e = validate(
            &schema(),
            &json!({ "path": "/x", "limits": { "max": "hunter2" } }),
        )
        .unwrap_err();
        assert!(
            e[0].starts_with("limits.max: ") && !e[0].contains("hunter2"),
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
