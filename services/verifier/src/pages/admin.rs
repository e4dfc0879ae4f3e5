//! The admin console: Settings (with a preview of a change's effect and the
//! rollout checklist), Overview (figures, adoption over time, delivery,
//! freshness), User Management (directory, a user's page and timeline,
//! actions with a reason) and Audit (search and export). Auditors see every
//! page and can act on none.

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::Router;
use chrono::{DateTime, Duration, NaiveDate, NaiveTime, Utc};
use maud::{html, Markup};
use serde::Deserialize;
use twofold_app::admin::UserAction;
use twofold_app::console::{ChecklistItem, SettingsPreview};
use twofold_app::{AppError, Origin, ReaderSession};
use twofold_domain::tenant::settings::{Enforcement, Enrollment, Scope};
use twofold_domain::tenant::{TenantError, TwoFactorSettings};
use twofold_domain::user::{SecondFactorUse, TwoFactorState};
use twofold_domain::values::{Method, Role};
use twofold_projections::audit::Format;
use twofold_projections::directory::{DirectoryQuery, UserRow};
use twofold_projections::overview::DailyPoint;
use twofold_projections::queries::AuditQuery;

use super::forms::{CheckedForm, ConsoleAdmin, ConsoleUser, FormNonce, PageError};
use super::layout::{self, message, token_input, trusted, when, Frame, Tab};
use crate::extract::RequestMeta;
use crate::ApiState;

pub fn routes() -> Router<ApiState> {
    Router::new()
        .route(
            "/admin",
            get(|Path(t): Path<String>| async move { Redirect::to(&format!("/t/{t}/admin/overview")) }),
        )
        .route("/admin/settings", get(settings_page).post(settings_post))
        .route("/admin/overview", get(overview))
        .route("/admin/users", get(users))
        .route("/admin/users/{user}", get(user_page).post(user_action))
        .route("/admin/users/{user}/login-as", axum::routing::post(login_as))
        .route("/admin/users/{user}/erase", axum::routing::post(erase))
        .route("/admin/audit", get(audit))
        .route("/admin/audit/export", get(audit_export))
}

type Page = Result<Response, PageError>;

fn frame<'a>(console: &'a ConsoleUser, tenant: &'a str, token: &'a str, tab: Tab) -> Frame<'a> {
    Frame {
        tenant_id: tenant,
        tenant_name: &console.reader.0.tenant.name,
        signed_in: Some(token),
        console: true,
        tab: Some(tab),
    }
}

fn read_only_note(console: &ConsoleUser) -> Markup {
    html! {
        @if console.admin.is_none() {
            (message("notice", "You have read-only access (auditor): you can see everything here and change nothing."))
        }
    }
}

fn pct(rate: f64) -> String {
    format!("{:.0}%", rate * 100.0)
}

fn status_pill(state: TwoFactorState) -> Markup {
    match state {
        TwoFactorState::Enrolled => html! { span.pill.ok { "enrolled" } },
        TwoFactorState::Pending => html! { span.pill.warn { "pending" } },
        TwoFactorState::NotStarted => html! { span.pill { "not started" } },
    }
}

fn second_factor_text(use_: &SecondFactorUse) -> String {
    match use_ {
        SecondFactorUse::Used { method } => format!("2FA with {}", method.as_str()),
        SecondFactorUse::Skipped { reason } => {
            format!(
                "no 2FA ({})",
                serde_json::to_value(reason)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default()
            )
        }
    }
}

// ---------------------------------------------------------------- overview

#[derive(Deserialize, Default)]
struct OverviewQuery {
    #[serde(default)]
    as_of: Option<String>,
}

/// The end of a day, as the daily series and the as-of picker mean it.
fn end_of(day: NaiveDate) -> DateTime<Utc> {
    day.and_time(NaiveTime::from_hms_opt(23, 59, 59).unwrap_or_default())
        .and_utc()
}

/// Adoption over time: the enrollment rate at the end of each day, as an SVG
/// line (numbers we computed, never user text).
fn adoption_chart(days: &[DailyPoint]) -> Markup {
    let (w, h, pad) = (640.0_f64, 200.0_f64, 30.0_f64);
    if days.is_empty() {
        return html! { p.muted { "No data yet." } };
    }
    let step = if days.len() > 1 {
        (w - 2.0 * pad) / (days.len() - 1) as f64
    } else {
        0.0
    };
    let points: Vec<String> = days
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let x = pad + step * i as f64;
            let y = h - pad - d.enrollment_rate * (h - 2.0 * pad);
            format!("{x:.1},{y:.1}")
        })
        .collect();
    let first = days.first().map(|d| d.date.to_string()).unwrap_or_default();
    let last = days.last().map(|d| d.date.to_string()).unwrap_or_default();
    let latest = days.last().map(|d| d.enrollment_rate).unwrap_or(0.0);
    let svg = format!(
        r##"<svg class="chart" viewBox="0 0 {w} {h}" role="img" aria-labelledby="chart-title" xmlns="http://www.w3.org/2000/svg">
<title id="chart-title">Enrollment rate from {first} to {last}, now {now}</title>
<line x1="{pad}" y1="{top}" x2="{pad}" y2="{base}" stroke="#b9c1cf"/>
<line x1="{pad}" y1="{base}" x2="{right}" y2="{base}" stroke="#b9c1cf"/>
<line x1="{pad}" y1="{top}" x2="{right}" y2="{top}" stroke="#eef1f6"/>
<text x="2" y="{top_text}" font-size="11" fill="#5b6475">100%</text>
<text x="8" y="{base_text}" font-size="11" fill="#5b6475">0%</text>
<text x="{pad}" y="{label_y}" font-size="11" fill="#5b6475">{first}</text>
<text x="{right}" y="{label_y}" font-size="11" fill="#5b6475" text-anchor="end">{last}</text>
<polyline fill="none" stroke="#2456c7" stroke-width="2.5" points="{points}"/>
</svg>"##,
        top = pad,
        base = h - pad,
        right = w - pad,
        top_text = pad + 4.0,
        base_text = h - pad,
        label_y = h - 8.0,
        now = pct(latest),
        points = points.join(" "),
    );
    trusted(svg)
}

fn freshness_note(fresh: &[twofold_projections::queries::Freshness], now: DateTime<Utc>) -> Markup {
    let behind: i64 = fresh
        .iter()
        .map(|f| (f.head_position - f.applied_position).max(0))
        .max()
        .unwrap_or(0);
    let last = fresh.iter().filter_map(|f| f.last_applied_at).min();
    html! {
        @if behind == 0 {
            p.hint #freshness { "Figures are up to date"
                @if let Some(at) = last { " (last change applied " (when(&at)) ")" } "." }
        } @else {
            div.warning #freshness role="status" {
                "The figures are behind: up to " (behind) " event" @if behind != 1 { "s" } " not yet counted"
                @if let Some(at) = last {
                    ", last applied " (when(&at))
                    @if (now - at) > Duration::minutes(1) { ". The projector may be stopped; check that `twofold projector` is running" }
                }
                "."
            }
        }
    }
}

