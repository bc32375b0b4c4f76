//! Every problem of a configuration text, each with its line, column and key.
//!
//! serde stops at the first error and the checks at the first bound, so an operator
//! fixing a file would meet its problems one run at a time. Here the text is parsed once
//! more as a document (positions kept), and the checks are run again with each
//! offending key taken out, until none is left. A key taken out falls back to its
//! default, so a later problem is a problem of the file, not of the removal; the loop
//! stops where that would not hold (a missing field, an element of a list, a key it
//! cannot find, a complaint about the table that held the key taken out) and at [`MAX`] problems.

use std::ops::Range;

use toml_edit::{DocumentMut, ImDocument, Item, Value};

use super::{redact_strings, Config};

/// At most this many problems are listed; the rest show once these are fixed.
pub(crate) const MAX: usize = 32;

/// One step of a key's path: a table key or a list index.
#[derive(Debug, Clone, PartialEq)]
enum Seg {
    Key(String),
    Index(usize),
}

/// The first problem of `text` as the checks see it: where (a span of `text` or a
/// dotted key) and what.
struct Found {
    span: Option<Range<usize>>,
    key: Option<String>,
    message: String,
}

fn first(text: &str, file: &str) -> Option<Found> {
    match toml::from_str::<Config>(text) {
        Err(e) => Some(Found {
            span: e.span(),
            key: None,
            message: redact_strings(e.message().trim()),
        }),
        Ok(config) => match config.validate(file) {
            Err(super::ConfigError::Invalid { key, message, .. }) => Some(Found {
                span: None,
                key: Some(key),
                message,
            }),
            Err(other) => Some(Found {
                span: None,
                key: None,
                message: other.to_string(),
            }),
            Ok(()) => None,
        },
    }
}

/// Every problem of `text` (empty when it is good), each `line L, column C: key K: ...`.
pub(crate) fn every(text: &str, file: &str) -> Vec<String> {
    let Ok(original) = ImDocument::parse(text.to_owned()) else {
        // Not TOML: the parser's one error is all there is to say.
        return first(text, file)
            .map(|f| vec![describe(text, None, f.span, &f.message)])
            .unwrap_or_default();
    };
    let mut current = text.to_owned();
    let mut out: Vec<String> = Vec::new();
    let mut removed: Option<Vec<Seg>> = None;
    while out.len() < MAX {
        let Some(found) = first(&current, file) else {
            break;
        };
        let path = match (&found.key, &found.span) {
            (Some(key), _) => parse_key(key),
            (None, Some(span)) => ImDocument::parse(current.clone())
                .ok()
                .map(|doc| path_at(doc.as_table(), span.start)),
            (None, None) => None,
        };
        let path = path.filter(|p| !p.is_empty());
        // A complaint about what holds the key just taken out is about the removal.
        let consequence = |removed: &Vec<Seg>| {
            path.as_ref()
                .is_none_or(|p| p.len() < removed.len() && removed.starts_with(p))
        };
        if removed.as_ref().is_some_and(consequence) {
            break;
        }
        let at = path.as_ref().and_then(|p| key_span(original.as_table(), p));
        let line = describe(
            text,
            path.as_deref(),
            at.or(found.span.clone()),
            &found.message,
        );
        if out.contains(&line) {
            break;
        }
        out.push(line);
        let removable = path.as_ref().filter(|p| {
            !found.message.starts_with("missing field") && !matches!(p.last(), Some(Seg::Index(_)))
        });
        let Some(path) = removable else { break };
        let mut doc: DocumentMut = match current.parse() {
            Ok(d) => d,
            Err(_) => break,
        };
        if !remove(doc.as_table_mut(), path) {
            break;
        }
        current = doc.to_string();
        removed = Some(path.clone());
    }
    out
}

fn describe(text: &str, path: Option<&[Seg]>, span: Option<Range<usize>>, message: &str) -> String {
    let mut out = String::new();
    if let Some(span) = span {
        let before = &text[..span.start.min(text.len())];
        let line = before.matches('\n').count() + 1;
        let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
        out.push_str(&format!("line {line}, column {column}: "));
    }
    if let Some(path) = path {
        out.push_str(&format!("{}: ", dotted(path)));
    }
    out.push_str(message);
    out
}

