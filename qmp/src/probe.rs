//! Feature probing against the running QEMU's own schema (`query-qmp-schema`).
//!
//! "Does this QEMU have command X, event Y, argument Z, enum value V?" is answered from what
//! QEMU says about itself, never from its version number alone: distributions backport, and
//! builds drop features. QEMU masks type names in the introspection output, so lookups walk
//! from a command's argument or return type by member names, which are stable.
//! This module only reads the schema; it must never issue commands.

use crate::error::{Error, Result};
use serde::Deserialize;
use serde_json::Value;
use std::collections::HashMap;

#[derive(Debug, Deserialize)]
struct Member {
    #[serde(default)]
    name: Option<String>,
    #[serde(rename = "type", default)]
    ty: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Variant {
    #[serde(rename = "type")]
    ty: String,
}

#[derive(Debug, Deserialize)]
struct Entry {
    name: String,
    #[serde(rename = "meta-type")]
    meta_type: String,
    #[serde(rename = "arg-type", default)]
    arg_type: Option<String>,
    #[serde(rename = "ret-type", default)]
    ret_type: Option<String>,
    #[serde(rename = "element-type", default)]
    element_type: Option<String>,
    #[serde(default)]
    members: Vec<Member>,
    #[serde(default)]
    variants: Vec<Variant>,
    #[serde(default)]
    values: Vec<String>,
}

/// QEMU's introspected schema, indexed for lookups.
#[derive(Debug)]
pub struct Schema {
    entries: HashMap<String, Entry>,
}

impl Schema {
    /// Builds the index from the reply of `query-qmp-schema`.
    pub fn from_value(reply: Value) -> Result<Schema> {
        let list: Vec<Entry> =
            serde_json::from_value(reply.clone()).map_err(|json| Error::Decode {
                command: "query-qmp-schema".into(),
                json,
                reply,
            })?;
        let entries = list.into_iter().map(|e| (e.name.clone(), e)).collect();
        Ok(Schema { entries })
    }

    fn meta(&self, name: &str, meta: &str) -> Option<&Entry> {
        self.entries.get(name).filter(|e| e.meta_type == meta)
    }

    /// True when QEMU has the command.
    pub fn has_command(&self, name: &str) -> bool {
        self.meta(name, "command").is_some()
    }

    /// True when QEMU can emit the event.
    pub fn has_event(&self, name: &str) -> bool {
        self.meta(name, "event").is_some()
    }

    /// True when `command` takes the argument at `path` (members of nested objects, through
    /// arrays and union variants), e.g. `("migrate", &["channels"])`.
    pub fn has_argument(&self, command: &str, path: &[&str]) -> bool {
        self.argument(command, path).is_some()
    }

    /// True when `command`'s reply has the member at `path`, e.g.
    /// `("query-migrate", &["blocked-reasons"])`.
    pub fn has_return_member(&self, command: &str, path: &[&str]) -> bool {
        self.meta(command, "command")
            .and_then(|c| c.ret_type.as_deref())
            .and_then(|t| self.walk(t, path))
            .is_some()
    }

    /// The values of the enum found at `path` in `command`'s arguments, e.g.
    /// `("migrate-set-capabilities", &["capabilities", "capability"])`.
    pub fn argument_enum_values(&self, command: &str, path: &[&str]) -> Option<Vec<&str>> {
        let e = self.argument(command, path)?;
        (e.meta_type == "enum").then(|| e.values.iter().map(String::as_str).collect())
    }

    /// True when the enum at `path` in `command`'s arguments has `value`.
    pub fn has_argument_value(&self, command: &str, path: &[&str], value: &str) -> bool {
        self.argument_enum_values(command, path)
            .is_some_and(|vals| vals.contains(&value))
    }

    /// True when this QEMU knows the migration capability (e.g. `background-snapshot`).
    pub fn has_migration_capability(&self, capability: &str) -> bool {
        self.has_argument_value(
            "migrate-set-capabilities",
            &["capabilities", "capability"],
            capability,
        )
    }

    fn argument(&self, command: &str, path: &[&str]) -> Option<&Entry> {
        let arg_type = self.meta(command, "command")?.arg_type.as_deref()?;
        self.walk(arg_type, path)
    }