fn checklist_panel(items: &[ChecklistItem]) -> Markup {
    html! {
        section.card aria-labelledby="checklist-h" {
            h2 #checklist-h { "Rollout checklist" }
            ul.checklist {
                @for item in items {
                    li class=(if item.done { "done" } else { "todo" }) {
                        strong { (item.step) } br; span.hint { (item.detail) }
                    }
                }
            }
        }
    }
}

async fn overview(
    State(api): State<ApiState>,
    Path(tenant): Path<String>,
    nonce: FormNonce,
    Query(q): Query<OverviewQuery>,
    console: ConsoleUser,
) -> Page {
    let reader = &console.reader;
    let now = api.app.now();
    let as_of_day = match q.as_of.as_deref().filter(|s| !s.is_empty()) {
        Some(raw) => Some(NaiveDate::parse_from_str(raw, "%Y-%m-%d").map_err(|_| {
            AppError::InvalidQuery("The date must look like 2026-03-01.".to_string())
        })?),
        None => None,
    };
    let figures = api.app.overview(reader, as_of_day.map(end_of)).await?;
    let until = as_of_day.unwrap_or_else(|| now.date_naive());
    let days = api
        .app
        .daily(reader, until - Duration::days(29), until)
        .await?;
    let delivery = api.app.delivery(reader).await?;
    let fresh = api.app.freshness().await?;
    let checklist = api.app.checklist(reader).await?;
    let token = nonce.token(&api);
    let t = &tenant;
    let body = html! {
        (read_only_note(&console))
        form.row method="get" action={ "/t/" (t) "/admin/overview" } {
            label for="as_of" { "As of" }
            input.date #as_of type="date" name="as_of" value=[as_of_day.map(|d| d.to_string())];
            button.secondary type="submit" { "Show" }
            @if as_of_day.is_some() { a href={ "/t/" (t) "/admin/overview" } { "Back to now" } }
        }
        @if let Some(day) = as_of_day {
            (message("notice", &format!("The figures as they stood at the end of {day}, from the event history.")))
        } @else {
            (freshness_note(&fresh, now))
        }
        div.grid {
            div.card { p.stat #enrollment-rate { (pct(figures.enrollment_rate)) } p.stat-label { "Enrollment rate" } }
            div.card { p.stat #enrolled { (figures.enrolled) } p.stat-label { "Enrolled" } }
            div.card { p.stat #pending { (figures.pending) } p.stat-label { "Pending" } }
            div.card { p.stat #not-started { (figures.not_started) } p.stat-label { "Not started" } }
            div.card { p.stat { (figures.active_users) } p.stat-label { "Active users" } }
            div.card { p.stat { (figures.locked) } p.stat-label { "Locked out" } }
        }
        section.card aria-labelledby="adoption-h" {
            h2 #adoption-h { "Adoption over the last 30 days" }
            (adoption_chart(&days))
        }
        div.grid {
            section.card aria-labelledby="methods-h" {
                h2 #methods-h { "Enrolled, by method proved" }
                table { tbody {
                    @for (method, n) in &figures.by_method {
                        tr { td { (method) } td { (n) } }
                    }
                } }
            }
            section.card aria-labelledby="codes-h" {
                h2 #codes-h { "Recovery-code health" }
                p { (figures.backup_codes.none_left) " with none left, " (figures.backup_codes.running_low) " running low (1–2)." }
                @if !figures.backup_codes.users.is_empty() {
                    ul {
                        @for u in &figures.backup_codes.users {
                            li { a href={ "/t/" (t) "/admin/users/" (u.user_id) } { (u.username) } " — " (u.left) " left" }
                        }
                    }
                }
            }
        }
        div.grid {
            section.card aria-labelledby="recent-h" {
                h2 #recent-h { "Recent enrollments" }
                @if figures.recent_enrollments.is_empty() { p.muted { "None yet." } }
                ul {
                    @for e in &figures.recent_enrollments {
                        li { a href={ "/t/" (t) "/admin/users/" (e.user_id) } { (e.username) } " — " (when(&e.at)) }
                    }
                }
            }
            section.card aria-labelledby="roles-h" {
                h2 #roles-h { "Roles without 2FA" }
                @if figures.roles_without_2fa.is_empty() { p.muted { "Every role is fully enrolled." } }
                table {
                    @if !figures.roles_without_2fa.is_empty() { thead { tr { th { "Role" } th { "Users" } th { "Not enrolled" } } } }
                    tbody {
                        @for r in &figures.roles_without_2fa {
                            tr { td { a href={ "/t/" (t) "/admin/users?role=" (r.role) "&two_factor=off" } { (r.role) } } td { (r.users) } td { (r.not_enrolled) } }
                        }
                    }
                }
            }
        }
        section.card aria-labelledby="delivery-h" {
            h2 #delivery-h { "Code delivery" }
            @if delivery.is_empty() { p.muted { "No email or SMS code sent yet." } } @else {
                div.table-wrap { table {
                    thead { tr { th { "Method" } th { "Provider" } th { "Sent" } th { "Failed" } th { "Fell back" } th { "Fallback rate" } th { "Latency p50 / p95 / p99" } } }
                    tbody {
                        @for d in &delivery {
                            tr {
                                td { (d.method) } td { (d.provider) } td { (d.sent) } td { (d.failed) } td { (d.fell_back) } td { (pct(d.fallback_rate)) }
                                td { (ms(d.latency_p50_ms)) " / " (ms(d.latency_p95_ms)) " / " (ms(d.latency_p99_ms)) }
                            }
                        }
                    }
                } }
            }
        }
        (checklist_panel(&checklist))
    };
    Ok(layout::page(
        &frame(&console, &tenant, &token, Tab::Overview),
        "Overview",
        false,
        body,
    )
    .into_response())
}

fn ms(v: Option<f64>) -> String {
    v.map(|v| format!("{v:.0} ms"))
        .unwrap_or_else(|| "–".to_string())
}

// ---------------------------------------------------------------- settings

/// The settings form as posted (checkboxes are present only when ticked).
#[derive(Deserialize, Default)]
struct SettingsForm {
    #[serde(default)]
    enabled: Option<String>,
    enforcement: String,
    #[serde(default)]
    allow_totp: Option<String>,
    #[serde(default)]
    allow_email: Option<String>,
    #[serde(default)]
    allow_sms: Option<String>,
    default_method: String,
    #[serde(default)]
    allow_fallback: Option<String>,
    enrollment: String,
    code_timeout: String,
    max_invalid_attempts: String,
    resend_limit: String,
    #[serde(default)]
    sms_provider: String,
    scope: String,
    #[serde(default)]
    scope_roles: String,
    #[serde(default)]
    replace_backup_codes_on_use: Option<String>,
    #[serde(default)]
    allow_login_as: Option<String>,
    #[serde(default)]
    trust_known_ips: Option<String>,
    #[serde(default = "five")]
    password_attempts_before_delay: String,
    #[serde(default = "thirty")]
    remembered_device_days: String,
    #[serde(default = "hundred")]
    password_failures_per_address_per_hour: String,
    #[serde(default = "ten")]
    codes_per_account_per_hour: String,
    #[serde(default = "fifty")]
    codes_per_address_per_hour: String,
    /// Minutes; empty: no idle timeout.
    #[serde(default)]
    idle_timeout_mins: String,
    /// Days; empty: audit entries stay readable for ever.
    #[serde(default)]
    audit_retention_days: String,
    session_days: String,
    #[serde(default)]
    reason: String,
    /// `preview` or `save`.
    #[serde(default)]
    intent: String,
}

fn five() -> String {
    "5".to_string()
}

fn thirty() -> String {
    "30".to_string()
}

fn hundred() -> String {
    "100".to_string()
}

fn ten() -> String {
    "10".to_string()
}

fn fifty() -> String {
    "50".to_string()
}

fn number(field: &'static str, raw: &str) -> Result<u32, (&'static str, String)> {
    raw.trim()
        .parse()
        .map_err(|_| (field, "must be a whole number".to_string()))
}

fn enum_from<T: serde::de::DeserializeOwned>(
    field: &'static str,
    raw: &str,
) -> Result<T, (&'static str, String)> {
    serde_json::from_value(serde_json::Value::String(raw.to_string()))
        .map_err(|_| (field, format!("{raw:?} is not one of the choices")))
}

impl SettingsForm {
    fn settings(&self) -> Result<TwoFactorSettings, (&'static str, String)> {
        let mut allowed = Vec::new();
        for (on, m) in [
            (&self.allow_totp, Method::Totp),
            (&self.allow_email, Method::Email),
            (&self.allow_sms, Method::Sms),
        ] {
            if on.is_some() {
                allowed.push(m);
            }
        }
        let scope = match self.scope.as_str() {
            "all_users" => Scope::AllUsers,
            "selected_roles" => Scope::SelectedRoles {
                roles: self
                    .scope_roles
                    .split(',')
                    .map(str::trim)
                    .filter(|r| !r.is_empty())
                    .map(Role::parse)
                    .collect::<Result<_, _>>()
                    .map_err(|e| ("scope", e.to_string()))?,
            },
            "per_user" => Scope::PerUser,
            "voluntary" => Scope::Voluntary,
            other => return Err(("scope", format!("{other:?} is not one of the choices"))),
        };
        let days: i64 = self.session_days.trim().parse().map_err(|_| {
            (
                "session_duration_secs",
                "must be a whole number of days".to_string(),
            )
        })?;
        Ok(TwoFactorSettings {
            enabled: self.enabled.is_some(),
            enforcement: enum_from("enforcement", &self.enforcement)?,
            allowed_methods: allowed,
            default_method: enum_from("default_method", &self.default_method)?,
            allow_fallback: self.allow_fallback.is_some(),
            enrollment: enum_from("enrollment", &self.enrollment)?,
            code_timeout: enum_from("code_timeout", &self.code_timeout)?,
            max_invalid_attempts: enum_from("max_invalid_attempts", &self.max_invalid_attempts)?,
            resend_limit: enum_from("resend_limit", &self.resend_limit)?,
            sms_provider: Some(self.sms_provider.trim().to_string()).filter(|p| !p.is_empty()),
            scope,
            replace_backup_codes_on_use: self.replace_backup_codes_on_use.is_some(),
            session_duration_secs: days.saturating_mul(24 * 3600),
            allow_login_as: self.allow_login_as.is_some(),
            trust_known_ips: self.trust_known_ips.is_some(),
            password_attempts_before_delay: number(
                "password_attempts_before_delay",
                &self.password_attempts_before_delay,
            )?,
            remembered_device_days: number("remembered_device_days", &self.remembered_device_days)?,
            password_failures_per_address_per_hour: number(
                "password_failures_per_address_per_hour",
                &self.password_failures_per_address_per_hour,
            )?,
            codes_per_account_per_hour: number(
                "codes_per_account_per_hour",
                &self.codes_per_account_per_hour,
            )?,
            codes_per_address_per_hour: number(
                "codes_per_address_per_hour",
                &self.codes_per_address_per_hour,
            )?,
            idle_timeout_mins: match self.idle_timeout_mins.trim() {
                "" | "0" => None,
                raw => Some(number("idle_timeout_mins", raw)?),
            },
            audit_retention_days: match self.audit_retention_days.trim() {
                "" => None,
                raw => Some(number("audit_retention_days", raw)?),
            },
        })
    }
}

fn json_name<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_value(value)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

fn field_error(errors: &Option<(&'static str, String)>, field: &str) -> Markup {
    html! {
        @if let Some((f, m)) = errors {
            @if *f == field { p.field-error id={ (field) "-error" } role="alert" { (m) } }
        }
    }
}

struct SettingsView<'a> {
    settings: &'a TwoFactorSettings,
    reason: &'a str,
    error: Option<(&'static str, String)>,
    preview: Option<&'a SettingsPreview>,
    can_edit: bool,
    providers: &'a [String],
}

fn settings_form(t: &str, token: &str, v: &SettingsView<'_>) -> Markup {
    let s = v.settings;
    let ro = !v.can_edit;
    let choice = |name: &'static str, value: &str, label: &str, checked: bool| {
        html! {
            label.check { input type="radio" name=(name) value=(value) checked[checked] disabled[ro]; (label) }
        }
    };
    let option = |value: &str, label: &str, selected: bool| {
        html! {
            option value=(value) selected[selected] { (label) }
        }
    };
    let timeout = json_name(&s.code_timeout);
    let attempts = json_name(&s.max_invalid_attempts);
    let resend = json_name(&s.resend_limit);
    let scope_kind = match &s.scope {
        Scope::AllUsers => "all_users",
        Scope::SelectedRoles { .. } => "selected_roles",
        Scope::PerUser => "per_user",
        Scope::Voluntary => "voluntary",
    };
    let scope_roles = match &s.scope {
        Scope::SelectedRoles { roles } => roles
            .iter()
            .map(|r| r.as_str().to_string())
            .collect::<Vec<_>>()
            .join(", "),
        _ => String::new(),
    };
    html! {
        @if let Some((field, m)) = &v.error {
            @if *field == "form" { (message("error", m)) } @else { (message("error", "Some settings need a change: see the marked field.")) }
        }
        @if let Some(p) = v.preview { (preview_panel(p)) }
        form method="post" action={ "/t/" (t) "/admin/settings" } {
            (token_input(token))
            fieldset {
                legend { "Master switch" }
                label.check { input #enabled type="checkbox" name="enabled" value="on" checked[s.enabled] disabled[ro]; "Enable two-factor authentication" }
                p.hint { "When off, no user is asked for a second factor, whatever else is set here." }
            }
            fieldset {
                legend { "Enforcement mode" }
                (choice("enforcement", "unrecognized_devices", "Only for unrecognized devices (risk-based)", s.enforcement == Enforcement::UnrecognizedDevices))
                (choice("enforcement", "every_login", "At every login", s.enforcement == Enforcement::EveryLogin))
                (field_error(&v.error, "enforcement"))
                label for="remembered_device_days" { "Remember a device for (days)" }
                input #remembered_device_days type="number" name="remembered_device_days" min="1" max="400" value=(s.remembered_device_days) disabled[ro];
                (field_error(&v.error, "remembered_device_days"))
                label.check { input type="checkbox" name="trust_known_ips" value="on" checked[s.trust_known_ips] disabled[ro]; "Also skip it from the address of an earlier 2FA sign-in" }
                p.hint { "Off is safer: everyone behind the same office NAT, VPN or an unconfigured proxy shares an address, and would skip the second factor after one colleague passed it." }
            }
            fieldset {
                legend { "Verification methods" }
                label.check { input type="checkbox" name="allow_totp" value="on" checked[s.allows(Method::Totp)] disabled[ro]; "Authenticator app (most secure)" }
                label.check { input type="checkbox" name="allow_email" value="on" checked[s.allows(Method::Email)] disabled[ro]; "Email" }
                label.check { input type="checkbox" name="allow_sms" value="on" checked[s.allows(Method::Sms)] disabled[ro]; "SMS (needs an SMS provider)" }
                (field_error(&v.error, "allowed_methods"))
                label for="default_method" { "Default method" }
                select #default_method name="default_method" disabled[ro] {
                    (option("totp", "Authenticator app", s.default_method == Method::Totp))
                    (option("email", "Email", s.default_method == Method::Email))
                    (option("sms", "SMS", s.default_method == Method::Sms))
                }
                (field_error(&v.error, "default_method"))
                label.check { input type="checkbox" name="allow_fallback" value="on" checked[s.allow_fallback] disabled[ro]; "Allow fallback to the other allowed methods" }
                label for="sms_provider" { "SMS provider" }
                select #sms_provider name="sms_provider" disabled[ro] {
                    (option("", "None", s.sms_provider.is_none()))
                    @for p in v.providers { (option(p, p, s.sms_provider.as_deref() == Some(p.as_str()))) }
                }
                @if v.providers.is_empty() { p.hint { "No SMS provider is configured on the server (sms_providers)." } }
                (field_error(&v.error, "sms_provider"))
            }
            fieldset {
                legend { "Authenticator enrollment" }
                (choice("enrollment", "optional", "Optional", s.enrollment == Enrollment::Optional))
                (choice("enrollment", "required", "Required at next sign-in", s.enrollment == Enrollment::Required))
                (field_error(&v.error, "enrollment"))
            }
            fieldset {
                legend { "Who must use 2FA" }
                label for="scope" { "Scope" }
                select #scope name="scope" disabled[ro] {
                    (option("all_users", "All users", scope_kind == "all_users"))
                    (option("selected_roles", "Users with selected roles", scope_kind == "selected_roles"))
                    (option("per_user", "Users an admin switches on one by one", scope_kind == "per_user"))
                    (option("voluntary", "Users who opt in themselves", scope_kind == "voluntary"))
                }
                label for="scope_roles" { "Roles (for selected roles, comma-separated)" }
                input #scope_roles type="text" name="scope_roles" value=(scope_roles) disabled[ro];
                (field_error(&v.error, "scope"))
            }
            fieldset {
                legend { "Codes and limits" }
                label for="code_timeout" { "Security code timeout" }
                select #code_timeout name="code_timeout" disabled[ro] {
                    @for (value, label) in [("2m", "2 minutes"), ("5m", "5 minutes"), ("15m", "15 minutes"), ("30m", "30 minutes"), ("60m", "60 minutes"), ("4h", "4 hours"), ("12h", "12 hours")] {
                        (option(value, label, timeout == value))
                    }
                }
                label for="max_invalid_attempts" { "Maximum invalid attempts" }
                select #max_invalid_attempts name="max_invalid_attempts" disabled[ro] {
                    @for (value, label) in [("3", "3"), ("5", "5"), ("10", "10"), ("unlimited", "No limit")] {
                        (option(value, label, attempts == value))
                    }
                }
                label for="resend_limit" { "Resend limit per challenge" }
                select #resend_limit name="resend_limit" disabled[ro] {
                    @for (value, label) in [("3", "3"), ("5", "5"), ("unlimited", "No limit")] {
                        (option(value, label, resend == value))
                    }
                }
                label.check { input type="checkbox" name="replace_backup_codes_on_use" value="on" checked[s.replace_backup_codes_on_use] disabled[ro]; "Replace a used recovery code automatically (keep 8)" }
                label.check { input type="checkbox" name="allow_login_as" value="on" checked[s.allow_login_as] disabled[ro]; "Allow admins to sign in as a user (Login As: with a reason and a code, for one hour, marked in every event)" }
                label for="password_attempts_before_delay" { "Wrong passwords before each try must wait longer" }
                input #password_attempts_before_delay type="number" name="password_attempts_before_delay" min="1" max="100" value=(s.password_attempts_before_delay) disabled[ro];
                (field_error(&v.error, "password_attempts_before_delay"))
                label for="password_failures_per_address_per_hour" { "Wrong passwords per hour from one address, across accounts" }
                input #password_failures_per_address_per_hour type="number" name="password_failures_per_address_per_hour" min="1" max="100000" value=(s.password_failures_per_address_per_hour) disabled[ro];
                (field_error(&v.error, "password_failures_per_address_per_hour"))
                label for="codes_per_account_per_hour" { "Email and SMS codes per hour for one account (and to one address or phone)" }
                input #codes_per_account_per_hour type="number" name="codes_per_account_per_hour" min="1" max="1000" value=(s.codes_per_account_per_hour) disabled[ro];
                (field_error(&v.error, "codes_per_account_per_hour"))
                label for="codes_per_address_per_hour" { "Email and SMS codes per hour for sign-ins from one address" }
                input #codes_per_address_per_hour type="number" name="codes_per_address_per_hour" min="1" max="100000" value=(s.codes_per_address_per_hour) disabled[ro];
                (field_error(&v.error, "codes_per_address_per_hour"))
                label for="idle_timeout_mins" { "Idle timeout (minutes)" p.hint { "Empty: sessions last their full duration. 60 minutes suits NIST AAL2." } }
                input #idle_timeout_mins type="number" name="idle_timeout_mins" min="5" max="10080" placeholder="off" value=[s.idle_timeout_mins] disabled[ro];
                (field_error(&v.error, "idle_timeout_mins"))
                label for="audit_retention_days" { "Keep audit entries readable for (days)" p.hint { "Empty: for ever. Older entries leave the audit history, timelines and exports once a signed checkpoint covers them; the events themselves are kept." } }
                input #audit_retention_days type="number" name="audit_retention_days" min="1" max="36500" placeholder="for ever" value=[s.audit_retention_days] disabled[ro];
                (field_error(&v.error, "audit_retention_days"))
                label for="session_days" { "Session duration (days)" }
                input #session_days type="number" name="session_days" min="1" max="400" value=(s.session_duration_secs / 86_400) disabled[ro];
                (field_error(&v.error, "session_duration_secs"))
            }
            @for w in twofold_app::console::warnings(s) { (message("warning", w)) }
            @if v.can_edit {
                label for="reason" { "Reason for this change" p.hint { "Recorded with the change in the audit history." } }
                input #reason type="text" name="reason" value=(v.reason) required;
                (field_error(&v.error, "reason"))
                button.secondary type="submit" name="intent" value="preview" { "Preview the effect" }
                @if v.preview.is_some_and(|p| !p.locks_you_out) {
                    button type="submit" name="intent" value="save" { "Save settings" }
                }
            }
        }
    }
}

