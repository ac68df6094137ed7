//! Telemetry: what each request leaves behind once it is answered (the request log, a
//! Redis Stream), and the pod's load reported to the control plane. Traces and
//! labelled metrics come with the observability work. Nothing here may slow or fail a
//! request: every sink is fed without waiting.

pub mod load_report;
pub mod request_log;
pub mod route_metrics;
pub mod stats;
pub mod trace;

/// The trace id of a W3C `traceparent` header ("00-<trace id>-<span id>-<flags>"), if
/// it is well formed.
pub fn trace_id(traceparent: Option<&http::HeaderValue>) -> &str {
    let Some(v) = traceparent.and_then(|v| v.to_str().ok()) else { return "" };
    let mut parts = v.split('-');
    match (parts.next(), parts.next()) {
        (Some(version), Some(id))
            if version.len() == 2 && id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()) =>
        {
            id
        }
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trace_ids_come_from_well_formed_traceparents_only() {
        let ok = http::HeaderValue::from_static("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01");
        assert_eq!(trace_id(Some(&ok)), "0af7651916cd43dd8448eb211c80319c");
        assert_eq!(trace_id(Some(&http::HeaderValue::from_static("00-xyz-1-01"))), "");
        assert_eq!(trace_id(None), "");
    }
}
