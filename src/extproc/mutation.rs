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

use crate::inject::Plan;

fn set(key: &str, value: &[u8]) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue { key: key.to_owned(), raw_value: value.to_vec(), ..Default::default() }),
        append_action: HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
        ..Default::default()
    }
}

/// The header mutation that carries out `plan`.
pub fn header_mutation(plan: &Plan<'_>) -> HeaderMutation {
    let mut set_headers = Vec::with_capacity(2);
    if let Some((name, value)) = plan.set_header {
        set_headers.push(set(name, value));
    }
    if let Some(path) = &plan.path {
        set_headers.push(set(":path", path.as_bytes()));
    }
    HeaderMutation { set_headers, remove_headers: plan.remove.iter().map(|s| (*s).to_owned()).collect() }
}

/// Continue the request, applying `mutation` if any.
pub fn request_headers(mutation: Option<HeaderMutation>) -> ProcessingResponse {
    let response = mutation.map(|m| CommonResponse { header_mutation: Some(m), ..Default::default() });
    ProcessingResponse { response: Some(Response::RequestHeaders(HeadersResponse { response })), ..Default::default() }
}

pub fn response_headers() -> ProcessingResponse {
    ProcessingResponse { response: Some(Response::ResponseHeaders(HeadersResponse::default())), ..Default::default() }
}

pub fn request_body() -> ProcessingResponse {
    ProcessingResponse { response: Some(Response::RequestBody(BodyResponse::default())), ..Default::default() }
}

pub fn response_body() -> ProcessingResponse {
    ProcessingResponse { response: Some(Response::ResponseBody(BodyResponse::default())), ..Default::default() }
}

pub fn request_trailers() -> ProcessingResponse {
    ProcessingResponse { response: Some(Response::RequestTrailers(TrailersResponse::default())), ..Default::default() }
}

pub fn response_trailers() -> ProcessingResponse {
    ProcessingResponse { response: Some(Response::ResponseTrailers(TrailersResponse::default())), ..Default::default() }
}

/// End the request here with a JSON body; the upstream is never contacted.
pub fn immediate(status: u16, body: &serde_json::Value, details: &str) -> ProcessingResponse {
    let headers =
        HeaderMutation { set_headers: vec![set("content-type", b"application/json")], remove_headers: vec![] };
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
