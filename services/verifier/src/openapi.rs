//! The HTTP API described as OpenAPI 3.1, generated from the handlers'
//! `#[utoipa::path]` annotations and the schemas below, served at
//! `GET /openapi.json` (and rendered as a page at `GET /api`).
//!
//! The handlers build most answers with `json!`; the response schemas here
//! say what those answers hold, and `ops/test` runs schemathesis against a
//! live verifier to check every answer against them. Domain types stay free
//! of web dependencies: where a body is a domain or application type, a
//! schema here stands for it.

use std::collections::BTreeMap;

use axum::http::{header, HeaderValue};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{RefOr, ResponseBuilder};
use utoipa::{IntoParams, IntoResponses, Modify, OpenApi, ToSchema};

use crate::routes::{admin, auth, me, reports};
use crate::ApiState;

/// Where every tenant's API lives; README tables name paths below it.
pub const TENANT_PREFIX: &str = "/v1/tenants/{tenant}";

#[derive(OpenApi)]
#[openapi(
    info(
        title = "twofold",
        description = "The twofold HTTP API: sign-in with a second factor, enrollment, \
            sessions, self-service, admin and read models. JSON in and out; every error is \
            `{\"error\": {\"code\", \"message\"}}` with a stable `code`, and some add fields \
            (`field`, `attempts_remaining`, `retry_after_secs`, `step_up`)."
    ),
    paths(
        auth::sign_in,
        auth::verify,
        auth::resend,
        auth::switch,
        auth::complete_enrollment,
        auth::skip_enrollment,
        auth::introspect,
        auth::sign_out,
        auth::reset_with_link,
        me::profile,
        me::change_contact,
        me::start_totp,
        me::totp_qr,
        me::confirm_totp,
        me::remove_totp,
        me::step_up,
        me::set_voluntary,
        me::set_preferred_method,
        me::change_password,
        me::backup_codes,
        me::regenerate_backup_codes,
        admin::create_user,
        admin::get_user,
        admin::update_user,
        admin::reset_enrollment,
        admin::unlock,
        admin::revoke_sessions,
        admin::regenerate_backup_codes,
        admin::reset_password,
        admin::forget_device,
        admin::login_as,
        admin::erase_user,
        admin::revoke_all_sessions,
        admin::get_settings,
        admin::put_settings,
        reports::directory,
        reports::user_history,
        reports::overview,
        reports::daily,
        reports::delivery,
        reports::audit_export,
        reports::audit_keys,
        reports::audit_checkpoints,
    ),
    modifiers(&BearerSession),
    tags(
        (name = "sign-in", description = "The password step, the challenge and the session"),
        (name = "self-service", description = "The signed-in user's own account"),
        (name = "admin", description = "Admins act on users and settings (with a reason)"),
        (name = "read models", description = "What admins and auditors read"),
    )
)]
pub struct ApiDoc;

/// The document, as served.
pub fn document() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

/// `GET /openapi.json` (no auth).
pub fn routes() -> Router<ApiState> {
    Router::new().route(
        "/openapi.json",
        get(|| async {
            let mut response = Json(document()).into_response();
            response.headers_mut().insert(
                header::CACHE_CONTROL,
                HeaderValue::from_static("public, max-age=300"),
            );
            response
        }),
    )
}

/// The security scheme the annotations name: a session token as a bearer token.
struct BearerSession;

impl Modify for BearerSession {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "session",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "A session token from sign-in: `Authorization: Bearer <token>`",
                    ))
                    .build(),
            ),
        );
    }
}

/// The tenant in the path.
#[derive(IntoParams)]
#[into_params(parameter_in = Path)]
pub struct TenantPath {
    /// The tenant's id.
    #[allow(dead_code)]
    tenant: String,
}

/// The tenant and a user in the path.
#[derive(IntoParams)]
#[into_params(parameter_in = Path)]
pub struct UserPath {
    /// The tenant's id.
    #[allow(dead_code)]
    tenant: String,
    /// The user's id.
    #[allow(dead_code)]
    user: String,
}

// ------------------------------------------------------------------ errors

/// Every error: `{"error": {"code", "message", ...}}`.
#[derive(ToSchema)]
#[schema(example = json!({"error": {"code": "invalid_code", "message": "That code is not right.", "attempts_remaining": 2}}))]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

/// A stable machine-readable `code`, a `message` for people, and for some
/// codes more fields (`field`, `attempts_remaining`, `retry_after_secs`, `step_up`).
#[derive(ToSchema)]
pub struct ErrorDetail {
    pub code: String,
    pub message: String,
}