fn preview_panel(p: &SettingsPreview) -> Markup {
    html! {
        section.card #preview aria-labelledby="preview-h" {
            h2 #preview-h { "Effect of this change" }
            ul {
                li { strong { (p.asked) } " users will be asked for a second factor at sign-in" }
                li { strong { (p.with_method) } " of them have a method these settings allow" }
                li { strong { (p.to_enroll) } " will be sent to set up an authenticator at their next sign-in" }
                li { strong { (p.without_method) } " have no usable method and nothing they could set up: their sign-in will be refused" }
            }
            @if p.admins_without_factor.is_empty() {
                p { "Every admin has a usable method." }
            } @else {
                p { "Admins without a usable method yet: " strong { (p.admins_without_factor.join(", ")) } }
            }
            @if p.locks_you_out {
                (message("error", &AppError::WouldLockYouOut.message()))
            } @else if p.you_sign_in_again {
                (message("warning", "After saving you will need to sign in again with a second factor to keep using the console."))
            }
        }
    }
}

async fn settings_page(
    State(api): State<ApiState>,
    Path(tenant): Path<String>,
    nonce: FormNonce,
    Query(q): Query<super::user::Notice>,
    console: ConsoleUser,
) -> Page {
    let token = nonce.token(&api);
    let checklist = api.app.checklist(&console.reader).await?;
    let settings = console.reader.0.tenant.settings.clone();
    let view = SettingsView {
        settings: &settings,
        reason: "",
        error: None,
        preview: None,
        can_edit: console.admin.is_some(),
        providers: &api.sms_providers,
    };
    let body = html! {
        (read_only_note(&console))
        @if q.done.as_deref() == Some("saved") { (message("success", "Settings saved. They apply from each user's next sign-in.")) }
        (settings_form(&tenant, &token, &view))
        (checklist_panel(&checklist))
    };
    Ok(layout::page(
        &frame(&console, &tenant, &token, Tab::Settings),
        "Two-factor settings",
        false,
        body,
    )
    .into_response())
}

