//! The values that cross the plugin boundary as JSON.
//!
//! Hosts read these leniently (unknown fields are ignored, missing optional ones default),
//! so that a plugin built against a later 1.x can add a field without being refused.

use std::collections::{BTreeMap, BTreeSet};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// One reading of a metric.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Measurement {
    /// The number measured.
    pub value: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    /// Its unit (`messages`, `instances`, `seconds`, ...), shown in status and metrics.
    pub unit: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    /// Labels that say what was measured (queue name, environment, ...).
    pub labels: BTreeMap<String, String>,
    /// Free-form detail for logs and `warden status` (for example, where the value came from).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<serde_json::Value>,
}

impl Measurement {
    /// A measurement of `value` with no unit, labels or detail.
    pub fn new(value: f64) -> Self {
        Self {
            value,
            unit: None,
            labels: BTreeMap::new(),
            detail: None,
        }
    }
    /// Sets the unit.
    pub fn unit(mut self, unit: impl Into<String>) -> Self {
        self.unit = Some(unit.into());
        self
    }
    /// Adds a label.
    pub fn label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.labels.insert(key.into(), value.into());
        self
    }
    /// Sets the free-form detail.
    pub fn detail(mut self, detail: serde_json::Value) -> Self {
        self.detail = Some(detail);
        self
    }
}

/// How a service recognises its containers. Every rule that is set must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(default)]
pub struct ContainerMatch {
    /// Exact image name, with or without tag (`repo/app` matches `repo/app:1.2`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Image name prefix (`registry.example/team/`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image_prefix: Option<String>,
    /// Container name glob: `*` any run of characters, `?` one character.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Labels that must be present with these exact values.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// ECS task-definition family (the ECS agent's `com.amazonaws.ecs.task-definition-family` label).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ecs_family: Option<String>,
    /// Container ids, when the provider names the containers themselves (docker-labels).
    #[serde(skip_serializing_if = "BTreeSet::is_empty")]
    pub ids: BTreeSet<String>,
}

impl ContainerMatch {
    /// True when the match names no criterion at all.
    pub fn is_empty(&self) -> bool {
        self.image.is_none()
            && self.image_prefix.is_none()
            && self.name.is_none()
            && self.labels.is_empty()
            && self.ecs_family.is_none()
            && self.ids.is_empty()
    }
}

/// A service as the registrar and manager see it.
///
/// Later 1.x versions add optional fields (1.1 added `manage` and `target_groups`): build one with
/// `..Default::default()` so that your plugin still compiles against them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ServiceDefinition {
    /// Service name; also the default Redx backend name.
    pub name: String,
    /// How its containers are recognised.
    #[serde(
        default,
        rename = "match",
        skip_serializing_if = "ContainerMatch::is_empty"
    )]
    pub matches: ContainerMatch,
    /// Container port that serves traffic (needed when the image exposes several).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Redx backend name, when it is not the service name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
    /// Host or host/path front-ends (`api.example.com`, `example.com/api/`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub frontends: Vec<String>,
    /// Host port of the service's front-end on the router.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frontend_port: Option<u16>,
    /// Classic ELB the host joins while it runs this service's containers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub elb: Option<String>,
    /// ELBv2 target groups (names or ARNs) the host is a target of while it runs this
    /// service's containers: by instance id (`instance` groups) or private IP (`ip`
    /// groups), with the router's `frontend_port` for the service as the port (the
    /// group's own port when none is set).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub target_groups: Vec<String>,
    /// Docker network whose IP is routed to, when a container has several.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
    /// Seconds between the last container leaving and the ELB deregistration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain_seconds: Option<u64>,
    /// Scaling by warden's elected manager, read from the sources of `[[manager.sources]]`:
    /// the keys of a `[[manager.services]]` entry without `name` (`cluster`,
    /// `task_definition` or `ecs_service`, `metric`, `mapping`, `policy`). Kept as JSON
    /// here and checked by warden, which names the service and the source when a key is
    /// wrong, so the manager's settings can grow without a new interface version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manage: Option<serde_json::Value>,
}

impl ServiceDefinition {
    /// The Redis backend name: `backend` when given, else the service's name.
    pub fn backend_name(&self) -> &str {
        self.backend.as_deref().unwrap_or(&self.name)
    }
}

