//! The admin console: Settings, Overview, User Management and Audit.

use axum::Router;

use crate::ApiState;

pub fn routes() -> Router<ApiState> {
    Router::new()
}
