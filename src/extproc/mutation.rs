//! The one builder of Envoy responses. Header values always go in `raw_value` (Envoy reads only
//! that), with `OVERWRITE_IF_EXISTS_OR_ADD`; the deprecated `append` stays unset.

use envoy_types::pb::envoy::config::core::v3::{
    header_value_option::HeaderAppendAction, HeaderValue, HeaderValueOption,
};
use envoy_types::pb::envoy::r#type::v3::HttpStatus;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    processing_response::Response, BodyResponse, CommonResponse, HeaderMutation, HeadersResponse, ImmediateResponse,
    ProcessingResponse, TrailersResponse,
};

use envoy_types::pb::envoy::extensions::filters::http::ext_proc::v3::processing_mode::{BodySendMode, HeaderSendMode};
use envoy_types::pb::envoy::extensions::filters::http::ext_proc::v3::ProcessingMode;

use crate::inject::Plan;

fn set(key: &str, value: &[u8]) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue { key: key.to_owned(), raw_value: value.to_vec(), ..Default::default() }),
        append_action: HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
        ..Default::default()
    }
}

/// The header mutation that carries out `plan`, plus `extra` headers keyswap itself sets
/// (the forwarded `traceparent`).
pub fn header_mutation(plan: &Plan<'_>, extra: &[(&str, &[u8])]) -> HeaderMutation {
    let mut set_headers = Vec::with_capacity(2 + extra.len() + plan.pinned.len());
    if let Some((name, value)) = plan.set_header {
        set_headers.push(set(name, value));
    }
    for (name, value) in plan.pinned {
        set_headers.push(set(name, value.as_bytes()));
    }
    for (name, value) in extra {
        set_headers.push(set(name, value));
    }
    if let Some(path) = &plan.path {
        set_headers.push(set(":path", path.as_bytes()));
    }
    // A header set here replaces every value the agent sent (OVERWRITE_IF_EXISTS_OR_ADD); removing
    // it too would depend on the order Envoy applies the two lists in.
    let remove_headers = plan
        .remove
        .iter()
        .filter(|r| !set_headers.iter().any(|s| s.header.as_ref().is_some_and(|h| h.key.eq_ignore_ascii_case(r))))
        .map(|s| (*s).to_owned())
        .collect();
    HeaderMutation { set_headers, remove_headers }
}

/// Continue the request, applying `mutation` if any, and asking Envoy for later phases as `mode` says.
pub fn request_headers(mutation: Option<HeaderMutation>, mode: Option<ProcessingMode>) -> ProcessingResponse {
    let response = mutation.map(|m| CommonResponse { header_mutation: Some(m), ..Default::default() });
    ProcessingResponse {
        response: Some(Response::RequestHeaders(HeadersResponse { response })),
        mode_override: mode,
        ..Default::default()
    }
}

/// Continue the response, applying `mutation` (secrets scrubbed) if any.
pub fn response_headers(mutation: Option<HeaderMutation>, mode: Option<ProcessingMode>) -> ProcessingResponse {
    let response = mutation.map(|m| CommonResponse { header_mutation: Some(m), ..Default::default() });
    ProcessingResponse {
        response: Some(Response::ResponseHeaders(HeadersResponse { response })),
        mode_override: mode,
        ..Default::default()
    }
}

pub use crate::envoy::RequestBody;

/// The phases a transaction needs after its request headers: response headers always (status,
/// content type; scrubbed of secrets), request trailers always (stripped of credentials: a
/// request without trailers costs no message), the request body as `request_body` says, and the
/// response body when `response_body` (STREAMED: SSE events flow as they come), with its
/// trailers (scrubbed, and the end of a body that ends with them). Trailers are asked for only
/// with the body: the stream is open until the response ends anyway, where without them Envoy
/// closes it after the response headers.
pub fn mode(request_body: RequestBody, response_body: bool) -> ProcessingMode {
    let request_body_mode = match request_body {
        RequestBody::None => BodySendMode::None,
        RequestBody::Capture => BodySendMode::BufferedPartial,
        RequestBody::Whole => BodySendMode::Buffered,
    };
    ProcessingMode {
        request_header_mode: HeaderSendMode::Send as i32,
        response_header_mode: HeaderSendMode::Send as i32,
        request_body_mode: request_body_mode as i32,
        response_body_mode: if response_body { BodySendMode::Streamed } else { BodySendMode::None } as i32,
        // Stripped of credentials like the headers; Envoy sends them only when there are some.
        request_trailer_mode: HeaderSendMode::Send as i32,
        response_trailer_mode: if response_body { HeaderSendMode::Send } else { HeaderSendMode::Skip } as i32,
    }
}