async fn settings_post(
    State(api): State<ApiState>,
    Path(tenant): Path<String>,
    RequestMeta(origin): RequestMeta,
    nonce: FormNonce,
    ConsoleAdmin(admin): ConsoleAdmin,
    CheckedForm(form): CheckedForm<SettingsForm>,
) -> Page {
    let console = ConsoleUser::acting(&admin);
    let token = nonce.token(&api);
    let current = console.reader.0.tenant.settings.clone();
    let shown;
    let mut preview = None;
    let error = match form.settings() {
        Err(e) => {
            shown = current;
            Some(e)
        }
        Ok(proposed) => {
            shown = proposed.clone();
            let outcome = if form.intent == "save" {
                let saved = api
                    .app
                    .save_settings_checked(
                        &admin,
                        proposed.clone(),
                        Some(form.reason.clone()),
                        &origin,
                    )
                    .await;
                if let Ok(saved) = &saved {
                    // A session without a second factor no longer opens the
                    // console under the new settings: say so where it still works.
                    let mut after = admin.0.clone();
                    after.tenant.settings = saved.clone();
                    if after.admin().is_err() {
                        let next = format!("/t/{tenant}/account?done=settings_saved");
                        return Ok(Redirect::to(&next).into_response());
                    }
                }
                saved.map(|_| None)
            } else {
                api.app
                    .preview_settings(&admin, proposed)
                    .await
                    .map(|(_, p)| Some(p))
            };
            match outcome {
                Ok(None) => {
                    return Ok(
                        Redirect::to(&format!("/t/{tenant}/admin/settings?done=saved"))
                            .into_response(),
                    )
                }
                Ok(Some(p)) => {
                    preview = Some(p);
                    None
                }
                Err(AppError::Tenant(TenantError::InvalidSettings(e))) => {
                    Some((e.field, e.message.to_string()))
                }
                Err(e @ AppError::Refused(twofold_domain::user::UserError::ReasonRequired)) => {
                    Some(("reason", e.message()))
                }
                Err(e @ AppError::WouldLockYouOut) => Some(("form", e.message())),
                Err(e) => return Err(e.into()),
            }
        }
    };
    let view = SettingsView {
        settings: &shown,
        reason: &form.reason,
        error,
        preview: preview.as_ref(),
        can_edit: true,
        providers: &api.sms_providers,
    };
    let status = if view.error.is_some() {
        axum::http::StatusCode::UNPROCESSABLE_ENTITY
    } else {
        axum::http::StatusCode::OK
    };
    let body = settings_form(&tenant, &token, &view);
    Ok((
        status,
        layout::page(
            &frame(&console, &tenant, &token, Tab::Settings),
            "Two-factor settings",
            false,
            body,
        ),
    )
        .into_response())
}