fn dotted(path: &[Seg]) -> String {
    let mut out = String::new();
    for seg in path {
        match seg {
            Seg::Key(k) if out.is_empty() => out.push_str(k),
            Seg::Key(k) => {
                out.push('.');
                out.push_str(k);
            }
            Seg::Index(i) => out.push_str(&format!("[{i}]")),
        }
    }
    out
}

/// `registrar.sources[0].grants` → its segments (`None` if it does not read as a key).
fn parse_key(key: &str) -> Option<Vec<Seg>> {
    let mut out = Vec::new();
    for part in key.split('.') {
        let (name, mut rest) = part.split_once('[').map_or((part, ""), |(n, r)| (n, r));
        if name.is_empty() {
            return None;
        }
        out.push(Seg::Key(name.to_owned()));
        while !rest.is_empty() {
            let (index, after) = rest.split_once(']')?;
            out.push(Seg::Index(index.parse().ok()?));
            rest = after.strip_prefix('[').unwrap_or(after);
        }
    }
    Some(out)
}

fn contains(span: Option<Range<usize>>, at: usize) -> bool {
    span.is_some_and(|s| s.contains(&at))
}

/// The deepest key whose name or value covers byte `at`.
fn path_at(table: &toml_edit::Table, at: usize) -> Vec<Seg> {
    for (k, item) in table.iter() {
        let here = contains(table.key(k).and_then(|k| k.span()), at) || contains(item.span(), at);
        let below = item_path_at(item, at);
        if here || !below.is_empty() {
            let mut path = vec![Seg::Key(k.to_owned())];
            path.extend(below);
            return path;
        }
    }
    Vec::new()
}

fn item_path_at(item: &Item, at: usize) -> Vec<Seg> {
    match item {
        Item::Table(t) => path_at(t, at),
        Item::ArrayOfTables(a) => {
            for (i, t) in a.iter().enumerate() {
                let below = path_at(t, at);
                if !below.is_empty() || contains(t.span(), at) {
                    let mut path = vec![Seg::Index(i)];
                    path.extend(below);
                    return path;
                }
            }
            Vec::new()
        }
        Item::Value(v) => value_path_at(v, at),
        Item::None => Vec::new(),
    }
}

fn value_path_at(value: &Value, at: usize) -> Vec<Seg> {
    match value {
        Value::InlineTable(t) => {
            for (k, v) in t.iter() {
                let here = contains(t.key(k).and_then(|k| k.span()), at) || contains(v.span(), at);
                if here {
                    let mut path = vec![Seg::Key(k.to_owned())];
                    path.extend(value_path_at(v, at));
                    return path;
                }
            }
            Vec::new()
        }
        Value::Array(a) => {
            for (i, v) in a.iter().enumerate() {
                if contains(v.span(), at) {
                    let mut path = vec![Seg::Index(i)];
                    path.extend(value_path_at(v, at));
                    return path;
                }
            }
            Vec::new()
        }
        _ => Vec::new(),
    }
}

/// Where the key at `path` is written (its name, or the element for an index).
fn key_span(table: &toml_edit::Table, path: &[Seg]) -> Option<Range<usize>> {
    let (Seg::Key(k), rest) = path.split_first()? else {
        return None;
    };
    let item = table.get(k)?;
    if rest.is_empty() {
        return table.key(k).and_then(|k| k.span()).or_else(|| item.span());
    }
    item_span(item, rest)
}

fn item_span(item: &Item, path: &[Seg]) -> Option<Range<usize>> {
    match (item, path.first()?) {
        (Item::Table(t), Seg::Key(_)) => key_span(t, path),
        (Item::ArrayOfTables(a), Seg::Index(i)) => {
            let t = a.get(*i)?;
            if path.len() == 1 {
                t.span()
            } else {
                key_span(t, &path[1..])
            }
        }
        (Item::Value(v), _) => value_span(v, path),
        _ => None,
    }
}