/// What a service-definitions provider is told of each running container.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerView {
    /// Docker's container id.
    pub id: String,
    /// The container's name, without the leading `/`.
    pub name: String,
    /// The image the container runs, as Docker names it.
    pub image: String,
    #[serde(default)]
    /// The container's labels.
    pub labels: BTreeMap<String, String>,
    /// Docker's `State.StartedAt` (RFC 3339), so that a provider can tell which container
    /// came first (added in 1.2; empty from an older host).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub started_at: String,
}

/// A comparable form of Docker's `StartedAt` (RFC 3339 with up to nine fraction digits,
/// trailing zeros trimmed): string order is wrong for `…:00.1Z` against `…:00.123Z`.
/// An empty value sorts first.
pub fn start_order(started_at: &str) -> (String, u64) {
    let s = started_at.trim_end_matches('Z');
    match s.split_once('.') {
        Some((whole, frac)) => {
            let digits: String = frac
                .chars()
                .take_while(char::is_ascii_digit)
                .take(9)
                .collect();
            let nanos = format!("{digits:0<9}").parse().unwrap_or(0);
            (whole.to_owned(), nanos)
        }
        None => (s.to_owned(), 0),
    }
}

/// `text` for a log line or an error message: at most `max` characters, the rest elided
/// with a count, and quoted as `{:?}` would. Values from outside (labels, keys, configs)
/// go through this so that one huge value never makes a huge line.
pub fn elide(text: &str, max: usize) -> String {
    let n = text.chars().count();
    if n <= max {
        return format!("{text:?}");
    }
    let kept: String = text.chars().take(max).collect();
    format!("{kept:?}… ({} more characters)", n - max)
}

/// Arguments of the `list` operation: the host's running containers.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ListArgs {
    #[serde(default)]
    /// The running containers of the host.
    pub containers: Vec<ContainerView>,
}

/// The most path segments a front-end may have: warden's router tries up to three
/// (stock Redx reads one by default, `max_path_length = 1`).
pub const MAX_PATH_SEGMENTS: usize = 3;

/// The longest path segment of a front-end, in bytes.
pub const MAX_SEGMENT_LEN: usize = 128;

/// Checks and normalises a front-end: `Host/Path` → `host/path/` (Redx matches hosts
/// lower-cased, port stripped, and path front-ends only with a trailing slash).
///
/// The host follows RFC 1123: letters, digits and hyphens in dot-separated labels of at
/// most 63 characters, no label starting or ending with a hyphen, 253 characters in all.
/// Path segments are URL path characters (letters, digits, `-._~`, `%XX`,
/// `!$&'()+,;=:@`); no whitespace, control character, `*`, `.` or `..` segment, empty
/// segment, at most [`MAX_PATH_SEGMENTS`] of them, each at most [`MAX_SEGMENT_LEN`]
/// bytes. An encoded `/`, `.`, `\` or NUL (`%2F`, `%2E`, `%5C`, `%00`) is refused: the
/// router refuses requests that carry one, since the path it routes on would not be the
/// path it forwards. The error names what is wrong.
pub fn normalise_frontend(f: &str) -> Result<String, String> {
    let raw = elide(f, 80);
    let f = f.trim();
    let (host, path) = f.split_once('/').map_or((f, None), |(h, p)| (h, Some(p)));
    let host = host.to_ascii_lowercase();
    check_host(&host).map_err(|why| format!("{raw}: host {why}"))?;
    let Some(path) = path.map(|p| p.strip_suffix('/').unwrap_or(p)) else {
        return Ok(host);
    };
    if path.is_empty() {
        return Ok(host);
    }
    let segments: Vec<&str> = path.split('/').collect();
    if segments.len() > MAX_PATH_SEGMENTS {
        return Err(format!(
            "{raw}: {} path segments; the router reads at most {MAX_PATH_SEGMENTS}",
            segments.len()
        ));
    }
    for seg in &segments {
        check_segment(seg)
            .map_err(|why| format!("{raw}: path segment {} {why}", elide(seg, 40)))?;
    }
    Ok(format!("{host}/{}/", segments.join("/")))
}

fn check_host(host: &str) -> Result<(), String> {
    if host.is_empty() {
        return Err("is empty (expected `host` or `host/path/`, no scheme, no port)".into());
    }
    if host.len() > 253 {
        return Err(format!("is {} characters long (at most 253)", host.len()));
    }
    for label in host.split('.') {
        if label.is_empty() {
            return Err("has an empty label (two dots, or a dot at an end)".into());
        }
        if label.len() > 63 {
            return Err(format!(
                "has a label of {} characters (at most 63)",
                label.len()
            ));
        }
        if let Some(c) = label
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '-'))
        {
            return Err(format!(
                "has {c:?}: only letters, digits, '-' and '.' (no scheme, port, wildcard or space)"
            ));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(format!("label {label:?} starts or ends with '-'"));
        }
    }
    Ok(())
}