// ------------------------------------------------------------------ users

/// The directory's filters as the form sends them (an empty field is "any").
#[derive(Deserialize, Default)]
struct UsersForm {
    #[serde(default)]
    q: String,
    #[serde(default)]
    two_factor: String,
    #[serde(default)]
    method: String,
    #[serde(default)]
    role: String,
    #[serde(default)]
    status: String,
    #[serde(default)]
    locked: String,
    #[serde(default)]
    backup_codes: String,
    #[serde(default)]
    page: String,
}

impl UsersForm {
    fn query(&self) -> DirectoryQuery {
        let some = |s: &str| Some(s.trim().to_string()).filter(|s| !s.is_empty());
        DirectoryQuery {
            q: some(&self.q),
            two_factor: some(&self.two_factor),
            method: some(&self.method),
            role: some(&self.role),
            status: some(&self.status),
            locked: match self.locked.as_str() {
                "true" => Some(true),
                "false" => Some(false),
                _ => None,
            },
            backup_codes: some(&self.backup_codes),
            page: self.page.parse().ok(),
            per_page: None,
        }
    }
}

async fn users(
    State(api): State<ApiState>,
    Path(tenant): Path<String>,
    nonce: FormNonce,
    Query(form): Query<UsersForm>,
    console: ConsoleUser,
) -> Page {
    let q = form.query();
    let token = nonce.token(&api);
    let page = api.app.directory(&console.reader, &q).await?;
    let t = &tenant;
    let sel = |v: &Option<String>, x: &str| v.as_deref() == Some(x);
    let link = |p: u32| {
        let mut pairs = vec![("page".to_string(), p.to_string())];
        for (k, v) in [
            ("q", &q.q),
            ("two_factor", &q.two_factor),
            ("method", &q.method),
            ("role", &q.role),
            ("status", &q.status),
            ("backup_codes", &q.backup_codes),
        ] {
            if let Some(v) = v {
                pairs.push((k.to_string(), v.clone()));
            }
        }
        if let Some(l) = q.locked {
            pairs.push(("locked".to_string(), l.to_string()));
        }
        format!(
            "/t/{t}/admin/users?{}",
            serde_urlencoded::to_string(&pairs).unwrap_or_default()
        )
    };
    let pages = ((page.total.max(0) as u64).div_ceil(u64::from(page.per_page))).max(1);
    let body = html! {
        (read_only_note(&console))
        form.filters method="get" action={ "/t/" (t) "/admin/users" } {
            div { label for="q" { "Search by name" } input #q type="search" name="q" value=[q.q.as_deref()]; }
            div { label for="two_factor" { "2FA" }
                select #two_factor name="two_factor" {
                    option value="" { "Any" }
                    option value="on" selected[sel(&q.two_factor, "on")] { "Enrolled" }
                    option value="off" selected[sel(&q.two_factor, "off")] { "Not enrolled" }
                } }
            div { label for="method" { "Method" }
                select #method name="method" {
                    option value="" { "Any" }
                    option value="totp" selected[sel(&q.method, "totp")] { "Authenticator" }
                    option value="email" selected[sel(&q.method, "email")] { "Email" }
                    option value="sms" selected[sel(&q.method, "sms")] { "SMS" }
                } }
            div { label for="role" { "Role" } input #role type="text" name="role" value=[q.role.as_deref()]; }
            div { label for="locked" { "Locked" }
                select #locked name="locked" {
                    option value="" { "Any" }
                    option value="true" selected[q.locked == Some(true)] { "Locked" }
                    option value="false" selected[q.locked == Some(false)] { "Not locked" }
                } }
            div { label for="backup_codes" { "Recovery codes" }
                select #backup_codes name="backup_codes" {
                    option value="" { "Any" }
                    option value="low" selected[sel(&q.backup_codes, "low")] { "2 or fewer" }
                    option value="none" selected[sel(&q.backup_codes, "none")] { "None left" }
                } }
            div { button type="submit" { "Filter" } }
        }
        p.muted {
            @if page.total_capped { "More than " (page.total - 1) " users" }
            @else { (page.total) " user" @if page.total != 1 { "s" } }
        }
        div.table-wrap { table #directory {
            thead { tr { th { "User" } th { "Roles" } th { "2FA" } th { "Methods" } th { "Codes left" } th { "Last sign-in" } } }
            tbody {
                @for u in &page.users {
                    (user_row(t, u))
                }
            }
        } }
        @if pages > 1 {
            nav.row aria-label="Pages" {
                @if page.page > 1 { a href=(link(page.page - 1)) { "← Previous" } }
                span { "Page " (page.page) @if !page.total_capped { " of " (pages) } }
                @if u64::from(page.page) < pages { a href=(link(page.page + 1)) { "Next →" } }
            }
        }
    };
    Ok(layout::page(
        &frame(&console, &tenant, &token, Tab::Users),
        "User Management",
        false,
        body,
    )
    .into_response())
}