/// One error response per (status, the codes it carries).
fn error_responses(list: &[(&str, &str)]) -> BTreeMap<String, RefOr<utoipa::openapi::Response>> {
    list.iter()
        .map(|(status, codes)| {
            let response = ResponseBuilder::new()
                .description(*codes)
                .content(
                    "application/json",
                    utoipa::openapi::ContentBuilder::new()
                        .schema(Some(RefOr::Ref(utoipa::openapi::Ref::from_schema_name(
                            "ErrorBody",
                        ))))
                        .build(),
                )
                .build();
            ((*status).to_string(), RefOr::T(response))
        })
        .collect()
}

/// What any tenant endpoint may answer: no such tenant, the database
/// unreachable, the request running too long.
pub struct AnyErrors;

impl IntoResponses for AnyErrors {
    fn responses() -> BTreeMap<String, RefOr<utoipa::openapi::Response>> {
        error_responses(&[
            (
                "404",
                "`tenant_not_found` (or `user_not_found` where a user is named)",
            ),
            (
                "503",
                "`service_unavailable` (PostgreSQL unreachable, nothing written) or `timeout`",
            ),
        ])
    }
}

/// What an endpoint that reads a JSON body may answer about the body.
pub struct BodyErrors;

impl IntoResponses for BodyErrors {
    fn responses() -> BTreeMap<String, RefOr<utoipa::openapi::Response>> {
        error_responses(&[
            ("400", "`malformed_json`"),
            ("413", "`body_too_large`"),
            ("415", "`unsupported_media_type`"),
            (
                "422",
                "`invalid_body` (a field missing, unknown or of the wrong type)",
            ),
        ])
    }
}

/// What an endpoint that needs a session may answer about it.
pub struct SessionErrors;

impl IntoResponses for SessionErrors {
    fn responses() -> BTreeMap<String, RefOr<utoipa::openapi::Response>> {
        error_responses(&[
            ("401", "`unauthenticated`: no session token, or not a live one"),
            (
                "403",
                "`password_change_required`; for admin and read-model endpoints also \
                 `forbidden` (not an admin or auditor) and `second_factor_required` (with `step_up`)",
            ),
        ])
    }
}

// --------------------------------------------------------------- answers

/// `{token, expires_at}` of a new session.
#[derive(ToSchema)]
pub struct SessionToken {
    pub token: String,
    #[schema(format = DateTime)]
    pub expires_at: String,
}

/// How a sign-in passed (or skipped) the second factor:
/// `{"used": true, "method"}` or `{"used": false, "skipped_because"}`.
#[derive(ToSchema)]
pub struct SecondFactor {
    pub used: bool,
    pub method: Option<String>,
    pub skipped_because: Option<String>,
}

/// A challenge waiting for a code.
#[derive(ToSchema)]
pub struct Challenge {
    /// The challenge token, for `/challenge/verify`, `/resend` and `/switch`.
    pub token: String,
    #[schema(inline)]
    pub method: MethodName,
    /// The methods this challenge may switch to.
    pub methods: Vec<MethodName>,
    #[schema(format = DateTime)]
    pub expires_at: String,
    pub resends_remaining: Option<u32>,
    /// What answering it leads to: `{"kind": "sign_in" | "enrollment" | "step_up" | "verify_contact", ...}`.
    #[schema(value_type = Object)]
    pub purpose: serde_json::Value,
}

/// A challenge as `/challenge/resend` and `/challenge/switch` answer it (no token).
#[derive(ToSchema)]
pub struct ChallengeState {
    pub method: MethodName,
    pub methods: Vec<MethodName>,
    #[schema(format = DateTime)]
    pub expires_at: String,
    pub resends_remaining: Option<u32>,
    #[schema(value_type = Object)]
    pub purpose: serde_json::Value,
}

/// A second-factor method.
#[derive(serde::Serialize, ToSchema)]
#[schema(rename_all = "snake_case")]
pub enum MethodName {
    Totp,
    Email,
    Sms,
}

/// A new authenticator to scan or type in.
#[derive(ToSchema)]
pub struct Enrollment {
    pub otpauth_uri: String,
    /// The seed in base32.
    pub secret: String,
    pub qr_png_base64: String,
}

