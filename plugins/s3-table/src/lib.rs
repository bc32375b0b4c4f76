//! Maps a value to a task count through a table stored in S3 (the seed's mapping files).
//!
//! Used as a manager mapping: `mapping = { plugin = "<metric name of this instance>" }`.
//! The object holds rows of (lower bound → tasks); the row with the greatest bound not
//! above the value applies (a value below every bound maps to 0). Two formats:
//!
//! * JSON: `[{"min": 0, "tasks": 1}, {"min": 5, "tasks": 3}]`
//! * CSV (any other content): one `min,tasks` row a line; a first line `min,tasks` and
//!   lines starting with `#` are skipped.
//!
//! Bounds must be numbers in strictly increasing order, tasks whole numbers ≥ 0. The
//! object's ETag is checked at most every `refresh_secs`; a changed table is reloaded; a
//! corrupt one keeps the last good table and is reported with the row that is wrong.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use warden_plugin_api::prelude::*;
use warden_plugin_api::{serde_json, tracing};

#[derive(Deserialize, JsonSchema)]
#[serde(crate = "warden_plugin_api::serde", deny_unknown_fields)]
#[schemars(crate = "warden_plugin_api::schemars")]
pub struct Config {
    pub bucket: String,
    pub key: String,
    /// Seconds between ETag checks (default 30).
    #[serde(default = "default_refresh")]
    pub refresh_secs: u64,
    #[serde(default)]
    pub region: Option<String>,
}

fn default_refresh() -> u64 {
    30
}

/// Parses a table (JSON or CSV). Errors name the row (1-based) and what is wrong.
pub fn parse_table(text: &str) -> Result<Vec<(f64, u32)>, String> {
    let trimmed = text.trim_start();
    let rows: Vec<(f64, u32)> = if trimmed.starts_with('[') {
        #[derive(Deserialize)]
        #[serde(crate = "warden_plugin_api::serde", deny_unknown_fields)]
        struct Row {
            min: f64,
            tasks: u32,
        }
        let rows: Vec<Row> =
            serde_json::from_str(text).map_err(|e| format!("not a JSON table: {e}"))?;
        rows.into_iter().map(|r| (r.min, r.tasks)).collect()
    } else {
        let mut rows = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty()
                || line.starts_with('#')
                || (i == 0 && line.replace(' ', "") == "min,tasks")
            {
                continue;
            }
            let (a, b) = line
                .split_once(',')
                .ok_or_else(|| format!("line {}: expected `min,tasks`, got {line:?}", i + 1))?;
            let min: f64 = a.trim().parse().map_err(|_| {
                format!("line {}: lower bound {:?} is not a number", i + 1, a.trim())
            })?;
            let tasks: u32 = b.trim().parse().map_err(|_| {
                format!(
                    "line {}: tasks {:?} is not a whole number ≥ 0",
                    i + 1,
                    b.trim()
                )
            })?;
            rows.push((min, tasks));
        }
        rows
    };
    if rows.is_empty() {
        return Err("the table has no rows".into());
    }
    for (i, r) in rows.iter().enumerate() {
        if !r.0.is_finite() {
            return Err(format!("row {}: lower bound is not a finite number", i + 1));
        }
        if i > 0 && r.0 <= rows[i - 1].0 {
            return Err(format!(
                "row {}: lower bound {} is not above the previous row's {}",
                i + 1,
                r.0,
                rows[i - 1].0
            ));
        }
    }
    Ok(rows)
}

pub fn lookup(rows: &[(f64, u32)], v: f64) -> u32 {
    rows.iter()
        .rfind(|(min, _)| *min <= v)
        .map_or(0, |(_, n)| *n)
}

struct Table {
    etag: String,
    rows: Vec<(f64, u32)>,
    checked: Instant,
}

pub struct S3Table {
    s3: aws_sdk_s3::Client,
    bucket: String,
    key: String,
    refresh: Duration,
    table: Mutex<Table>,
}

fn aws_err<E: std::error::Error + 'static, R: std::fmt::Debug>(
    what: &str,
    e: aws_sdk_s3::error::SdkError<E, R>,
) -> PluginError {
    PluginError::transient(format!(
        "{what}: {}",
        aws_sdk_s3::error::DisplayErrorContext(&e)
    ))
}

impl S3Table {
    async fn fetch(&self) -> Result<(String, String), PluginError> {
        let out = self
            .s3
            .get_object()
            .bucket(&self.bucket)
            .key(&self.key)
            .send()
            .await
            .map_err(|e| aws_err(&format!("s3://{}/{}", self.bucket, self.key), e))?;
        let etag = out.e_tag().unwrap_or_default().to_owned();
        let bytes = out
            .body
            .collect()
            .await
            .map_err(|e| PluginError::transient(format!("reading the table: {e}")))?;
        Ok((
            etag,
            String::from_utf8_lossy(&bytes.into_bytes()).into_owned(),
        ))
    }

