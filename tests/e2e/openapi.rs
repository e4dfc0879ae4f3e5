//! The API's own description: `GET /openapi.json` (no auth) serves the
//! document generated from the handlers, and `GET /api` renders that same
//! document as a page, every operation on it, with the pages' strict CSP.

use reqwest::header::{CONTENT_SECURITY_POLICY, CONTENT_TYPE};
use reqwest::StatusCode;
use serde_json::Value;
use twofold_verifier::openapi::{document, TENANT_PREFIX};

use crate::helpers::spawn_app;

#[tokio::test]
async fn the_openapi_document_and_its_page_are_served_without_a_session() {
    let app = spawn_app().await;
    // `base` names the tenant's API; these live at the server's root.
    let root = app.base.split("/v1/").next().unwrap();

    let r = app
        .client
        .get(format!("{root}/openapi.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.headers()[CONTENT_TYPE]
        .to_str()
        .unwrap()
        .starts_with("application/json"));
    let served: Value = r.json().await.unwrap();
    assert!(served["openapi"].as_str().unwrap().starts_with("3.1"));
    assert_eq!(served, serde_json::to_value(document()).unwrap());
    let paths = served["paths"].as_object().unwrap();
    assert!(paths.contains_key("/v1/tenants/{tenant}/sign-in"));
    assert_eq!(
        served["components"]["schemas"]["ErrorBody"]["required"],
        serde_json::json!(["error"])
    );

    let r = app.client.get(format!("{root}/api")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let csp = r.headers()[CONTENT_SECURITY_POLICY].to_str().unwrap();
    assert!(csp.contains("default-src 'none'"), "{csp}");
    let page = r.text().await.unwrap();
    assert!(page.contains(r#"href="/openapi.json""#));
    for (path, item) in paths {
        let short = path.strip_prefix(TENANT_PREFIX).unwrap();
        for (method, op) in item.as_object().unwrap() {
            let shown = format!("{} {short}", method.to_uppercase());
            assert!(page.contains(&shown), "{shown} is not on the page");
            // As HTML writes it.
            let summary = op["summary"].as_str().unwrap().replace('"', "&quot;");
            assert!(page.contains(&summary), "{summary:?} is not on the page");
        }
    }
    assert!(
        page.contains("invalid_credentials"),
        "error codes are listed"
    );
    assert!(!page.contains("src=\"http") && !page.contains("href=\"http"));
}