/// Where a sign-in or a challenge answer stands.
#[derive(ToSchema)]
#[schema(rename_all = "snake_case")]
pub enum SignInStatus {
    /// A session: `session`, `second_factor`.
    SignedIn,
    /// A second factor is asked: `challenge`.
    Challenge,
    /// An authenticator must be set up first: `challenge`, `enrollment`, `skippable`.
    EnrollmentRequired,
    /// A step-up passed (`/challenge/verify` of a step-up challenge).
    SteppedUp,
    /// A new contact proved (`/challenge/verify` of a contact challenge).
    ContactVerified,
}

/// What sign-in and the challenge endpoints answer; which fields come with
/// which `status` is said on each.
#[derive(ToSchema)]
pub struct SignInAnswer {
    pub status: SignInStatus,
    #[schema(required = false)]
    pub session: Option<SessionToken>,
    #[schema(required = false)]
    pub second_factor: Option<SecondFactor>,
    #[schema(required = false)]
    pub challenge: Option<Challenge>,
    #[schema(required = false)]
    pub enrollment: Option<Enrollment>,
    #[schema(required = false)]
    pub skippable: Option<bool>,
    /// Issued by this sign-in (required enrollment), shown once.
    #[schema(required = false)]
    pub backup_codes: Option<Vec<String>>,
    /// The remembered-device token (also set as a cookie).
    #[schema(required = false)]
    pub device_token: Option<String>,
    /// A new backup code in place of the one used, where the tenant replaces them.
    #[schema(required = false)]
    pub backup_code_replacement: Option<String>,
    #[schema(required = false)]
    pub password_change_required: Option<bool>,
}

/// A session token checked: `{"active": false}`, or `true` with the session.
#[derive(ToSchema)]
pub struct Introspection {
    pub active: bool,
    #[schema(required = false)]
    pub user_id: Option<String>,
    #[schema(required = false)]
    pub username: Option<String>,
    #[schema(required = false)]
    pub roles: Option<Vec<String>>,
    #[schema(required = false)]
    pub session_id: Option<String>,
    #[schema(required = false, format = DateTime)]
    pub started_at: Option<String>,
    #[schema(required = false, format = DateTime)]
    pub expires_at: Option<String>,
    #[schema(required = false)]
    pub second_factor: Option<SecondFactor>,
    /// The admin behind a Login As session.
    #[schema(required = false)]
    pub impersonated_by: Option<String>,
}

/// Where a user stands with the authenticator app.
#[derive(serde::Serialize, ToSchema)]
#[schema(rename_all = "snake_case")]
pub enum TwoFactorState {
    NotStarted,
    Pending,
    Enrolled,
}

/// A user's own account.
#[derive(serde::Serialize, ToSchema)]
pub struct Profile {
    pub user_id: String,
    pub username: Option<String>,
    pub email: Option<String>,
    pub phone: Option<String>,
    pub roles: Vec<String>,
    pub service_account: bool,
    pub two_factor: TwoFactorState,
    pub two_factor_opted_in: bool,
    pub backup_codes_left: u32,
    pub preferred_method: Option<MethodName>,
}

/// A user as admins and auditors see them.
#[derive(serde::Serialize, ToSchema)]
pub struct UserDetail {
    #[serde(flatten)]
    pub profile: Profile,
    pub two_factor_switched_on: bool,
    pub locked: bool,
    pub failures: u32,
    pub active_sessions: u32,
    pub remembered_devices: u32,
    /// Live sessions, oldest first: `session_id`, `started_at`, `expires_at`, `second_factor`.
    #[schema(value_type = Vec<Object>)]
    pub sessions: serde_json::Value,
    /// Remembered devices: `device_id`, `remembered_at`.
    #[schema(value_type = Vec<Object>)]
    pub devices: serde_json::Value,
    /// When, from where and how the user last signed in (from the directory).
    #[schema(value_type = Option<Object>)]
    pub last_sign_in: serde_json::Value,
}

/// `{"two_factor": "enrolled", "backup_codes": [...]}`, the codes shown once.
#[derive(ToSchema)]
pub struct TotpConfirmed {
    pub two_factor: TwoFactorState,
    pub backup_codes: Vec<String>,
}

/// A challenge for a step-up or for a new contact.
#[derive(ToSchema)]
pub struct ChallengeIssued {
    /// `challenge` (step-up) or `verification_sent` (a new contact).
    pub status: String,
    pub challenge: Challenge,
}

/// New backup codes, shown once.
#[derive(ToSchema)]
pub struct BackupCodes {
    pub backup_codes: Vec<String>,
}

