//! `GET /api`: the HTTP API reference, rendered on the server from the same
//! OpenAPI document `GET /openapi.json` serves, so the two cannot differ.
//! Every operation with its method, path, summary, auth, parameters, request
//! body and responses; no script, nothing fetched from elsewhere.

use maud::{html, Markup};
use serde_json::{Map, Value};

use super::layout;
use crate::openapi;

/// The methods an OpenAPI path item may hold, in the order shown.
const METHODS: [&str; 5] = ["get", "post", "put", "patch", "delete"];

/// The page for the document `doc` (the JSON of the OpenAPI document).
pub fn page(doc: &Value) -> Markup {
    let schemas = doc
        .pointer("/components/schemas")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    let description = doc
        .pointer("/info/description")
        .and_then(Value::as_str)
        .unwrap_or("");
    let operations = operations(doc);
    let tags: Vec<(&str, &str)> = doc
        .get("tags")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|t| (text(t, "name"), text(t, "description")))
        .collect();
    layout::plain(
        "HTTP API",
        html! {
            p { (prose(description)) }
            p {
                "The same as OpenAPI 3.1: " a href="/openapi.json" { "/openapi.json" } ". "
                "Every path is under " code { (openapi::TENANT_PREFIX) } "; session tokens go in "
                code { "Authorization: Bearer <token>" } "."
            }
            nav aria-label="Operations" {
                @for (tag, about) in &tags {
                    h2 { (tag) }
                    p.hint { (about) }
                    ul {
                        @for op in operations.iter().filter(|op| op.tag() == *tag) {
                            li {
                                a href={ "#" (op.anchor()) } { code { (op.method.to_uppercase()) " " (op.short_path()) } }
                                " " (op.summary())
                            }
                        }
                    }
                }
            }
            @for (tag, _) in &tags {
                @for op in operations.iter().filter(|op| op.tag() == *tag) {
                    (operation(op, &schemas))
                }
            }
        },
    )
}

struct Operation<'a> {
    method: &'a str,
    path: &'a str,
    spec: &'a Value,
}

impl Operation<'_> {
    fn short_path(&self) -> &str {
        self.path
            .strip_prefix(openapi::TENANT_PREFIX)
            .unwrap_or(self.path)
    }

    fn anchor(&self) -> String {
        let path: String = self
            .short_path()
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect();
        format!("{}{}", self.method, path)
    }

    fn summary(&self) -> &str {
        text(self.spec, "summary")
    }

    fn tag(&self) -> &str {
        self.spec
            .pointer("/tags/0")
            .and_then(Value::as_str)
            .unwrap_or("")
    }
}

/// Text whose `backticks` mark code, as the annotations write it.
fn prose(text: &str) -> Markup {
    html! {
        @for (i, part) in text.split('`').enumerate() {
            @if i % 2 == 1 { code { (part) } } @else { (part) }
        }
    }
}

/// Every operation of the document, by path, then method.
fn operations(doc: &Value) -> Vec<Operation<'_>> {
    let Some(paths) = doc.get("paths").and_then(Value::as_object) else {
        return Vec::new();
    };
    paths
        .iter()
        .flat_map(|(path, item)| {
            METHODS.iter().filter_map(move |method| {
                item.get(*method)
                    .map(|spec| Operation { method, path, spec })
            })
        })
        .collect()
}

fn text<'a>(value: &'a Value, key: &str) -> &'a str {
    value.get(key).and_then(Value::as_str).unwrap_or("")
}