fn user_row(t: &str, u: &UserRow) -> Markup {
    html! {
        tr {
            td {
                a href={ "/t/" (t) "/admin/users/" (u.user_id) } { (u.username) }
                @if u.locked { " " span.pill.bad { "locked" } }
                @if u.service_account { " " span.pill { "service account" } }
            }
            td { (u.roles.iter().cloned().collect::<Vec<_>>().join(", ")) }
            td { (status_pill(u.status())) }
            td { (u.methods().join(", ")) }
            td { @if u.two_factor == TwoFactorState::Enrolled { (u.backup_codes_left) } @else { "–" } }
            td {
                @match &u.last_sign_in {
                    Some(s) => { (when(&s.at)) br; span.hint { (second_factor_text(&s.second_factor)) } }
                    None => { span.muted { "never" } }
                }
            }
        }
    }
}

#[derive(Deserialize)]
struct ActionForm {
    action: String,
    #[serde(default)]
    reason: String,
    #[serde(default)]
    confirm: Option<String>,
}

async fn user_page(
    State(api): State<ApiState>,
    Path((tenant, user)): Path<(String, String)>,
    RequestMeta(origin): RequestMeta,
    nonce: FormNonce,
    Query(q): Query<super::user::Notice>,
    console: ConsoleUser,
) -> Page {
    let token = nonce.token(&api);
    let page = user_view(
        &api,
        &origin,
        &tenant,
        &user,
        &token,
        &console,
        q.done.as_deref(),
        None,
    )
    .await?;
    Ok(page.into_response())
}