/// The current backup codes, each with whether it was used.
#[derive(ToSchema)]
pub struct ShownBackupCodes {
    /// `{code, used}` each.
    #[schema(value_type = Vec<Object>)]
    pub backup_codes: serde_json::Value,
}

/// `{"user_id"}` of a new user.
#[derive(ToSchema)]
pub struct UserCreated {
    pub user_id: String,
}

/// A user to create.
#[derive(serde::Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewUser {
    pub username: String,
    /// 8 characters to 1024 bytes.
    pub password: String,
    #[schema(required = false)]
    pub email: Option<String>,
    #[schema(required = false)]
    pub phone: Option<String>,
    #[serde(default)]
    pub roles: Vec<String>,
    #[serde(default)]
    pub service_account: bool,
}

/// The tenant's two-factor settings, a domain type (the README's Settings
/// section names every field); described here as an object so the domain
/// stays free of web dependencies.
pub struct TwoFactorSettings;

impl utoipa::PartialSchema for TwoFactorSettings {
    fn schema() -> RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::ObjectBuilder::new()
            .description(Some(
                "`enabled`, `enforcement`, `allowed_methods`, `default_method`, \
                 `allow_fallback`, `enrollment`, `code_timeout`, `max_invalid_attempts`, \
                 `resend_limit`, `sms_provider`, `scope`, `replace_backup_codes_on_use`, \
                 `session_duration_secs` and optional limits (see the README's Settings)",
            ))
            .into()
    }
}

impl ToSchema for TwoFactorSettings {}

/// How many users' sessions ended.
#[derive(ToSchema)]
pub struct UsersSignedOut {
    pub users_signed_out: u32,
}

/// A session as the user, for at most an hour.
#[derive(ToSchema)]
pub struct LoginAsSession {
    pub session: SessionToken,
    pub impersonated_by: String,
}

/// A password reset: `{one_time_password}`, shown once, or (with
/// `"via": "email"`, 202) `{"status": "link_sent", expires_at}`.
#[derive(ToSchema)]
pub struct PasswordReset {
    #[schema(required = false)]
    pub one_time_password: Option<String>,
    #[schema(required = false)]
    pub status: Option<String>,
    #[schema(required = false, format = DateTime)]
    pub expires_at: Option<String>,
}

/// The Overview, now or `as_of` a moment.
#[derive(ToSchema)]
pub struct OverviewAnswer {
    #[schema(format = DateTime)]
    pub as_of: Option<String>,
    /// `active_users`, `enrolled`, `pending`, `not_started`, `enrollment_rate`,
    /// `locked`, `by_method`, `backup_codes`, `recent_enrollments`, `roles_without_2fa`.
    #[schema(value_type = Object)]
    pub overview: serde_json::Value,
}

/// The Overview's figures at the end of each day.
#[derive(ToSchema)]
pub struct DailyAnswer {
    #[schema(value_type = Vec<Object>)]
    pub days: serde_json::Value,
}

/// Per method and provider: sent, failed, fell back, latency.
#[derive(ToSchema)]
pub struct DeliveryAnswer {
    #[schema(value_type = Vec<Object>)]
    pub delivery: serde_json::Value,
}

/// One page of the user directory.
#[derive(ToSchema)]
pub struct DirectoryPage {
    #[schema(value_type = Vec<Object>)]
    pub users: serde_json::Value,
    /// The users matching: exact when `total_capped` is false. Counting
    /// stops past `directory_count_limit` (default 1,000): then
    /// `total_capped` is true and `total` is the least the total can be:
    /// one more than that limit or, on a page past it, one more than the
    /// rows up to this page's end. Either way a next page exists when
    /// `page * per_page < total`.
    pub total: u64,
    pub total_capped: bool,
    pub page: u32,
    pub per_page: u32,
}

/// A user's audit timeline.
#[derive(ToSchema)]
pub struct HistoryAnswer {
    #[schema(value_type = Vec<Object>)]
    pub entries: serde_json::Value,
}

/// A public key audit exports are signed with.
#[derive(ToSchema)]
pub struct AuditKey {
    pub key_id: String,
    /// `ed25519`.
    pub algorithm: String,
    /// Base64.
    pub public_key: String,
    pub current: bool,
}

/// The keys audit exports are signed with, old ones included.
#[derive(ToSchema)]
pub struct AuditKeys {
    pub keys: Vec<AuditKey>,
}