    /// Follows `path` from type `start`, looking through arrays, alternates and union variants.
    fn walk(&self, start: &str, path: &[&str]) -> Option<&Entry> {
        let mut entry = self.deref(start)?;
        for segment in path {
            let ty = self.member_type(entry, segment, 0)?;
            entry = self.deref(ty)?;
        }
        Some(entry)
    }

    fn deref(&self, name: &str) -> Option<&Entry> {
        let mut e = self.entries.get(name)?;
        for _ in 0..8 {
            match (e.meta_type.as_str(), e.element_type.as_deref()) {
                ("array", Some(elem)) => e = self.entries.get(elem)?,
                _ => break,
            }
        }
        Some(e)
    }

    fn member_type<'a>(&'a self, entry: &'a Entry, name: &str, depth: usize) -> Option<&'a str> {
        if depth > 4 {
            return None;
        }
        if let Some(ty) = entry
            .members
            .iter()
            .find(|m| m.name.as_deref() == Some(name))
            .and_then(|m| m.ty.as_deref())
        {
            return Some(ty);
        }
        // Union variants and alternate branches carry members of their own.
        let branches =
            entry
                .variants
                .iter()
                .map(|v| v.ty.as_str())
                .chain(match entry.meta_type.as_str() {
                    "alternate" => entry
                        .members
                        .iter()
                        .filter_map(|m| m.ty.as_deref())
                        .collect(),
                    _ => Vec::new(),
                });
        for branch in branches {
            if let Some(sub) = self.deref(branch) {
                if let Some(ty) = self.member_type(sub, name, depth + 1) {
                    return Some(ty);
                }
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schema() -> Schema {
        Schema::from_value(json!([
            {"name": "migrate-set-capabilities", "meta-type": "command", "arg-type": "1", "ret-type": "0"},
            {"name": "1", "meta-type": "object", "members": [{"name": "capabilities", "type": "[2]"}]},
            {"name": "[2]", "meta-type": "array", "element-type": "2"},
            {"name": "2", "meta-type": "object", "members": [{"name": "capability", "type": "3"}, {"name": "state", "type": "bool"}]},
            {"name": "3", "meta-type": "enum", "values": ["xbzrle", "background-snapshot"], "members": [{"name": "xbzrle"}, {"name": "background-snapshot"}]},
            {"name": "blockdev-add", "meta-type": "command", "arg-type": "4", "ret-type": "0"},
            {"name": "4", "meta-type": "object", "members": [{"name": "driver", "type": "str"}], "tag": "driver", "variants": [{"case": "qcow2", "type": "5"}]},
            {"name": "5", "meta-type": "object", "members": [{"name": "backing", "type": "6"}]},
            {"name": "6", "meta-type": "alternate", "members": [{"type": "7"}, {"type": "null"}]},
            {"name": "7", "meta-type": "object", "members": [{"name": "node-name", "type": "str"}]},
            {"name": "STOP", "meta-type": "event", "arg-type": "0"},
            {"name": "0", "meta-type": "object", "members": []},
            {"name": "str", "meta-type": "builtin", "json-type": "string"},
            {"name": "bool", "meta-type": "builtin", "json-type": "boolean"},
            {"name": "null", "meta-type": "builtin", "json-type": "null"}
        ]))
        .unwrap()
    }

    #[test]
    fn commands_events_and_enum_values() {
        let s = schema();
        assert!(s.has_command("migrate-set-capabilities"));
        assert!(!s.has_command("STOP"));
        assert!(s.has_event("STOP"));
        assert!(s.has_migration_capability("background-snapshot"));
        assert!(!s.has_migration_capability("mapped-ram"));
    }

    #[test]
    fn arguments_through_union_variants_and_alternates() {
        let s = schema();
        assert!(s.has_argument("blockdev-add", &["driver"]));
        assert!(s.has_argument("blockdev-add", &["backing"]));
        assert!(s.has_argument("blockdev-add", &["backing", "node-name"]));
        assert!(!s.has_argument("blockdev-add", &["nope"]));
        assert!(!s.has_argument("no-such-command", &[]));
    }
}