fn operation(op: &Operation<'_>, schemas: &Map<String, Value>) -> Markup {
    let auth = match op.spec.get("security").and_then(Value::as_array) {
        Some(list) if !list.is_empty() => "a session (Authorization: Bearer)",
        _ => "none",
    };
    let params: Vec<&Value> = op
        .spec
        .get("parameters")
        .and_then(Value::as_array)
        .map(|p| p.iter().collect())
        .unwrap_or_default();
    let body = op
        .spec
        .pointer("/requestBody/content/application~1json/schema");
    html! {
        section.card id=(op.anchor()) {
            h2 { code { (op.method.to_uppercase()) " " (op.short_path()) } }
            p { strong { (op.summary()) } }
            @if !text(op.spec, "description").is_empty() {
                p { (prose(text(op.spec, "description"))) }
            }
            p { "Auth: " (auth) }
            @if !params.is_empty() {
                h3 { "Parameters" }
                div.table-wrap {
                    table {
                        thead { tr { th { "name" } th { "in" } th { "type" } th { "description" } } }
                        tbody {
                            @for p in &params {
                                tr {
                                    td { code { (text(p, "name")) } @if p.get("required") == Some(&Value::Bool(true)) { " (required)" } }
                                    td { (text(p, "in")) }
                                    td { (p.get("schema").map(type_of).unwrap_or_default()) }
                                    td { (prose(text(p, "description"))) }
                                }
                            }
                        }
                    }
                }
            }
            @if let Some(body) = body {
                h3 { "Request body (JSON): " (type_of(body)) }
                (fields(body, schemas))
            }
            h3 { "Responses" }
            div.table-wrap {
                table {
                    thead { tr { th { "status" } th { "description" } th { "body" } } }
                    tbody {
                        @for (status, response) in op.spec.get("responses").and_then(Value::as_object).into_iter().flatten() {
                            tr {
                                td { (status) }
                                td { (prose(text(response, "description"))) }
                                td { (response_body(response)) }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// The media types and schemas of a response.
fn response_body(response: &Value) -> String {
    let Some(content) = response.get("content").and_then(Value::as_object) else {
        return String::new();
    };
    content
        .iter()
        .map(|(media, c)| match c.get("schema") {
            Some(schema) => format!("{media}: {}", type_of(schema)),
            None => media.clone(),
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// The fields of a request body's schema, looked up in the components.
fn fields(schema: &Value, schemas: &Map<String, Value>) -> Markup {
    let resolved = schema
        .get("$ref")
        .and_then(Value::as_str)
        .and_then(|r| r.rsplit('/').next())
        .and_then(|name| schemas.get(name))
        .unwrap_or(schema);
    let required: Vec<&str> = resolved
        .get("required")
        .and_then(Value::as_array)
        .map(|r| r.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let Some(properties) = resolved.get("properties").and_then(Value::as_object) else {
        return html! { p { (prose(text(resolved, "description"))) } };
    };
    html! {
        div.table-wrap {
            table {
                thead { tr { th { "field" } th { "type" } th { "description" } } }
                tbody {
                    @for (name, property) in properties {
                        tr {
                            td { code { (name) } @if required.contains(&name.as_str()) { " (required)" } }
                            td { (type_of(property)) }
                            td { (prose(text(property, "description"))) }
                        }
                    }
                }
            }
        }
    }
}

/// A schema's type as people read it: `string`, `string | null`,
/// `array of string`, a component's name, or the values of an enum.
fn type_of(schema: &Value) -> String {
    if let Some(name) = schema
        .get("$ref")
        .and_then(Value::as_str)
        .and_then(|r| r.rsplit('/').next())
    {
        return name.to_string();
    }
    for key in ["oneOf", "anyOf", "allOf"] {
        if let Some(list) = schema.get(key).and_then(Value::as_array) {
            return list.iter().map(type_of).collect::<Vec<_>>().join(" | ");
        }
    }
    if let Some(values) = schema.get("enum").and_then(Value::as_array) {
        return values
            .iter()
            .map(|v| v.to_string())
            .collect::<Vec<_>>()
            .join(" | ");
    }
    let types: Vec<String> = match schema.get("type") {
        Some(Value::String(t)) => vec![t.clone()],
        Some(Value::Array(ts)) => ts
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_string)
            .collect(),
        _ => vec!["any".to_string()],
    };
    types
        .iter()
        .map(|t| match (t.as_str(), schema.get("items")) {
            ("array", Some(items)) => format!("array of {}", type_of(items)),
            _ => match schema.get("format").and_then(Value::as_str) {
                Some(format) if t != "null" => format!("{t} ({format})"),
                _ => t.clone(),
            },
        })
        .collect::<Vec<_>>()
        .join(" | ")
}