/// A signed checkpoint of a tenant's audit chain.
#[derive(ToSchema)]
pub struct AuditCheckpoint {
    pub tenant_id: String,
    /// The position of the entry the chain stood at.
    pub position: i64,
    /// Entries in the chain up to and including it.
    pub count: i64,
    /// The chain's hash there.
    pub head: String,
    #[schema(format = DateTime)]
    pub at: String,
    pub key_id: String,
    /// `ed25519`.
    pub algorithm: String,
    /// Base64.
    pub signature: String,
}

/// The signed checkpoints asked for.
#[derive(ToSchema)]
pub struct AuditCheckpoints {
    pub checkpoints: Vec<AuditCheckpoint>,
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::{document, TENANT_PREFIX};

    /// The README's API tables whose rows name endpoints.
    const TABLES: [&str; 4] = [
        "## HTTP API",
        "## Admin API",
        "## Self-service",
        "## Read models",
    ];

    /// `METHOD /path` with every `{placeholder}` written `{}`, so `{id}` and
    /// `{user}` name the same path.
    fn normalize(method: &str, path: &str) -> String {
        let mut out = String::new();
        let mut in_braces = false;
        for c in path.chars() {
            match c {
                '{' => {
                    in_braces = true;
                    out.push_str("{}");
                }
                '}' => in_braces = false,
                _ if !in_braces => out.push(c),
                _ => {}
            }
        }
        format!("{} {out}", method.to_uppercase())
    }

    /// Every `` `METHOD /path` `` in the first cell of a table row of the
    /// README's API sections (a query string or `[...]` after the path dropped).
    fn readme_endpoints(readme: &str) -> BTreeSet<String> {
        let mut endpoints = BTreeSet::new();
        let mut in_api = false;
        for line in readme.lines() {
            if line.starts_with("## ") {
                in_api = TABLES.iter().any(|t| line.starts_with(t));
                continue;
            }
            if !in_api || !line.starts_with("| `") {
                continue;
            }
            let first_cell = line.split(" | ").next().unwrap_or("");
            for span in first_cell.split('`').skip(1).step_by(2) {
                let Some((method, rest)) = span.split_once(' ') else {
                    continue;
                };
                if !["GET", "POST", "PUT", "PATCH", "DELETE"].contains(&method) {
                    continue;
                }
                let path = rest.split(['?', '[', ' ']).next().unwrap_or(rest);
                endpoints.insert(normalize(method, path));
            }
        }
        endpoints
    }

    fn document_endpoints() -> BTreeSet<String> {
        let doc = serde_json::to_value(document()).unwrap();
        let paths = doc["paths"].as_object().unwrap();
        let mut endpoints = BTreeSet::new();
        for (path, item) in paths {
            let short = path.strip_prefix(TENANT_PREFIX).unwrap();
            for method in item.as_object().unwrap().keys() {
                if method != "parameters" {
                    endpoints.insert(normalize(method, short));
                }
            }
        }
        endpoints
    }

    #[test]
    fn the_readme_tables_and_the_openapi_document_name_the_same_endpoints() {
        let readme = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md"));
        let readme = readme_endpoints(readme);
        let document = document_endpoints();
        assert!(readme.len() > 30, "too few README rows parsed: {readme:?}");
        let missing_in_doc: Vec<_> = readme.difference(&document).collect();
        let missing_in_readme: Vec<_> = document.difference(&readme).collect();
        assert!(
            missing_in_doc.is_empty() && missing_in_readme.is_empty(),
            "in the README but not in /openapi.json: {missing_in_doc:?}; \
             in /openapi.json but not in the README: {missing_in_readme:?}"
        );
    }

    #[test]
    fn the_document_is_openapi_3_1_and_every_operation_says_what_it_answers() {
        let doc = serde_json::to_value(document()).unwrap();
        assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"));
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (method, op) in item.as_object().unwrap() {
                let what = format!("{method} {path}");
                assert!(
                    !op["summary"].as_str().unwrap_or("").is_empty(),
                    "{what}: no summary"
                );
                let responses = op["responses"].as_object().unwrap();
                assert!(
                    responses.keys().any(|s| s.starts_with('2')),
                    "{what}: no success"
                );
                assert!(responses.contains_key("503"), "{what}: no 503");
                if op.get("security").is_some() {
                    assert!(
                        responses.contains_key("401"),
                        "{what}: needs a session, no 401"
                    );
                }
            }
        }
    }
}