fn value_span(value: &Value, path: &[Seg]) -> Option<Range<usize>> {
    let (seg, rest) = path.split_first()?;
    match (value, seg) {
        (Value::InlineTable(t), Seg::Key(k)) => {
            let v = t.get(k)?;
            if rest.is_empty() {
                t.key(k).and_then(|k| k.span()).or_else(|| v.span())
            } else {
                value_span(v, rest)
            }
        }
        (Value::Array(a), Seg::Index(i)) => {
            let v = a.get(*i)?;
            if rest.is_empty() {
                v.span()
            } else {
                value_span(v, rest)
            }
        }
        _ => None,
    }
}

/// Takes the key at `path` out; false if it is not there.
fn remove(table: &mut toml_edit::Table, path: &[Seg]) -> bool {
    match path {
        [Seg::Key(k)] => table.remove(k).is_some(),
        [Seg::Key(k), rest @ ..] => match table.get_mut(k) {
            Some(Item::Table(t)) => remove(t, rest),
            Some(Item::ArrayOfTables(a)) => match rest {
                [Seg::Index(i), rest @ ..] if !rest.is_empty() => {
                    a.get_mut(*i).is_some_and(|t| remove(t, rest))
                }
                _ => false,
            },
            Some(Item::Value(v)) => remove_value(v, rest),
            _ => false,
        },
        _ => false,
    }
}

fn remove_value(value: &mut Value, path: &[Seg]) -> bool {
    match (value, path) {
        (Value::InlineTable(t), [Seg::Key(k)]) => t.remove(k).is_some(),
        (Value::InlineTable(t), [Seg::Key(k), rest @ ..]) => {
            t.get_mut(k).is_some_and(|v| remove_value(v, rest))
        }
        (Value::Array(a), [Seg::Index(i), rest @ ..]) if !rest.is_empty() => {
            a.get_mut(*i).is_some_and(|v| remove_value(v, rest))
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_type_error_an_unknown_key_and_a_bound_are_all_listed_with_their_places() {
        let text = "[registrar]\nresync_secs = \"x\"\nbogus = 1\n[manager]\nloop_secs = 0\n";
        let all = every(text, "w.toml");
        assert_eq!(all.len(), 3, "{all:#?}");
        assert!(
            all[0].starts_with("line 2, column 1: registrar.resync_secs: invalid type"),
            "{all:#?}"
        );
        assert!(
            all[1].starts_with("line 3, column 1: registrar.bogus: unknown field"),
            "{all:#?}"
        );
        assert!(
            all[2].starts_with("line 5, column 1: manager.loop_secs: 0 is outside"),
            "{all:#?}"
        );
    }

    #[test]
    fn keys_in_lists_and_inline_tables_are_found() {
        let text = "[[manager.services]]\nname = \"web\"\ntask_definition = \"web\"\nmetric = \"m\"\nmapping = { target_per_task = \"x\" }\n[metrics.m]\nplugin = \"p\"\n";
        let all = every(text, "w.toml");
        assert_eq!(all.len(), 1, "{all:#?}");
        assert!(
            all[0].starts_with("line 5, column 13: manager.services[0].mapping.target_per_task:"),
            "{all:#?}"
        );
    }

    #[test]
    fn a_good_file_has_none_and_a_syntax_error_is_one() {
        assert!(every("[registrar]\nresync_secs = 30\n", "w.toml").is_empty());
        let all = every("[registrar\nx = 1\n", "w.toml");
        assert_eq!(all.len(), 1, "{all:#?}");
        assert!(all[0].starts_with("line 1, column"), "{all:#?}");
    }

    #[test]
    fn a_value_is_never_shown() {
        let all = every(
            "[manager]\ncentral_redis = 5\nlease_ms = \"hunter2\"\n",
            "w.toml",
        );
        assert_eq!(all.len(), 2, "{all:#?}");
        assert!(all.iter().all(|l| !l.contains("hunter2")), "{all:#?}");
    }

    #[test]
    fn key_paths_parse() {
        assert_eq!(
            parse_key("registrar.sources[0].grants"),
            Some(vec![
                Seg::Key("registrar".into()),
                Seg::Key("sources".into()),
                Seg::Index(0),
                Seg::Key("grants".into())
            ])
        );
        assert_eq!(parse_key("a..b"), None);
    }
}
