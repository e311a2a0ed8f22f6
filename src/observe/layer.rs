//! Where observation of a request begins: the span and the recorder are opened together, from
//! the request as it arrived, before the proxy changes anything of it.

use std::sync::Arc;

use tokio::time::Instant;

use super::Recorder;
use crate::route::{Endpoint, RequestInfo};
use crate::telemetry::Telemetry;
use crate::telemetry::otel::{RequestStart, Tracer};

/// Opens the telemetry of each proxied request.
#[derive(Debug)]
pub struct Observer {
    telemetry: Arc<Telemetry>,
    tracer: Option<Arc<Tracer>>,
}

impl Observer {
    /// Observes into `telemetry`, and traces with `tracer` when tracing is on.
    pub fn new(telemetry: Arc<Telemetry>, tracer: Option<Arc<Tracer>>) -> Self {
        Observer { telemetry, tracer }
    }

    /// Starts observing a request that arrived at `t0` with the head `parts` (as the client
    /// sent it: an incoming `traceparent` is continued): opens its span when tracing is on, and
    /// its recorder, which counts it in flight until it is reported.
    pub fn start(
        &self,
        parts: &http::request::Parts,
        endpoint: Endpoint,
        info: &RequestInfo,
        request_id: Box<str>,
        t0: Instant,
    ) -> Recorder {
        // Read before the span opens, so that the span carries the label too.
        let tenant = (self.telemetry.tenants.as_ref()).map(|t| t.label(&parts.headers));
        let span = self.tracer.as_ref().map(|tracer| {
            tracer.start(&RequestStart {
                headers: &parts.headers,
                method: &parts.method,
                path: parts.uri.path(),
                endpoint,
                info,
                tenant: tenant.as_deref(),
                arrived: t0,
            })
        });
        let model = self.telemetry.models.label(info.model.as_deref());
        let route = self.telemetry.route(model, endpoint, tenant);
        Recorder::new(self.telemetry.clone(), route, request_id, t0, span)
    }
}
