//! `dynamodb-services`: service definitions from a DynamoDB table, one item per service:
//! the layout the original warden's author planned and never finished (table
//! `service-description`, key `Id`, GSI `ServiceDescriptionByContainerName`).
//!
//! An item holds the original's fields as the Perl version spelled them (`Name`,
//! `BackendName`, `ContainerName`, `LoadBalancerName`, `LoadBalancerUrl`, `Port`, `Site`,
//! `TaskName`, `TaskVersion`), mapped as `file-services` maps a service file of the
//! original, plus any of warden's own keys (`frontends`, `frontend_port`, `match`,
//! `drain_seconds`, `manage`, ...), which win. An item without `Name` is in warden's
//! model alone (`name`, or the key attribute as its name).
//!
//! Why these rules:
//! * The table is read whole by a Scan with a consistent read, page after page, at most
//!   every `refresh_secs`, when the host asks for the generation; the generation changes
//!   only when the items do. A Scan, not a Query: a host needs every service.
//! * A read that fails (throttling, a network cut, even the table gone) keeps the last
//!   good set: routes are never taken away by a read error. It is said once, and the
//!   recovery once.
//! * An item that does not parse is skipped with one warning naming its key; the others
//!   are served. The warning comes again only when what is wrong with it changes, or
//!   after it was fixed (the rules shared with `redis-services` are in `snapshot.rs`).

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use aws_sdk_dynamodb::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::types::AttributeValue;
use warden_plugin_api::prelude::*;
use warden_plugin_api::serde_json::{self, Map, Value};
use warden_plugin_api::tokio::sync::Mutex;
use warden_plugin_api::tracing;

use snapshot::Snapshot;
use warden_plugin_common::{entry, legacy, snapshot};

/// `[[registrar.sources]] plugin = "dynamodb-services"` (or `[[manager.sources]]`).
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(crate = "warden_plugin_api::serde", deny_unknown_fields)]
#[schemars(crate = "warden_plugin_api::schemars")]
pub struct Config {
    /// The table's name.
    #[serde(default = "default_table")]
    pub table: String,
    /// The table's partition key: named in warnings, never part of the service.
    #[serde(default = "default_key")]
    pub key_attribute: String,
    /// How often the table is read, at most, in seconds (each read is a full Scan).
    #[serde(default = "default_refresh_secs")]
    pub refresh_secs: u64,
    /// AWS region (default: the SDK's chain: AWS_REGION, profile, instance metadata).
    #[serde(default)]
    pub region: Option<String>,
}

fn default_table() -> String {
    "service-description".into()
}
fn default_key() -> String {
    "Id".into()
}
fn default_refresh_secs() -> u64 {
    10
}

/// A DynamoDB attribute as JSON (numbers as JSON numbers, sets as arrays).
pub fn attribute_json(v: &AttributeValue) -> Result<Value, String> {
    Ok(match v {
        AttributeValue::S(s) => Value::String(s.clone()),
        AttributeValue::N(n) => {
            let number = n
                .parse::<i64>()
                .map(Value::from)
                .or_else(|_| n.parse::<f64>().map(Value::from))
                .map_err(|_| format!("number {n:?} does not parse"))?;
            if number.is_null() {
                return Err(format!("number {n:?} is not finite"));
            }
            number
        }
        AttributeValue::Bool(b) => Value::Bool(*b),
        AttributeValue::Null(_) => Value::Null,
        AttributeValue::Ss(list) => list.iter().cloned().map(Value::String).collect(),
        AttributeValue::L(list) => list
            .iter()
            .map(attribute_json)
            .collect::<Result<Vec<_>, _>>()?
            .into(),
        AttributeValue::M(map) => Value::Object(
            map.iter()
                .map(|(k, v)| {
                    Ok((
                        k.clone(),
                        attribute_json(v).map_err(|e| format!("{k}: {e}"))?,
                    ))
                })
                .collect::<Result<Map<_, _>, String>>()?,
        ),
        other => return Err(format!("unsupported attribute type {other:?}")),
    })
}

/// The item's key as shown in warnings.
pub fn item_key(key_attribute: &str, item: &Map<String, Value>) -> String {
    match item.get(key_attribute) {
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
        None => format!("(no {key_attribute})"),
    }
}

