//! One service in warden's model from JSON, checked as strictly as a services file:
//! shared by `redis-services` and `dynamodb-services`.

use warden_plugin_api::model::normalise_frontend;
use warden_plugin_api::serde_json::Value;
use warden_plugin_api::ServiceDefinition;

/// Parses one service given as a JSON object in warden's model; `key` is its name when
/// the object has none. The error says what is wrong, without the key (the caller
/// names it).
pub fn parse_value(key: &str, mut value: Value) -> Result<ServiceDefinition, String> {
    let field = key;
    let object = value
        .as_object_mut()
        .ok_or("not a JSON object (expected {\"match\": ..., \"frontends\": ...})")?;
    match object.get("name") {
        None => {
            object.insert("name".into(), Value::String(field.to_owned()));
        }
        Some(Value::String(n)) if n == field => {}
        Some(other) => return Err(format!("name {other} differs from the field's name")),
    }
    let mut unknown = Vec::new();
    let mut s: ServiceDefinition =
        serde_ignored::deserialize(value, |path| unknown.push(path.to_string()))
            .map_err(|e| e.to_string())?;
    if let Some(key) = unknown.first() {
        return Err(format!("unknown key `{key}`"));
    }
    if s.name.trim().is_empty() {
        return Err("the name is empty".into());
    }
    if s.matches.is_empty() {
        return Err(
            "match: say how its containers are recognised (image, image_prefix, name, labels or ecs_family)"
                .into(),
        );
    }
    if s.port == Some(0) || s.frontend_port == Some(0) {
        return Err("port and frontend_port must be 1-65535".into());
    }
    for f in s.frontends.iter_mut() {
        *f = normalise_frontend(f).map_err(|e| format!("frontends: {e}"))?;
    }
    Ok(s)
}