/// Sets `headers`: the first value of a name replaces every value it had, each later one of the
/// same name is added beside it (repeated headers stay repeated: `set-cookie` values joined with
/// `, ` are one cookie to a client).
pub fn set_headers(headers: &[(&str, &[u8])]) -> HeaderMutation {
    let set_headers = headers
        .iter()
        .enumerate()
        .map(|(i, (k, v))| {
            let mut h = set(k, v);
            if headers[..i].iter().any(|(earlier, _)| earlier.eq_ignore_ascii_case(k)) {
                // Envoy's ext_proc reads only the deprecated `append` (not `append_action`) to
                // tell adding a value from replacing them all; both say "add" here.
                h.append_action = HeaderAppendAction::AppendIfExistsOrAdd as i32;
                #[allow(deprecated)]
                {
                    h.append = Some(envoy_types::pb::google::protobuf::BoolValue { value: true });
                }
            }
            h
        })
        .collect();
    HeaderMutation { set_headers, remove_headers: vec![] }
}

/// Continue the request body, changing request headers (possible while Envoy still holds them:
/// BUFFERED bodies).
pub fn request_body_with(mutation: HeaderMutation) -> ProcessingResponse {
    ProcessingResponse {
        response: Some(Response::RequestBody(BodyResponse {
            response: Some(CommonResponse { header_mutation: Some(mutation), ..Default::default() }),
        })),
        ..Default::default()
    }
}

/// Asks Envoy to wait up to `timeout` for the answer to the current message (a token fetch).
pub fn extend_timeout(timeout: std::time::Duration) -> ProcessingResponse {
    ProcessingResponse {
        override_message_timeout: Some(envoy_types::pb::google::protobuf::Duration {
            seconds: timeout.as_secs() as i64,
            nanos: timeout.subsec_nanos() as i32,
        }),
        ..Default::default()
    }
}

pub fn request_body() -> ProcessingResponse {
    ProcessingResponse { response: Some(Response::RequestBody(BodyResponse::default())), ..Default::default() }
}

/// Continue the request with `body` in place of the one Envoy buffered, and its length (Envoy
/// requires a matching `content-length` for a BUFFERED body it replaces).
pub fn request_body_replaced(body: Vec<u8>) -> ProcessingResponse {
    use envoy_types::pb::envoy::service::ext_proc::v3::{body_mutation::Mutation, BodyMutation};
    let length = body.len().to_string();
    let header_mutation = set_headers(&[("content-length", length.as_bytes())]);
    let body_mutation = BodyMutation { mutation: Some(Mutation::Body(body)) };
    let response = CommonResponse {
        header_mutation: Some(header_mutation),
        body_mutation: Some(body_mutation),
        ..Default::default()
    };
    ProcessingResponse {
        response: Some(Response::RequestBody(BodyResponse { response: Some(response) })),
        ..Default::default()
    }
}

/// Continue the response with this chunk in place of the one Envoy sent (STREAMED mode).
pub fn response_body_with(body: Vec<u8>) -> ProcessingResponse {
    use envoy_types::pb::envoy::service::ext_proc::v3::{body_mutation::Mutation, BodyMutation};
    let mutation = BodyMutation { mutation: Some(Mutation::Body(body)) };
    ProcessingResponse {
        response: Some(Response::ResponseBody(BodyResponse {
            response: Some(CommonResponse { body_mutation: Some(mutation), ..Default::default() }),
        })),
        ..Default::default()
    }
}

pub fn response_body() -> ProcessingResponse {
    ProcessingResponse { response: Some(Response::ResponseBody(BodyResponse::default())), ..Default::default() }
}

/// Continue the request's trailers, removing `remove`.
pub fn request_trailers(remove: Vec<String>) -> ProcessingResponse {
    let header_mutation = (!remove.is_empty()).then(|| HeaderMutation { set_headers: vec![], remove_headers: remove });
    ProcessingResponse {
        response: Some(Response::RequestTrailers(TrailersResponse { header_mutation })),
        ..Default::default()
    }
}

/// Continue the response's trailers, applying `mutation` (secrets scrubbed) if any.
pub fn response_trailers(header_mutation: Option<HeaderMutation>) -> ProcessingResponse {
    let trailers = TrailersResponse { header_mutation };
    ProcessingResponse { response: Some(Response::ResponseTrailers(trailers)), ..Default::default() }
}

/// End the request here with a JSON body; the upstream is never contacted.
pub fn immediate(status: u16, body: &serde_json::Value, details: &str) -> ProcessingResponse {
    immediate_with(status, body, details, &[])
}

/// [`immediate`], with `extra` headers (`retry-after`).
pub fn immediate_with(
    status: u16,
    body: &serde_json::Value,
    details: &str,
    extra: &[(&str, &[u8])],
) -> ProcessingResponse {
    let mut set_headers = vec![set("content-type", b"application/json")];
    set_headers.extend(extra.iter().map(|(k, v)| set(k, v)));
    let headers = HeaderMutation { set_headers, remove_headers: vec![] };
    ProcessingResponse {
        response: Some(Response::ImmediateResponse(ImmediateResponse {
            status: Some(HttpStatus { code: i32::from(status) }),
            headers: Some(headers),
            body: serde_json::to_vec(body).unwrap_or_default(),
            grpc_status: None,
            details: details.to_owned(),
        })),
        ..Default::default()
    }
}
