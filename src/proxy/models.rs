//! `GET /v1/models` with routes: the union of what every replica lists, merged and
//! deduplicated, each model kept only if its route reaches that replica (so the list is what
//! clients can ask for through the proxy).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use serde_json::Value;

use super::ProxyBody;
use crate::upstream::{Endpoint, Routes};

/// Largest `/v1/models` answer read from one replica.
const MAX_LIST: usize = 4 * 1024 * 1024;

/// The model entries `endpoint` lists, in its order; `None` when it did not answer with a list
/// within `limit`.
async fn listed(endpoint: Arc<Endpoint>, limit: Duration) -> Option<Vec<Value>> {
    let answer = tokio::time::timeout(limit, async {
        let response = endpoint.get("/v1/models").await.ok()?;
        if !response.status().is_success() {
            return None;
        }
        Limited::new(response.into_body(), MAX_LIST)
            .collect()
            .await
            .ok()
            .map(|b| b.to_bytes())
    })
    .await
    .ok()??;
    match serde_json::from_slice::<Value>(&answer)
        .ok()?
        .get_mut("data")?
        .take()
    {
        Value::Array(models) => Some(models),
        _ => None,
    }
}

/// Asks every replica for its models at once and answers their union: one entry per model id
/// (the first replica's, in configuration order), kept when the model's route has that
/// replica. 502 when no replica answered.
pub(super) async fn union(routes: &Routes, limit: Duration) -> (Response<ProxyBody>, bool) {
    let mut asks = tokio::task::JoinSet::new();
    for (i, endpoint) in routes.endpoints().iter().enumerate() {
        let endpoint = endpoint.clone();
        asks.spawn(async move { (i, listed(endpoint, limit).await) });
    }
    let mut lists: Vec<Option<Vec<Value>>> = vec![None; routes.endpoints().len()];
    while let Some(done) = asks.join_next().await {
        if let Ok((i, list)) = done {
            lists[i] = list;
        }
    }
    if lists.iter().all(Option::is_none) {
        return (
            super::error_response(
                StatusCode::BAD_GATEWAY,
                "upstream_connect_error",
                "no upstream answered GET /v1/models",
            ),
            false,
        );
    }
    let mut seen = std::collections::HashSet::new();
    let mut data = Vec::new();
    for (endpoint, list) in routes.endpoints().iter().zip(lists) {
        for model in list.into_iter().flatten() {
            let Some(id) = model.get("id").and_then(Value::as_str) else {
                continue;
            };
            let reachable = routes
                .route(Some(id))
                .is_some_and(|r| r.endpoints().iter().any(|e| Arc::ptr_eq(e, endpoint)));
            if reachable && seen.insert(id.to_owned()) {
                data.push(model);
            }
        }
    }
    let body = serde_json::json!({ "object": "list", "data": data });
    let mut response = Response::new(ProxyBody::Full {
        body: Full::new(Bytes::from(body.to_string())),
    });
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    (response, true)
}
