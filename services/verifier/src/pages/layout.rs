//! The frame around every page: the document head, the top bar with the
//! tenant's navigation, and small pieces forms share.

use chrono::{DateTime, Utc};
use maud::{html, Markup, PreEscaped, DOCTYPE};

use super::forms::TOKEN_FIELD;

fn document(title: &str, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · twofold" }
                link rel="stylesheet" href="/assets/twofold.css";
                script src="/assets/twofold.js" defer {}
            }
            body { (body) }
        }
    }
}

/// A page with no navigation (errors).
pub fn bare(title: &str, content: Markup) -> Markup {
    document(
        title,
        html! {
            header.top { span.brand { "twofold" } }
            main.narrow { h1 { (title) } (content) }
        },
    )
}

/// A wide page with no navigation (the API reference).
pub fn plain(title: &str, content: Markup) -> Markup {
    document(
        title,
        html! {
            header.top { span.brand { "twofold" } }
            main { h1 { (title) } (content) }
        },
    )
}

/// Where a page sits, for the top bar.
pub struct Frame<'a> {
    pub tenant_id: &'a str,
    pub tenant_name: &'a str,
    /// The form token, when the visitor is signed in (for the sign-out button).
    pub signed_in: Option<&'a str>,
    /// Whether to link the console (admins and auditors).
    pub console: bool,
    /// The console tab shown, if this is a console page.
    pub tab: Option<Tab>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tab {
    Settings,
    Overview,
    Users,
    Audit,
}

impl Tab {
    const ALL: [Tab; 4] = [Tab::Settings, Tab::Overview, Tab::Users, Tab::Audit];

    fn label(self) -> &'static str {
        match self {
            Tab::Settings => "Settings",
            Tab::Overview => "Overview",
            Tab::Users => "User Management",
            Tab::Audit => "Audit",
        }
    }

    fn path(self) -> &'static str {
        match self {
            Tab::Settings => "settings",
            Tab::Overview => "overview",
            Tab::Users => "users",
            Tab::Audit => "audit",
        }
    }
}

/// A page of a tenant: the top bar, then the content.
pub fn page(frame: &Frame<'_>, title: &str, narrow: bool, content: Markup) -> Markup {
    let t = frame.tenant_id;
    document(
        title,
        html! {
            header.top {
                span.brand { "twofold" }
                span.tenant { (frame.tenant_name) }
                @if let Some(token) = frame.signed_in {
                    nav aria-label="Main" {
                        @if let Some(current) = frame.tab {
                            @for tab in Tab::ALL {
                                a href={ "/t/" (t) "/admin/" (tab.path()) }
                                    aria-current=[(tab == current).then_some("page")] { (tab.label()) }
                            }
                            a href={ "/t/" (t) "/account" } { "My account" }
                        } @else {
                            a href={ "/t/" (t) "/account" } aria-current="page" { "My account" }
                            @if frame.console {
                                a href={ "/t/" (t) "/admin/overview" } { "Console" }
                            }
                        }
                        form.inline method="post" action={ "/t/" (t) "/sign-out" } {
                            (token_input(token))
                            button.link type="submit" { "Sign out" }
                        }
                    }
                }
            }
            @if narrow {
                main.narrow { h1 { (title) } (content) }
            } @else {
                main { h1 { (title) } (content) }
            }
        },
    )
}

/// The hidden anti-forgery field every form carries.
pub fn token_input(token: &str) -> Markup {
    html! { input type="hidden" name=(TOKEN_FIELD) value=(token); }
}

/// A time as people read it (UTC).
pub fn when(at: &DateTime<Utc>) -> String {
    at.format("%Y-%m-%d %H:%M UTC").to_string()
}

/// A message box: `kind` is `notice`, `success`, `warning` or `error`.
pub fn message(kind: &str, text: &str) -> Markup {
    let role = if kind == "error" { "alert" } else { "status" };
    html! { div class=(kind) role=(role) { (text) } }
}

/// Raw SVG or other markup built by our own code (never user input).
pub fn trusted(markup: String) -> Markup {
    PreEscaped(markup)
}