fn check_segment(seg: &str) -> Result<(), String> {
    match seg {
        "" => return Err("is empty (two slashes)".into()),
        "." | ".." => return Err("is a relative step".into()),
        _ => {}
    }
    if seg.len() > MAX_SEGMENT_LEN {
        return Err(format!(
            "is {} bytes long (at most {MAX_SEGMENT_LEN})",
            seg.len()
        ));
    }
    let bytes = seg.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            let hex = |j: usize| bytes.get(j).is_some_and(|c| c.is_ascii_hexdigit());
            if !(hex(i + 1) && hex(i + 2)) {
                return Err("has a '%' not followed by two hex digits".into());
            }
            let code = seg[i + 1..i + 3].to_ascii_uppercase();
            if ["2F", "2E", "5C", "00"].contains(&code.as_str()) {
                return Err(format!(
                    "has %{code}, an encoded '/', '.', '\\' or NUL (the router refuses such requests)"
                ));
            }
            i += 3;
            continue;
        }
        if !(b.is_ascii_alphanumeric() || b"-._~!$&'()+,;=:@".contains(&b)) {
            let c = seg[i..].chars().next().unwrap_or('?');
            return Err(format!(
                "has {c:?}: only URL path characters (letters, digits, -._~ %XX !$&'()+,;=:@)"
            ));
        }
        i += 1;
    }
    Ok(())
}

#[cfg(test)]
mod frontend_tests {
    use super::*;

    #[test]
    fn front_ends_are_normalised() {
        assert_eq!(normalise_frontend("Example.com").unwrap(), "example.com");
        assert_eq!(
            normalise_frontend(" example.com/api ").unwrap(),
            "example.com/api/"
        );
        assert_eq!(
            normalise_frontend("a-b.example.com/v1/users/").unwrap(),
            "a-b.example.com/v1/users/"
        );
        assert_eq!(normalise_frontend("example.com/").unwrap(), "example.com");
        assert_eq!(
            normalise_frontend("example.com/~me/a%20b").unwrap(),
            "example.com/~me/a%20b/"
        );
    }

    #[test]
    fn bad_front_ends_are_refused_with_the_reason() {
        let long_label = format!("{}.example", "a".repeat(64));
        let long_host = vec!["abcdefghi"; 30].join(".");
        for (bad, why) in [
            ("p-web.example/x\tzz-evil", "'\\t'"),
            ("p-web.example/x\nzz", "'\\n'"),
            ("p-web.example/x zz", "' '"),
            ("*.example.com", "'*'"),
            ("example.com/*", "'*'"),
            ("example.com/../admin", "relative step"),
            ("example.com/a//b", "empty"),
            ("exämple.com", "'ä'"),
            ("example.com/ä", "'ä'"),
            ("http://example.com", "':'"),
            ("example.com:8080", "':'"),
            ("example.com/a/b/c/d", "4 path segments"),
            (long_label.as_str(), "label of 64"),
            (long_host.as_str(), "at most 253"),
            ("-a.example", "starts or ends"),
            ("", "empty"),
            ("example.com/a%2", "hex"),
            ("a.example/x\u{7f}", "'\\u{7f}'"),
            ("a.example/..%2Fadmin", "%2F"),
            ("a.example/%2e%2e", "%2E"),
            ("a.example/a%5Cb", "%5C"),
        ] {
            let e = normalise_frontend(bad).expect_err(bad);
            assert!(e.contains(why), "{bad:?}: {e}");
        }
        let long_segment = format!("a.example/{}", "s".repeat(129));
        let e = normalise_frontend(&long_segment).unwrap_err();
        assert!(e.contains("129 bytes") && e.len() < 300, "{e}");
    }

    #[test]
    fn elide_bounds_a_value_and_says_how_much_was_left_out() {
        assert_eq!(elide("short", 10), "\"short\"");
        let e = elide(&"x".repeat(10_000), 8);
        assert_eq!(e, "\"xxxxxxxx\"… (9992 more characters)");
    }
}

/// Arguments of a metric source's `map` operation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MapArgs {
    /// The value to map.
    pub value: f64,
}