/// One item as a service (see the module doc). The error says what is wrong.
pub fn parse_item(
    key_attribute: &str,
    mut item: Map<String, Value>,
) -> Result<ServiceDefinition, String> {
    let key = item_key(key_attribute, &item);
    item.remove(key_attribute);
    let (original, own): (Map<String, Value>, Map<String, Value>) = item
        .into_iter()
        .partition(|(k, _)| legacy::PERL_FIELDS.contains(&k.as_str()));
    if original.is_empty() {
        return entry::parse_value(&key, Value::Object(own));
    }
    let base = legacy::from_value(Value::Object(original))?;
    let name = base.name.clone();
    let mut merged = match serde_json::to_value(base) {
        Ok(Value::Object(m)) => m,
        _ => return Err("cannot re-encode the service".into()),
    };
    if own.contains_key("name") {
        return Err("both Name and name are given".into());
    }
    merged.extend(own);
    entry::parse_value(&name, Value::Object(merged))
}

/// An item as read: its attributes as JSON, or why they do not convert.
pub type Item = Result<Map<String, Value>, (String, String)>;

/// The services of all items, and the items skipped (key, why).
pub fn parse_items(
    key_attribute: &str,
    items: &[Item],
) -> (Vec<ServiceDefinition>, Vec<(String, String)>) {
    let (mut good, mut bad) = (Vec::new(), Vec::new());
    let mut names = BTreeSet::new();
    for item in items {
        let item = match item {
            Ok(m) => m,
            Err(skipped) => {
                bad.push(skipped.clone());
                continue;
            }
        };
        let key = item_key(key_attribute, item);
        match parse_item(key_attribute, item.clone()) {
            Ok(s) if !names.insert(s.name.clone()) => {
                bad.push((key, format!("service {:?} is also another item's", s.name)))
            }
            Ok(s) => good.push(s),
            Err(why) => bad.push((key, why)),
        }
    }
    (good, bad)
}

/// A provider of the services in one DynamoDB table.
pub struct DynamoServices {
    config: Config,
    client: aws_sdk_dynamodb::Client,
    snapshot: Mutex<Snapshot<Vec<Item>>>,
}

impl DynamoServices {
    /// The whole table, page after page, each item as JSON (sorted by key, so that the
    /// same table always reads the same). An item whose attributes do not convert is
    /// kept as an error named by its key.
    async fn scan(&self) -> Result<Vec<Item>, String> {
        let key = &self.config.key_attribute;
        let mut items = Vec::new();
        let mut start: Option<HashMap<String, AttributeValue>> = None;
        loop {
            let page = self
                .client
                .scan()
                .table_name(&self.config.table)
                .consistent_read(true)
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(describe)?;
            for item in page.items() {
                let converted: Result<Map<String, Value>, String> = item
                    .iter()
                    .map(|(k, v)| {
                        Ok((
                            k.clone(),
                            attribute_json(v).map_err(|e| format!("{k}: {e}"))?,
                        ))
                    })
                    .collect();
                items.push(converted.map_err(|why| {
                    let shown = item
                        .get(key)
                        .and_then(|v| v.as_s().ok())
                        .cloned()
                        .unwrap_or_else(|| format!("(no {key})"));
                    (shown, why)
                }));
            }
            match page.last_evaluated_key() {
                Some(k) if !k.is_empty() => start = Some(k.clone()),
                _ => break,
            }
        }
        items.sort_by_key(|i| match i {
            Ok(m) => item_key(key, m),
            Err((k, _)) => k.clone(),
        });
        Ok(items)
    }

    async fn refresh(&self, snapshot: &mut Snapshot<Vec<Item>>) {
        let every = Duration::from_secs(self.config.refresh_secs);
        if !snapshot.due(every, Instant::now()) {
            return;
        }
        let table = &self.config.table;
        let items = match self.scan().await {
            Ok(items) => items,
            Err(e) => {
                if let Some(held) = snapshot.failed() {
                    tracing::warn!(table = %table, error = %e, held,
                        "cannot read the services table; keeping the last good set");
                }
                return;
            }
        };
        let read = snapshot.read(items, |items| {
            parse_items(&self.config.key_attribute, items)
        });
        if read.recovered {
            tracing::info!(table = %table, "services table readable again");
        }
        for (key, why) in read.newly_skipped {
            tracing::warn!(table = %table, item = %key, error = %why, "service item skipped");
        }
    }

    fn never_read(&self) -> PluginError {
        PluginError::transient(format!(
            "the services table {:?} has not been read yet",
            self.config.table
        ))
    }
}

fn describe<E, R>(e: SdkError<E, R>) -> String
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    match &e {
        SdkError::ServiceError(s) => format!(
            "{}: {}",
            s.err().code().unwrap_or("error"),
            s.err().message().unwrap_or("")
        ),
        _ => DisplayErrorContext(&e).to_string(),
    }
}