#[allow(clippy::too_many_arguments)]
async fn user_view(
    api: &ApiState,
    origin: &Origin,
    tenant: &str,
    user: &str,
    token: &str,
    console: &ConsoleUser,
    done: Option<&str>,
    error: Option<String>,
) -> Result<Markup, PageError> {
    let reader: &ReaderSession = &console.reader;
    let (d, history) = api.app.user_page(reader, origin, user).await?;
    let t = tenant;
    let p = &d.profile;
    let name = p.username.clone().unwrap_or_default();
    let done_text = match done {
        Some("unlock") => Some("The user is unlocked."),
        Some("reset-enrollment") => Some("The user's enrollment is reset: they set up their second factor again at the next sign-in."),
        Some("revoke-sessions") => Some("The user's sessions and remembered devices are ended."),
        Some("reset-link") => Some("A link to choose a new password is on its way to the user's email address. It works once, for an hour; their second factor is still asked at sign-in."),
        Some(d) if d.starts_with("forget-device:") => Some("The device is forgotten: its next sign-in asks for a second factor."),
        _ => None,
    };
    let body = html! {
        (read_only_note(console))
        @if let Some(text) = done_text { (message("success", text)) }
        @if let Some(e) = &error { (message("error", e)) }
        div.grid {
            section.card aria-labelledby="status-h" {
                h2 #status-h { "Status" }
                p { "Two-factor: " (status_pill(p.two_factor)) @if d.locked { " " span.pill.bad { "locked out" } } }
                p { "Roles: " (p.roles.join(", ")) }
                p { "Email: " (p.email.as_deref().unwrap_or("none")) br; "Phone: " (p.phone.as_deref().unwrap_or("none")) }
                p { "Recovery codes left: " (p.backup_codes_left) }
                p { "Wrong codes in a row: " (d.failures) }
            }
            section.card aria-labelledby="last-h" {
                h2 #last-h { "Last sign-in" }
                @match &d.last_sign_in {
                    Some(s) => {
                        p { (when(&s.at)) @if let Some(ip) = &s.ip { " from " (ip) } }
                        p { (second_factor_text(&s.second_factor)) }
                    }
                    None => { p.muted { "Never signed in." } }
                }
                h3 { "Sessions" }
                @if d.sessions.is_empty() { p.muted { "None open." } }
                ul { @for s in &d.sessions { li { "since " (when(&s.started_at)) ", " (second_factor_text(&s.second_factor)) } } }
                h3 { "Remembered devices" }
                @if d.devices.is_empty() { p.muted { "None." } }
                ul { @for dev in &d.devices { li { "remembered " (when(&dev.remembered_at)) } } }
            }
        }
        @if console.admin.is_some() && reader.0.tenant.settings.allow_login_as && !p.roles.iter().any(|r| r == "admin") {
            section.card aria-labelledby="login-as-h" {
                h2 #login-as-h { "Sign in as " (name) }
                p.hint { "To see what they see. Needs a reason and a code from you first (confirm it's you within the last 10 minutes); the session lasts an hour, and every event in it names you. Your own console session in this browser is replaced." }
                form method="post" action={ "/t/" (t) "/admin/users/" (p.user_id) "/login-as" } {
                    (token_input(token))
                    label for="login-as-reason" { "Reason" }
                    input #login-as-reason type="text" name="reason" required;
                    button.secondary type="submit" { "Sign in as " (name) }
                }
            }
        }
        @if console.admin.is_some() && p.user_id != reader.0.user_id {
            section.card aria-labelledby="erase-h" {
                h2 #erase-h { "Erase " (name) }
                p.hint { "Deletes the key their personal data is sealed under: their email address, phone number, username, addresses and browsers read as [erased] everywhere from then on, and the account is gone. This cannot be undone. Needs a reason and a code from you first (within the last 10 minutes)." }
                form method="post" action={ "/t/" (t) "/admin/users/" (p.user_id) "/erase" } {
                    (token_input(token))
                    label for="erase-reason" { "Reason" }
                    input #erase-reason type="text" name="reason" required;
                    button.danger type="submit" { "Erase " (name) }
                }
            }
        }
        @if console.admin.is_some() {
            section.card aria-labelledby="actions-h" {
                h2 #actions-h { "Actions" }
                p.hint { "Each action is recorded with you as the actor and the reason you give." }
                form method="post" action={ "/t/" (t) "/admin/users/" (p.user_id) } {
                    (token_input(token))
                    label for="action" { "Action" }
                    select #action name="action" {
                        option value="unlock" { "Unlock (end a lockout)" }
                        option value="reset-enrollment" { "Reset enrollment (they set up 2FA again)" }
                        option value="backup-codes" { "Regenerate recovery codes (shown once, to hand over)" }
                        option value="revoke-sessions" { "Sign out everywhere (sessions and remembered devices)" }
                        @if p.email.is_some() {
                            option value="reset-link" { "Email a link to choose a new password (works once, for an hour)" }
                        }
                        @for dev in &d.devices {
                            option value={ "forget-device:" (dev.device_id) } { "Forget the device remembered " (when(&dev.remembered_at)) }
                        }
                    }
                    label for="reason" { "Reason" }
                    input #reason type="text" name="reason" required;
                    label.check { input #confirm type="checkbox" name="confirm" value="yes" required; "I confirm this action on " strong { (name) } }
                    button type="submit" { "Apply" }
                }
            }
        }
        section.card aria-labelledby="timeline-h" {
            h2 #timeline-h { "Two-factor timeline" }
            div.table-wrap { table #timeline {
                thead { tr { th { "When" } th { "What" } th { "Who" } th { "From" } th { "Reason" } } }
                tbody {
                    @for e in history.iter().rev() {
                        tr {
                            td { (when(&e.at)) }
                            td { (e.event_type) }
                            td { (e.actor_kind) }
                            td { (e.ip.as_deref().unwrap_or("")) }
                            td { (e.reason.as_deref().unwrap_or("")) }
                        }
                    }
                }
            } }
        }
    };
    Ok(layout::page(
        &frame(console, tenant, token, Tab::Users),
        &name,
        false,
        body,
    ))
}

async fn user_action(
    State(api): State<ApiState>,
    Path((tenant, user)): Path<(String, String)>,
    RequestMeta(origin): RequestMeta,
    nonce: FormNonce,
    ConsoleAdmin(admin): ConsoleAdmin,
    CheckedForm(form): CheckedForm<ActionForm>,
) -> Page {
    let console = ConsoleUser::acting(&admin);
    let token = nonce.token(&api);
    let reason = Some(form.reason.clone()).filter(|r| !r.trim().is_empty());
    let problem = if form.confirm.is_none() {
        Some("Tick the confirmation to apply the action.".to_string())
    } else if reason.is_none() {
        Some("Give a reason: it is recorded with the action.".to_string())
    } else {
        None
    };
    if let Some(text) = problem {
        let page = user_view(
            &api,
            &origin,
            &tenant,
            &user,
            &token,
            &console,
            None,
            Some(text),
        )
        .await?;
        return Ok((axum::http::StatusCode::UNPROCESSABLE_ENTITY, page).into_response());
    }
    let action = match form.action.as_str() {
        "unlock" => UserAction::Unlock,
        "reset-enrollment" => UserAction::ResetEnrollment,
        "revoke-sessions" => UserAction::RevokeSessions,
        "reset-link" => {
            api.app
                .send_reset_link(&admin, &user, reason, &origin)
                .await?;
            return Ok(
                Redirect::to(&format!("/t/{tenant}/admin/users/{user}?done=reset-link"))
                    .into_response(),
            );
        }
        forget if forget.starts_with("forget-device:") => forget
            .strip_prefix("forget-device:")
            .and_then(|d| d.parse().ok())
            .map(UserAction::ForgetDevice)
            .ok_or_else(|| AppError::bad_input("invalid_form", "No such device."))?,
        "backup-codes" => {
            let codes = api
                .app
                .regenerate_backup_codes_for(&admin, &user, reason, &origin)
                .await?;
            let body = html! {
                p { "New recovery codes for this user; the old ones no longer work. Hand them over securely: they are shown only now." }
                ul.codes #recovery-codes { @for c in &codes { li { (c) } } }
                a.button href={ "/t/" (tenant) "/admin/users/" (user) } { "Back to the user" }
            };
            return Ok(layout::page(
                &frame(&console, &tenant, &token, Tab::Users),
                "Recovery codes",
                true,
                body,
            )
            .into_response());
        }
        _ => return Err(AppError::bad_input("invalid_form", "Choose one of the actions.").into()),
    };
    match api
        .app
        .act_on_user(&admin, &user, action, reason, &origin)
        .await
    {
        Ok(()) => Ok(Redirect::to(&format!(
            "/t/{tenant}/admin/users/{user}?done={}",
            form.action
        ))
        .into_response()),
        Err(e @ AppError::Refused(_)) => {
            let page = user_view(
                &api,
                &origin,
                &tenant,
                &user,
                &token,
                &console,
                None,
                Some(e.message()),
            )
            .await?;
            Ok((crate::error::status_of(&e), page).into_response())
        }
        Err(e) => Err(e.into()),
    }
}

// ------------------------------------------------------------------ audit

/// The audit search as typed (empty fields mean any).
#[derive(Deserialize, Default, Clone)]
struct AuditForm {
    #[serde(default)]
    event_type: String,
    #[serde(default)]
    user_id: String,
    #[serde(default)]
    actor: String,
    #[serde(default)]
    from: String,
    #[serde(default)]
    to: String,
    #[serde(default)]
    format: String,
}