    /// Reloads the table if its ETag changed (at most every `refresh`).
    async fn refresh(&self) {
        if self
            .table
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .checked
            .elapsed()
            < self.refresh
        {
            return;
        }
        let head = self
            .s3
            .head_object()
            .bucket(&self.bucket)
            .key(&self.key)
            .send()
            .await;
        let etag = match head {
            Ok(h) => h.e_tag().unwrap_or_default().to_owned(),
            Err(e) => {
                tracing::warn!(
                    "cannot check the table, keeping the last good one: {}",
                    aws_sdk_s3::error::DisplayErrorContext(&e)
                );
                return;
            }
        };
        if etag == self.table.lock().unwrap_or_else(|p| p.into_inner()).etag {
            self.table.lock().unwrap_or_else(|p| p.into_inner()).checked = Instant::now();
            return;
        }
        match self.fetch().await {
            Ok((etag, text)) => {
                let mut t = self.table.lock().unwrap_or_else(|p| p.into_inner());
                t.checked = Instant::now();
                match parse_table(&text) {
                    Ok(rows) => {
                        tracing::info!(bucket = %self.bucket, key = %self.key, rows = rows.len(), "table reloaded");
                        t.rows = rows;
                        t.etag = etag;
                    }
                    Err(e) => {
                        // Remember the bad ETag so it is reported once, not on every call.
                        tracing::error!(bucket = %self.bucket, key = %self.key, "table is corrupt, keeping the last good one: {e}");
                        t.etag = etag;
                    }
                }
            }
            Err(e) => tracing::warn!("cannot read the table, keeping the last good one: {e}"),
        }
    }
}

impl MetricSource for S3Table {
    type Config = Config;

    async fn new(config: Config) -> Result<Self, PluginError> {
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .app_name(aws_config::AppName::new("warden-s3-table").expect("valid"));
        if let Some(r) = config.region {
            loader = loader.region(aws_config::Region::new(r));
        }
        let sdk = loader.load().await;
        // Path-style addressing works with S3 and with endpoint overrides (moto).
        let s3_conf = aws_sdk_s3::config::Builder::from(&sdk)
            .force_path_style(true)
            .build();
        let mut me = S3Table {
            s3: aws_sdk_s3::Client::from_conf(s3_conf),
            bucket: config.bucket,
            key: config.key,
            refresh: Duration::from_secs(config.refresh_secs),
            table: Mutex::new(Table {
                etag: String::new(),
                rows: Vec::new(),
                checked: Instant::now(),
            }),
        };
        let (etag, text) = me
            .fetch()
            .await
            .map_err(|e| PluginError::config(e.message))?;
        let rows = parse_table(&text)
            .map_err(|e| PluginError::config(format!("s3://{}/{}: {e}", me.bucket, me.key)))?;
        me.table = Mutex::new(Table {
            etag,
            rows,
            checked: Instant::now(),
        });
        Ok(me)
    }

    async fn measure(&self) -> Result<Measurement, PluginError> {
        Err(PluginError::unsupported(
            "s3-table maps values: use it as a mapping (mapping = { plugin = ... })",
        ))
    }

    async fn map(&self, value: f64) -> Result<f64, PluginError> {
        self.refresh().await;
        let t = self.table.lock().unwrap_or_else(|p| p.into_inner());
        Ok(lookup(&t.rows, value) as f64)
    }
}

export_plugin! { name: "s3-table", metric_source: S3Table }

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_and_csv_tables() {
        let j = parse_table(r#"[{"min": 0, "tasks": 1}, {"min": 5, "tasks": 3}]"#).unwrap();
        assert_eq!(j, vec![(0.0, 1), (5.0, 3)]);
        let c = parse_table("min,tasks\n# comment\n0,1\n5, 3\n").unwrap();
        assert_eq!(c, j);
        assert_eq!(lookup(&j, -1.0), 0);
        assert_eq!(lookup(&j, 4.0), 1);
        assert_eq!(lookup(&j, 5.0), 3);
    }

    #[test]
    fn a_corrupt_table_names_the_row() {
        assert_eq!(
            parse_table("0,1\n5,x\n").unwrap_err(),
            "line 2: tasks \"x\" is not a whole number ≥ 0"
        );
        assert_eq!(
            parse_table("0,1\n5,3\n4,4\n").unwrap_err(),
            "row 3: lower bound 4 is not above the previous row's 5"
        );
        assert!(parse_table(r#"[{"min": 0, "task": 1}]"#)
            .unwrap_err()
            .contains("task"));
        assert!(parse_table("").is_err());
    }
}