impl ServiceDefinitions for DynamoServices {
    type Config = Config;

    async fn new(config: Config) -> Result<Self, PluginError> {
        if config.table.trim().is_empty() {
            return Err(PluginError::config("table: must not be empty"));
        }
        if !(1..=3600).contains(&config.refresh_secs) {
            return Err(PluginError::config(format!(
                "refresh_secs: {} is outside 1..=3600",
                config.refresh_secs
            )));
        }
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .app_name(aws_config::AppName::new("warden-dynamodb-services").expect("valid"));
        if let Some(r) = &config.region {
            loader = loader.region(aws_config::Region::new(r.clone()));
        }
        Ok(DynamoServices {
            client: aws_sdk_dynamodb::Client::new(&loader.load().await),
            config,
            snapshot: Mutex::new(Snapshot::default()),
        })
    }

    async fn list(&self) -> Result<Vec<ServiceDefinition>, PluginError> {
        let mut snapshot = self.snapshot.lock().await;
        self.refresh(&mut snapshot).await;
        let services = snapshot.services().map(<[_]>::to_vec);
        services.ok_or_else(|| self.never_read())
    }

    async fn generation(&self) -> Result<u64, PluginError> {
        let mut snapshot = self.snapshot.lock().await;
        self.refresh(&mut snapshot).await;
        snapshot.generation().ok_or_else(|| self.never_read())
    }
}

export_plugin! { name: "dynamodb-services", service_definitions: DynamoServices }

#[cfg(test)]
mod tests {
    use super::*;
    use warden_plugin_api::serde_json::json;

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn an_original_item_is_mapped_and_warden_keys_win() {
        let s = parse_item(
            "Id",
            obj(
                json!({"Id": "1", "Name": "web", "ContainerName": "repo/web",
                "LoadBalancerUrl": "web.example", "Site": "/api", "Port": 80,
                "BackendName": "web-backend", "TaskName": "web", "TaskVersion": "3",
                "frontend_port": 8001, "drain_seconds": 5}),
            ),
        )
        .unwrap();
        assert_eq!(s.name, "web");
        assert_eq!(s.matches.image.as_deref(), Some("repo/web"));
        assert_eq!(s.frontends, vec!["web.example/api/"]);
        assert_eq!(s.backend.as_deref(), Some("web-backend"));
        assert_eq!(
            (s.port, s.frontend_port, s.drain_seconds),
            (Some(80), Some(8001), Some(5))
        );
    }

    #[test]
    fn an_item_in_wardens_model_takes_its_key_as_name() {
        let s = parse_item("Id", obj(json!({"Id": "api", "match": {"image": "api"}}))).unwrap();
        assert_eq!(s.name, "api");
    }

    #[test]
    fn bad_items_are_skipped_by_key_and_the_rest_kept() {
        let items = vec![
            Ok(obj(
                json!({"Id": "1", "Name": "web", "ContainerName": "web"}),
            )),
            Ok(obj(json!({"Id": "2", "Name": "no-container"}))),
            Ok(obj(
                json!({"Id": "3", "Name": "typo", "ContainerName": "x", "frontend_prot": 1}),
            )),
            Ok(obj(
                json!({"Id": "4", "Name": "web", "ContainerName": "web2"}),
            )),
            Err((
                "5".to_owned(),
                "Port: number \"x\" does not parse".to_owned(),
            )),
        ];
        let (good, bad) = parse_items("Id", &items);
        assert_eq!(good.len(), 1);
        let keys: Vec<_> = bad.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["2", "3", "4", "5"]);
        assert!(bad[0].1.to_lowercase().contains("containername"), "{bad:?}");
        assert!(bad[1].1.contains("frontend_prot"), "{bad:?}");
    }

    #[test]
    fn attributes_convert_to_json() {
        let m = AttributeValue::M(HashMap::from([
            ("n".to_owned(), AttributeValue::N("80".into())),
            ("f".to_owned(), AttributeValue::N("1.5".into())),
            (
                "l".to_owned(),
                AttributeValue::L(vec![AttributeValue::S("a".into())]),
            ),
            ("b".to_owned(), AttributeValue::Bool(true)),
        ]));
        assert_eq!(
            attribute_json(&m).unwrap(),
            json!({"n": 80, "f": 1.5, "l": ["a"], "b": true})
        );
        assert!(attribute_json(&AttributeValue::N("x".into())).is_err());
    }
}