impl AuditForm {
    fn query(&self) -> Result<AuditQuery, AppError> {
        let some = |s: &str| Some(s.trim().to_string()).filter(|s| !s.is_empty());
        let day = |s: &str, end: bool| -> Result<Option<DateTime<Utc>>, AppError> {
            match some(s) {
                None => Ok(None),
                Some(d) => NaiveDate::parse_from_str(&d, "%Y-%m-%d")
                    .map(|d| {
                        Some(if end {
                            end_of(d)
                        } else {
                            d.and_time(NaiveTime::MIN).and_utc()
                        })
                    })
                    .map_err(|_| AppError::InvalidQuery("Dates look like 2026-03-01.".to_string())),
            }
        };
        Ok(AuditQuery {
            event_type: some(&self.event_type),
            user_id: some(&self.user_id),
            actor: some(&self.actor),
            from: day(&self.from, false)?,
            to: day(&self.to, true)?,
            format: some(&self.format),
        })
    }

    fn export_link(&self, t: &str, format: &str) -> String {
        let pairs = [
            ("event_type", &self.event_type),
            ("user_id", &self.user_id),
            ("actor", &self.actor),
            ("from", &self.from),
            ("to", &self.to),
        ];
        let mut q: Vec<(&str, &str)> = pairs
            .iter()
            .filter(|(_, v)| !v.is_empty())
            .map(|(k, v)| (*k, v.as_str()))
            .collect();
        q.push(("format", format));
        format!(
            "/t/{t}/admin/audit/export?{}",
            serde_urlencoded::to_string(&q).unwrap_or_default()
        )
    }
}

/// The most entries an audit search shows (the exports have them all).
const AUDIT_PAGE: usize = 200;

async fn audit(
    State(api): State<ApiState>,
    Path(tenant): Path<String>,
    RequestMeta(origin): RequestMeta,
    nonce: FormNonce,
    Query(form): Query<AuditForm>,
    console: ConsoleUser,
) -> Page {
    let token = nonce.token(&api);
    let entries = api
        .app
        .audit_search(&console.reader, &origin, &form.query()?, AUDIT_PAGE)
        .await?;
    let t = &tenant;
    let body = html! {
        (read_only_note(&console))
        form.filters method="get" action={ "/t/" (t) "/admin/audit" } {
            div { label for="event_type" { "Event type" } input #event_type type="text" name="event_type" value=(form.event_type) placeholder="CodeRejected"; }
            div { label for="user_id" { "User id" } input #user_id type="text" name="user_id" value=(form.user_id); }
            div { label for="actor" { "Actor id" } input #actor type="text" name="actor" value=(form.actor); }
            div { label for="from" { "From" } input #from type="date" name="from" value=(form.from); }
            div { label for="to" { "To" } input #to type="date" name="to" value=(form.to); }
            div { button type="submit" { "Search" } }
        }
        div.row {
            a.button.secondary #export-ndjson href=(form.export_link(t, "ndjson")) { "Export NDJSON" }
            a.button.secondary #export-csv href=(form.export_link(t, "csv")) { "Export CSV" }
            span.hint { "Exports are hash-chained: check one with `twofold audit verify FILE`." }
        }
        p.muted { "Newest first; at most " (AUDIT_PAGE) " shown." }
        div.table-wrap { table #audit {
            thead { tr { th { "When" } th { "Event" } th { "User" } th { "Actor" } th { "IP" } th { "Reason" } } }
            tbody {
                @for e in &entries {
                    tr {
                        td { (when(&e.at)) }
                        td { (e.event_type) }
                        td { @if let Some(u) = &e.user_id { a href={ "/t/" (t) "/admin/users/" (u) } { (u.chars().take(8).collect::<String>()) } } }
                        td { (e.actor_kind) }
                        td { (e.ip.as_deref().unwrap_or("")) }
                        td { (e.reason.as_deref().unwrap_or("")) }
                    }
                }
            }
        } }
    };
    Ok(layout::page(
        &frame(&console, &tenant, &token, Tab::Audit),
        "Audit",
        false,
        body,
    )
    .into_response())
}

async fn audit_export(
    State(api): State<ApiState>,
    RequestMeta(origin): RequestMeta,
    Query(form): Query<AuditForm>,
    console: ConsoleUser,
) -> Page {
    let (format, lines) = api
        .app
        .audit_export(&console.reader, &origin, form.query()?)
        .await?;
    let (content_type, name) = match format {
        Format::Ndjson => ("application/x-ndjson", "twofold-audit.ndjson"),
        Format::Csv => ("text/csv; charset=utf-8", "twofold-audit.csv"),
    };
    Ok((
        [
            (header::CONTENT_TYPE, content_type.to_string()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{name}\""),
            ),
        ],
        Body::from_stream(lines),
    )
        .into_response())
}

/// Erases a user (a step-up first, like Login As), then back to the list.
async fn erase(
    State(api): State<ApiState>,
    Path((tenant, user)): Path<(String, String)>,
    RequestMeta(origin): RequestMeta,
    jar: axum_extra::extract::cookie::CookieJar,
    ConsoleAdmin(admin): ConsoleAdmin,
    CheckedForm(form): CheckedForm<LoginAsForm>,
) -> Page {
    let reason = Some(form.reason).filter(|r| !r.trim().is_empty());
    match api.app.erase_user(&admin, &user, reason, &origin).await {
        Err(AppError::Refused(twofold_domain::user::UserError::StepUpRequired)) => {
            let nonce = jar
                .get("twofold_form")
                .map(|c| c.value().to_string())
                .unwrap_or_default();
            Err(PageError::StepUp {
                tenant,
                token: api.app.keys.form_token(&nonce),
            })
        }
        other => {
            other?;
            Ok(Redirect::to(&format!("/t/{tenant}/admin/users")).into_response())
        }
    }
}

#[derive(Deserialize)]
struct LoginAsForm {
    #[serde(default)]
    reason: String,
}

async fn login_as(
    State(api): State<ApiState>,
    Path((tenant, user)): Path<(String, String)>,
    RequestMeta(origin): RequestMeta,
    jar: axum_extra::extract::cookie::CookieJar,
    ConsoleAdmin(admin): ConsoleAdmin,
    CheckedForm(form): CheckedForm<LoginAsForm>,
) -> Page {
    let reason = Some(form.reason).filter(|r| !r.trim().is_empty());
    let signed_in = match api.app.login_as(&admin, &user, reason, &origin).await {
        Err(AppError::Refused(twofold_domain::user::UserError::StepUpRequired)) => {
            // Confirm a code first, then come back here.
            let nonce = jar
                .get("twofold_form")
                .map(|c| c.value().to_string())
                .unwrap_or_default();
            return Err(PageError::StepUp {
                tenant,
                token: api.app.keys.form_token(&nonce),
            });
        }
        other => other?,
    };
    use secrecy::ExposeSecret;
    let jar = jar.add(super::forms::tenant_cookie(
        super::forms::SESSION_COOKIE,
        signed_in.session_token.expose_secret().to_string(),
        &tenant,
        api.secure_cookies,
    ));
    Ok((jar, Redirect::to(&format!("/t/{tenant}/account"))).into_response())
}
