//! The ext_proc service driven as Envoy drives it: a tonic client sending ProcessingRequest
//! streams to a real gRPC server on loopback.

mod common;

use std::sync::Arc;

use arc_swap::ArcSwap;
use common::grpc::{self, immediate, mutation, set_value};
use common::*;
use keyswap::config::file::FileSource;
use keyswap::config::GatewaySelector;
use keyswap::extproc::server::{self, Bound};
use keyswap::extproc::Shared;
use keyswap::telemetry::Metrics;

type Server = InProcess;

async fn start() -> Server {
    start_in_process().await
}

fn req<'a>(host: &'a str, path: &'a str, extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    let mut v = vec![(":method", "POST"), (":scheme", "https"), (":authority", host), (":path", path)];
    v.extend_from_slice(extra);
    v
}

#[tokio::test]
async fn header_target_without_prefix_writes_the_raw_key() {
    let s = start().await;
    let mut c = grpc::connect(s.addr).await;
    let r = grpc::request(&mut c, &req("api.anthropic.com", "/v1/messages", &[("x-api-key", PLACEHOLDER)])).await;
    let m = mutation(&r);
    assert_eq!(set_value(&m, "x-api-key").as_deref(), Some(ANTHROPIC_KEY));
    assert!(m.remove_headers.is_empty(), "{m:?}");
    assert_eq!(Metrics::get(&s.shared.metrics.injections), 1);
    assert_eq!(Metrics::get(&s.shared.metrics.smuggle_attempts), 0);
}

#[tokio::test]
async fn header_target_with_prefix_and_mixed_case_name() {
    let s = start().await;
    let mut c = grpc::connect(s.addr).await;
    // The policy says `headerName: Authorization`; keyswap writes the lowercase name.
    let r = grpc::request(
        &mut c,
        &req("api.openai.com:443", "/v1/chat/completions", &[("Authorization", "Bearer keyswap-injected-by-proxy")]),
    )
    .await;
    let m = mutation(&r);
    assert_eq!(set_value(&m, "authorization").as_deref(), Some(format!("Bearer {OPENAI_KEY}").as_str()));
    assert!(m.remove_headers.is_empty(), "{m:?}");
}

#[tokio::test]
async fn openai_route_limited_to_its_endpoints_denies_others() {
    let s = start().await;
    let mut c = grpc::connect(s.addr).await;
    let r = grpc::request(&mut c, &req("api.openai.com", "/v2/other", &[])).await;
    assert_eq!(immediate(&r).status.as_ref().unwrap().code, 403);
}

#[tokio::test]
async fn query_target_replaces_the_parameter_and_keeps_the_others_in_order() {
    let s = start().await;
    let mut c = grpc::connect(s.addr).await;
    let path = "/v1beta/models/gemini-2.0-flash:streamGenerateContent?alt=sse&key=keyswap-injected-by-proxy&x=a%20b";
    let r = grpc::request(&mut c, &req("generativelanguage.googleapis.com", path, &[])).await;
    let new_path = set_value(&mutation(&r), ":path").expect(":path rewritten");
    assert_eq!(
        new_path,
        "/v1beta/models/gemini-2.0-flash:streamGenerateContent?alt=sse&key=AIza%2BREAL%2F0003%3Ddo%20not%20leak&x=a%20b"
    );
    let decoded = url_params(new_path.split_once('?').unwrap().1);
    assert_eq!(
        decoded,
        vec![("alt".into(), "sse".into()), ("key".into(), GEMINI_KEY.into()), ("x".into(), "a b".into())]
    );
}

#[tokio::test]
async fn query_target_appends_when_absent_and_removes_every_smuggled_copy() {
    let s = start().await;
    let mut c = grpc::connect(s.addr).await;
    let r = grpc::request(&mut c, &req("generativelanguage.googleapis.com", "/v1beta/models", &[])).await;
    let p = set_value(&mutation(&r), ":path").unwrap();
    assert_eq!(url_params(p.split_once('?').unwrap().1), vec![("key".into(), GEMINI_KEY.into())]);

    let smuggled = format!("/v1beta/models?key={STOLEN}&a=1&%6Bey={STOLEN}&KEY=x");
    let r = grpc::request(
        &mut c,
        &req("generativelanguage.googleapis.com", &smuggled, &[("x-goog-api-key", STOLEN), ("X-Goog-Api-Key", STOLEN)]),
    )
    .await;
    let m = mutation(&r);
    let p = set_value(&m, ":path").unwrap();
    assert_eq!(
        url_params(p.split_once('?').unwrap().1),
        vec![("key".into(), GEMINI_KEY.into()), ("a".into(), "1".into())]
    );
    assert_eq!(m.remove_headers, vec!["x-goog-api-key".to_owned()], "header copies go too");
    assert_eq!(Metrics::get(&s.shared.metrics.smuggle_attempts), 1, "one request, counted once");
}

#[tokio::test]
async fn smuggled_credentials_are_stripped_in_any_case_and_counted() {
    let s = start().await;
    let mut c = grpc::connect(s.addr).await;
    let cases: &[&[(&str, &str)]] = &[
        &[("X-Api-Key", STOLEN)],
        &[("x-api-key", PLACEHOLDER), ("x-api-key", STOLEN)],
        &[("x-api-key", PLACEHOLDER), ("authorization", "Bearer sk-stolen-by-agent-9999")],
        &[("x-api-key", PLACEHOLDER), ("proxy-authorization", "Basic c3RvbGVu")],
        &[
            ("Anthropic-Api-Key", STOLEN),
            ("api-key", STOLEN),
            ("openai-api-key", STOLEN),
            ("x-amz-security-token", STOLEN),
        ],
    ];
    for (i, extra) in cases.iter().enumerate() {
        let r = grpc::request(&mut c, &req("api.anthropic.com", "/v1/messages", extra)).await;
        let m = mutation(&r);
        assert_eq!(set_value(&m, "x-api-key").as_deref(), Some(ANTHROPIC_KEY), "case {i}");
        for (name, _) in extra.iter() {
            let lower = name.to_ascii_lowercase();
            if lower != "x-api-key" {
                assert!(m.remove_headers.contains(&lower), "case {i}: {lower} not removed: {m:?}");
            }
        }
        assert!(m.remove_headers.iter().all(|h| h.chars().all(|c| !c.is_ascii_uppercase())));
        assert_eq!(Metrics::get(&s.shared.metrics.smuggle_attempts), i as u64 + 1, "case {i} counted");
    }
}

#[tokio::test]
async fn anthropic_sdk_bearer_placeholder_is_stripped_but_not_counted_as_smuggling() {
    let s = start().await;
    let mut c = grpc::connect(s.addr).await;
    let r = grpc::request(
        &mut c,
        &req("api.anthropic.com", "/v1/messages", &[("authorization", "Bearer keyswap-injected-by-proxy")]),
    )
    .await;
    let m = mutation(&r);
    assert_eq!(set_value(&m, "x-api-key").as_deref(), Some(ANTHROPIC_KEY));
    assert_eq!(m.remove_headers, vec!["authorization".to_owned()]);
    assert_eq!(Metrics::get(&s.shared.metrics.smuggle_attempts), 0);
}

#[tokio::test]
async fn missing_secret_fails_closed_with_503_naming_route_and_policy() {
    let s = start().await;
    let mut c = grpc::connect(s.addr).await;
    let r = grpc::request(&mut c, &req("missing-secret.test", "/v1/x", &[("x-api-key", PLACEHOLDER)])).await;
    let i = immediate(&r);
    assert_eq!(i.status.as_ref().unwrap().code, 503);
    let body: serde_json::Value = serde_json::from_slice(&i.body).unwrap();
    assert_eq!(body["error"]["type"], "credential_unavailable");
    assert_eq!(body["error"]["route"], "default/no-secret");
    assert_eq!(body["error"]["policy"], "default/no-secret-key");
    assert_eq!(body["error"]["reason"], "SecretNotFound");
    assert_eq!(Metrics::get(&s.shared.metrics.denied_credential_unavailable), 1);
}

#[tokio::test]
async fn missing_key_in_secret_fails_closed_with_503() {
    let s = start().await;
    let mut c = grpc::connect(s.addr).await;
    let r = grpc::request(&mut c, &req("missing-key.test", "/", &[])).await;
    let i = immediate(&r);
    assert_eq!(i.status.as_ref().unwrap().code, 503);
    let body: serde_json::Value = serde_json::from_slice(&i.body).unwrap();
    assert_eq!(body["error"]["reason"], "KeyNotFound");
    assert_eq!(body["error"]["policy"], "default/no-key-key");
    assert!(!String::from_utf8_lossy(&i.body).contains(ANTHROPIC_KEY));
}

#[tokio::test]
async fn deny_all_gateway_answers_403_to_unmatched_and_passes_allow_listed_hosts() {
    let s = start().await;
    let mut c = grpc::connect(s.addr).await;
    let r = grpc::request(&mut c, &req("evil.example.com", "/exfil?key=x", &[("x-api-key", PLACEHOLDER)])).await;
    let i = immediate(&r);
    assert_eq!(i.status.as_ref().unwrap().code, 403);
    let body: serde_json::Value = serde_json::from_slice(&i.body).unwrap();
    assert_eq!(body["error"]["type"], "egress_denied");
    assert_eq!(body["error"]["gateway"], "default/egress");

    let r = grpc::request(&mut c, &req("allowed.example.com", "/", &[("x-api-key", "agent-own")])).await;
    assert_eq!(mutation(&r), Default::default(), "allow-listed traffic passes untouched");
    assert_eq!(Metrics::get(&s.shared.metrics.denied_no_route), 1);
}

#[tokio::test]
async fn later_phases_get_matching_continue_answers() {
    let s = start().await;
    let mut c = grpc::connect(s.addr).await;
    let answers = grpc::exchange(
        &mut c,
        vec![
            grpc::headers(&req("api.anthropic.com", "/v1/messages", &[])),
            grpc::body(b"{}"),
            grpc::response_headers(&[(":status", "200")]),
        ],
    )
    .await;
    use envoy_types::pb::envoy::service::ext_proc::v3::processing_response::Response;
    let kinds: Vec<_> = answers
        .into_iter()
        .map(|a| match a.unwrap().response.unwrap() {
            Response::RequestHeaders(_) => "request_headers",
            Response::RequestBody(_) => "request_body",
            Response::ResponseHeaders(_) => "response_headers",
            _ => "other",
        })
        .collect();
    assert_eq!(kinds, ["request_headers", "request_body", "response_headers"]);
}

#[tokio::test]
async fn malformed_messages_end_the_stream_with_an_error_and_the_server_keeps_serving() {
    let s = start().await;
    let mut c = grpc::connect(s.addr).await;

    let no_oneof = grpc::exchange(&mut c, vec![Default::default()]).await;
    let status = no_oneof.last().unwrap().as_ref().unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");

    let body_first = grpc::exchange(&mut c, vec![grpc::body(b"{}"), grpc::headers(&[])]).await;
    assert_eq!(body_first.len(), 1, "nothing after the error: {body_first:?}");
    assert_eq!(body_first[0].as_ref().unwrap_err().code(), tonic::Code::FailedPrecondition);

    let twice = grpc::exchange(&mut c, vec![grpc::headers(&[]), grpc::headers(&[])]).await;
    assert!(twice[0].is_ok() && twice[1].is_err(), "{twice:?}");

    // Garbage bytes where a protobuf should be: a raw HTTP/2 gRPC call with an undecodable frame.
    let mut raw = tonic::client::Grpc::new(
        tonic::transport::Channel::from_shared(format!("http://{}", s.addr)).unwrap().connect().await.unwrap(),
    );
    raw.ready().await.unwrap();
    let garbage = tokio_stream::iter(vec![bytes::Bytes::from_static(&[0xff, 0xff, 0xff, 0x07, 0x00, 0x01])]);
    let path = http::uri::PathAndQuery::from_static("/envoy.service.ext_proc.v3.ExternalProcessor/Process");
    let res = raw.streaming(tonic::Request::new(garbage), path, RawCodec).await;
    match res {
        Ok(resp) => {
            let mut st = resp.into_inner();
            use tokio_stream::StreamExt;
            let first = st.next().await;
            assert!(matches!(first, None | Some(Err(_))), "garbage must not be answered: {first:?}");
        }
        Err(status) => assert_ne!(status.code(), tonic::Code::Ok),
    }

    // The server is still there, on the same connection and on a new one.
    let r = grpc::request(&mut c, &req("api.anthropic.com", "/v1/messages", &[])).await;
    assert_eq!(set_value(&mutation(&r), "x-api-key").as_deref(), Some(ANTHROPIC_KEY));
    let mut c2 = grpc::connect(s.addr).await;
    let r = grpc::request(&mut c2, &req("api.anthropic.com", "/v1/messages", &[])).await;
    assert_eq!(set_value(&mutation(&r), "x-api-key").as_deref(), Some(ANTHROPIC_KEY));
    assert!(Metrics::get(&s.shared.metrics.protocol_errors) >= 3);
}

/// Sends raw bytes as the gRPC message payload, receives raw bytes.
#[derive(Clone, Copy, Default)]
struct RawCodec;

impl tonic::codec::Codec for RawCodec {
    type Encode = bytes::Bytes;
    type Decode = bytes::Bytes;
    type Encoder = RawCodec;
    type Decoder = RawCodec;
    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }
    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl tonic::codec::Encoder for RawCodec {
    type Item = bytes::Bytes;
    type Error = tonic::Status;
    fn encode(&mut self, item: Self::Item, dst: &mut tonic::codec::EncodeBuf<'_>) -> Result<(), Self::Error> {
        use bytes::BufMut;
        dst.put_slice(&item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawCodec {
    type Item = bytes::Bytes;
    type Error = tonic::Status;
    fn decode(&mut self, src: &mut tonic::codec::DecodeBuf<'_>) -> Result<Option<Self::Item>, Self::Error> {
        use bytes::Buf;
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

/// keyswap's service on loopback over the configuration in `dir`, until the sender is used.
async fn serve_until_stopped(
    dir: &tempfile::TempDir,
) -> (std::net::SocketAddr, tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<anyhow::Result<()>>, Arc<Shared>)
{
    let snapshot = FileSource::new(dir.path(), vec![]).snapshot(&GatewaySelector::Only).unwrap();
    let shared = Arc::new(Shared::new(Arc::new(ArcSwap::from_pointee(snapshot)), Arc::default()));
    let bound = Bound::tcp("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let Bound::Tcp(l) = &bound else { unreachable!() };
    let addr = l.local_addr().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(server::run(shared.clone(), vec![bound], None, async {
        let _ = stop_rx.await;
    }));
    (addr, stop_tx, server, shared)
}

#[tokio::test]
async fn health_reports_serving_and_shutdown_lets_in_flight_streams_finish() {
    let dir = config_dir();
    let (addr, stop_tx, server, _) = serve_until_stopped(&dir).await;

    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let service = "envoy.service.ext_proc.v3.ExternalProcessor";
    let st = health.check(tonic_health::pb::HealthCheckRequest { service: service.into() }).await.unwrap();
    assert_eq!(st.into_inner().status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32);

    // A stream in flight: request headers answered, response headers still to come.
    let mut c =
        envoy_types::pb::envoy::service::ext_proc::v3::external_processor_client::ExternalProcessorClient::new(channel);
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(grpc::headers(&req("api.anthropic.com", "/v1/messages", &[]))).await.unwrap();
    let mut answers = c.process(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap().into_inner();
    use tokio_stream::StreamExt;
    let first = answers.next().await.unwrap().unwrap();
    assert_eq!(set_value(&mutation(&first), "x-api-key").as_deref(), Some(ANTHROPIC_KEY));

    stop_tx.send(()).unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert!(!server.is_finished(), "the server waits for the open stream");
    tx.send(grpc::response_headers(&[(":status", "200")])).await.unwrap();
    let second = answers.next().await.unwrap();
    assert!(second.is_ok(), "in-flight stream answered after shutdown began: {second:?}");
    drop(tx);
    assert!(answers.next().await.is_none());
    let res =
        tokio::time::timeout(std::time::Duration::from_secs(5), server).await.expect("server stops after the drain");
    res.unwrap().unwrap();
}

/// A SigV4 route whose host pattern names no region, and a policy that sets none: the request
/// cannot be signed, so it is refused (never forwarded unsigned) with a reason the operator can act on.
#[tokio::test]
async fn sigv4_without_a_region_fails_closed_and_says_the_region_is_unknown() {
    let manifests = bedrock_sigv4("bedrock-anywhere", "*.bedrock.test");
    let s = common::start_in_process_with(&[("bedrock.yaml", &manifests)]).await;
    let mut c = grpc::connect(s.addr).await;
    let head = req("runtime.bedrock.test", "/model/m/converse", &[("content-type", "application/json")]);
    let answers = grpc::exchange(&mut c, vec![grpc::headers(&head), grpc::body(b"{}")]).await;
    let last = answers.last().unwrap().as_ref().expect("an answer");
    let i = immediate(last);
    assert_eq!(i.status.as_ref().unwrap().code, 503);
    let body: serde_json::Value = serde_json::from_slice(&i.body).unwrap();
    assert_eq!(body["error"]["reason"], "RegionUnknown", "{body}");
    assert!(!String::from_utf8_lossy(&i.body).contains("wJalr"));
    assert_eq!(Metrics::get(&s.shared.metrics.denied_credential_unavailable), 1);
}

/// A request a token budget reserved for and keyswap then refused itself (here: it cannot be
/// signed) was never forwarded: it releases what it reserved. Before, each such 503 was charged
/// its whole reservation, and an outage of signing filled every budget on the route.
#[tokio::test]
async fn a_request_keyswap_refuses_after_reserving_releases_everything() {
    let budget = "---\napiVersion: keyswap.dev/v1alpha1\nkind: TokenBudget\nmetadata: {name: small}\nspec:\n  parentRefs: [{name: bedrock-anywhere}]\n  key: Gateway\n  window: Day\n  limits: {totalTokens: 300}\n";
    let manifests = bedrock_sigv4("bedrock-anywhere", "*.bedrock.test") + budget;
    let s = common::start_in_process_with(&[("bedrock.yaml", &manifests)]).await;
    let head = req("runtime.bedrock.test", "/model/m/converse", &[("content-type", "application/json")]);
    let body = br#"{"messages":[{"role":"user","content":[{"text":"hi"}]}],"inferenceConfig":{"maxTokens":100}}"#;
    for attempt in 1..=3 {
        let mut c = grpc::connect(s.addr).await;
        let answers = grpc::exchange(&mut c, vec![grpc::headers(&head), grpc::body(body)]).await;
        let i = immediate(answers.last().unwrap().as_ref().expect("an answer"));
        let reason: serde_json::Value = serde_json::from_slice(&i.body).unwrap();
        // A reservation kept would leave no room for the second: 429 `budget_exhausted`.
        assert_eq!(
            (i.status.as_ref().unwrap().code, reason["error"]["reason"].as_str()),
            (503, Some("RegionUnknown")),
            "attempt {attempt}: {reason}"
        );
    }
}

/// The attack: on a Bedrock route, call InvokeModel on a model whose own answer format keyswap
/// does not read (Llama's `generation_token_count`), so that the call is charged only its
/// reservation. Bedrock reports every InvokeModel's counts in response headers: settled by them.
#[tokio::test]
async fn a_bedrock_invoke_answer_is_settled_by_the_counts_bedrock_reports_in_its_headers() {
    let host = "bedrock-runtime.us-east-1.amazonaws.com";
    let budget = "---\napiVersion: keyswap.dev/v1alpha1\nkind: TokenBudget\nmetadata: {name: small}\nspec:\n  parentRefs: [{name: bedrock}]\n  key: Gateway\n  window: Day\n  limits: {totalTokens: 1000}\n";
    let s = common::start_in_process_with(&[("bedrock.yaml", &(bedrock_sigv4("bedrock", host) + budget))]).await;
    let head = req(host, "/model/meta.llama3-70b-instruct-v1:0/invoke", &[("content-type", "application/json")]);
    let body = br#"{"prompt":"hi","max_gen_len":100}"#;
    let answer = br#"{"generation":"...","prompt_token_count":10,"generation_token_count":900,"stop_reason":"stop"}"#;
    let counts = [
        (":status", "200"),
        ("content-type", "application/json"),
        ("x-amzn-bedrock-input-token-count", "10"),
        ("x-amzn-bedrock-output-token-count", "900"),
    ];
    // 910 of 1,000 used: the next reservation does not fit (charged its reservation, ~200, it would).
    assert_eq!(used_after_one_call(s.addr, &head, body, &counts, answer).await, 910);
}

/// One budgeted call answered with `response` and `answer`, then the same request again: it must
/// be refused (429); returns the `used` its refusal reports.
async fn used_after_one_call(
    addr: std::net::SocketAddr,
    head: &[(&str, &str)],
    body: &[u8],
    response: &[(&str, &str)],
    answer: &[u8],
) -> u64 {
    let mut c = grpc::connect(addr).await;
    let msgs = vec![grpc::headers(head), grpc::body(body), grpc::response_headers(response), response_body(answer)];
    let answers = grpc::exchange(&mut c, msgs).await;
    assert!(answers.len() == 4 && answers.iter().all(|a| a.is_ok()), "{answers:?}");
    let mut c = grpc::connect(addr).await;
    let answers = grpc::exchange(&mut c, vec![grpc::headers(head), grpc::body(body)]).await;
    let i = immediate(answers.last().unwrap().as_ref().expect("an answer"));
    let reason: serde_json::Value = serde_json::from_slice(&i.body).unwrap();
    assert_eq!(i.status.as_ref().unwrap().code, 429, "{reason}");
    reason["error"]["used"].as_u64().unwrap_or_else(|| panic!("{reason}"))
}

/// The attack: name a weighted model by an alias the provider resolves, to be charged at weight
/// 1. The response names the model that answered, and the call is settled at its weight.
#[tokio::test]
async fn a_model_alias_is_settled_at_the_weight_of_the_model_that_answered() {
    let budget = "apiVersion: keyswap.dev/v1alpha1\nkind: TokenBudget\nmetadata: {name: weighted}\nspec:\n  parentRefs: [{name: anthropic}]\n  key: Gateway\n  window: Day\n  limits: {totalTokens: 600}\n  modelWeights: [{model: \"claude-opus-4*\", weight: 10}]\n";
    let s = common::start_in_process_with(&[("budget.yaml", budget)]).await;
    let json = [("content-type", "application/json"), ("x-api-key", PLACEHOLDER)];
    let head = req("api.anthropic.com", "/v1/messages", &json);
    let body = br#"{"model":"claude-latest","max_tokens":60,"messages":[]}"#;
    let answer = br#"{"model":"claude-opus-4-1","usage":{"input_tokens":5,"output_tokens":50}}"#;
    let ok = [(":status", "200"), ("content-type", "application/json")];
    // 550 of 600 used at weight 10 (55 at weight 1, which would leave room for the next).
    assert_eq!(used_after_one_call(s.addr, &head, body, &ok, answer).await, 550);
}

/// An observing stream naming parked state keyswap never handed out (a forged or stale number,
/// a number of the wrong type, no number at all) claims nothing, gets no answer, and breaks
/// nothing: no protocol error, no counted response, the server keeps serving.
#[tokio::test]
async fn an_observing_stream_naming_a_number_never_handed_out_claims_nothing() {
    use envoy_types::pb::envoy::config::core::v3::Metadata;
    use envoy_types::pb::envoy::service::ext_proc::v3::{processing_request::Request, HttpBody, ProcessingRequest};
    use envoy_types::pb::google::protobuf::{value::Kind, Struct, Value};
    use tokio_stream::StreamExt;

    let s = start().await;
    let mut c = grpc::connect(s.addr).await;
    let chunk = |tx: Option<Kind>, end: bool| {
        let fields = tx.map(|k| ("tx".to_owned(), Value { kind: Some(k) })).into_iter().collect();
        ProcessingRequest {
            request: Some(Request::ResponseBody(HttpBody {
                body: br#"{"usage":{"input_tokens":5,"output_tokens":7}}"#.to_vec(),
                end_of_stream: end,
                ..Default::default()
            })),
            metadata_context: Some(Metadata {
                filter_metadata: [(keyswap::vocab::METADATA_NAMESPACE.to_owned(), Struct { fields })]
                    .into_iter()
                    .collect(),
                ..Default::default()
            }),
            observability_mode: true,
            ..Default::default()
        }
    };
    let forged = [
        vec![chunk(Some(Kind::StringValue("987654321".into())), false), chunk(None, true)],
        vec![chunk(Some(Kind::NumberValue(1.0)), true)],
        vec![chunk(Some(Kind::StringValue("-1; DROP".into())), true)],
        vec![chunk(None, true)],
        vec![grpc::headers(&[(":authority", "api.anthropic.com")]), chunk(Some(Kind::StringValue("1".into())), true)],
    ];
    for msgs in forged {
        let mut req = tonic::Request::new(tokio_stream::iter(msgs));
        req.metadata_mut().insert(keyswap::vocab::ROLE_METADATA, keyswap::vocab::ROLE_OBSERVE.parse().unwrap());
        let answers: Vec<_> = c.process(req).await.expect("stream accepted").into_inner().collect().await;
        assert!(answers.is_empty(), "an observing stream is never answered: {answers:?}");
    }
    let m = &s.shared.metrics;
    assert_eq!(Metrics::get(&m.protocol_errors), 0);
    assert_eq!(Metrics::get(&m.observed_ended) + Metrics::get(&m.observed_cut_off), 0);

    // Bytes that are no protobuf, on an observing stream: ended, counted, never answered.
    let mut raw = tonic::client::Grpc::new(
        tonic::transport::Channel::from_shared(format!("http://{}", s.addr)).unwrap().connect().await.unwrap(),
    );
    raw.ready().await.unwrap();
    let garbage = tokio_stream::iter(vec![bytes::Bytes::from_static(&[0xff, 0xff, 0xff, 0x07, 0x00, 0x01])]);
    let mut request = tonic::Request::new(garbage);
    request.metadata_mut().insert(keyswap::vocab::ROLE_METADATA, keyswap::vocab::ROLE_OBSERVE.parse().unwrap());
    let path = http::uri::PathAndQuery::from_static("/envoy.service.ext_proc.v3.ExternalProcessor/Process");
    if let Ok(resp) = raw.streaming(request, path, RawCodec).await {
        let answers: Vec<_> = resp.into_inner().collect().await;
        assert!(answers.iter().all(|a| a.is_err()), "garbage was answered: {answers:?}");
    }
    assert_eq!(Metrics::get(&m.protocol_errors), 1, "the undecodable message is counted");

    let r = grpc::request(&mut c, &req("api.anthropic.com", "/v1/messages", &[])).await;
    assert_eq!(set_value(&mutation(&r), "x-api-key").as_deref(), Some(ANTHROPIC_KEY));
}

/// keyswap's gRPC service in-process over the standard configuration plus `files`, tracing on:
/// each span, encoded, arrives on the receiver as the exporter would get it.
async fn traced_in_process(
    files: &[(&str, &str)],
) -> (tempfile::TempDir, std::net::SocketAddr, tokio::sync::mpsc::Receiver<Vec<u8>>) {
    let dir = config_dir();
    for (name, text) in files {
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    let snapshot = FileSource::new(dir.path(), vec![]).snapshot(&GatewaySelector::Only).unwrap();
    let (spans_tx, spans) = tokio::sync::mpsc::channel(8);
    let metrics: Arc<Metrics> = Arc::default();
    let shared = Arc::new(Shared {
        sink: keyswap::telemetry::Sink::new(metrics.clone(), Some(spans_tx)),
        ..Shared::new(Arc::new(ArcSwap::from_pointee(snapshot)), metrics)
    });
    let bound = Bound::tcp("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let Bound::Tcp(l) = &bound else { unreachable!() };
    let addr = l.local_addr().unwrap();
    tokio::spawn(server::run(shared, vec![bound], None, std::future::pending()));
    (dir, addr, spans)
}

/// The answer that ends a transaction does not wait for its span: the span ends at that answer,
/// and is encoded and handed to the exporter once Envoy closes the stream.
#[tokio::test]
async fn a_span_ends_at_the_last_answer_and_is_encoded_after_it_went_out() {
    use envoy_types::pb::envoy::service::ext_proc::v3::processing_request::Request;
    use opentelemetry_proto::tonic::trace::v1::Span;
    use prost::Message as _;
    use std::time::{Duration, SystemTime, UNIX_EPOCH};
    use tokio_stream::StreamExt;

    let (_dir, addr, mut spans) = traced_in_process(&[]).await;

    let mut c = grpc::connect(addr).await;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(grpc::headers(&req("api.anthropic.com", "/v1/messages", &[]))).await.unwrap();
    let mut answers = c.process(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap().into_inner();
    answers.next().await.unwrap().unwrap();
    // Response headers that end the response: the transaction's last answer.
    let mut last = grpc::response_headers(&[(":status", "200"), ("content-type", "application/json")]);
    let Some(Request::ResponseHeaders(h)) = &mut last.request else { unreachable!() };
    h.end_of_stream = true;
    tx.send(last).await.unwrap();
    answers.next().await.unwrap().unwrap();
    let nanos = |t: SystemTime| t.duration_since(UNIX_EPOCH).unwrap().as_nanos() as u64;
    let answered = nanos(SystemTime::now());

    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(spans.try_recv().is_err(), "the span was encoded before the stream closed");
    let closed = nanos(SystemTime::now());
    drop(tx);
    assert!(answers.next().await.is_none());
    let encoded = tokio::time::timeout(Duration::from_secs(5), spans.recv()).await.expect("span after close").unwrap();
    let span = Span::decode(&encoded[..]).unwrap();
    assert!(span.end_time_unix_nano <= answered, "the span ends at the last answer, not when the stream closed");
    assert!(span.end_time_unix_nano + 250_000_000 < closed);
    assert!(span.start_time_unix_nano <= span.end_time_unix_nano);
}

// === routes with fixed phases (the body-streaming deciding filter) ===

/// The first message of a stream of the body-streaming deciding filter: Envoy names the route's
/// fixed request body mode and the flag in `protocol_config`.
fn fixed(
    mut first: envoy_types::pb::envoy::service::ext_proc::v3::ProcessingRequest,
    request_body: envoy_types::pb::envoy::extensions::filters::http::ext_proc::v3::processing_mode::BodySendMode,
) -> envoy_types::pb::envoy::service::ext_proc::v3::ProcessingRequest {
    use envoy_types::pb::envoy::extensions::filters::http::ext_proc::v3::processing_mode::BodySendMode;
    first.protocol_config = Some(envoy_types::pb::envoy::service::ext_proc::v3::ProtocolConfiguration {
        request_body_mode: request_body as i32,
        response_body_mode: BodySendMode::Streamed as i32,
        send_body_without_waiting_for_header_response: true,
    });
    first
}

fn response_body(bytes: &[u8]) -> envoy_types::pb::envoy::service::ext_proc::v3::ProcessingRequest {
    use envoy_types::pb::envoy::service::ext_proc::v3::processing_request::Request;
    use envoy_types::pb::envoy::service::ext_proc::v3::{HttpBody, ProcessingRequest};
    ProcessingRequest {
        request: Some(Request::ResponseBody(HttpBody {
            body: bytes.to_vec(),
            end_of_stream: true,
            ..Default::default()
        })),
        ..Default::default()
    }
}

/// Each answer keyswap makes itself because a route's phases cannot deliver the body a budget
/// needs is a span with its status and its reason: before, these spans had neither (the answer
/// ended the transaction before the reason was read from it), and read like requests that went
/// on.
#[tokio::test]
async fn refusals_for_a_body_the_phases_cannot_deliver_are_spans_with_status_and_reason() {
    use envoy_types::pb::envoy::extensions::filters::http::ext_proc::v3::processing_mode::BodySendMode;
    use envoy_types::pb::envoy::service::ext_proc::v3::processing_request::Request;
    use envoy_types::pb::envoy::service::ext_proc::v3::HttpTrailers;
    use opentelemetry_proto::tonic::trace::v1::Span;
    use prost::Message as _;

    let (_dir, addr, mut spans) = traced_in_process(&[("more.yaml", &budget_and_sigv4())]).await;

    let head =
        req("api.anthropic.com", "/v1/messages", &[("content-type", "application/json"), ("x-api-key", PLACEHOLDER)]);
    let body = br#"{"model":"claude-x","max_tokens":10,"messages":[]}"#;
    let mut partial = grpc::body(body);
    if let Some(Request::RequestBody(b)) = partial.request.as_mut() {
        b.end_of_stream = false;
    }
    let trailers = envoy_types::pb::envoy::service::ext_proc::v3::ProcessingRequest {
        request: Some(Request::RequestTrailers(HttpTrailers::default())),
        ..Default::default()
    };
    let cases = [
        ("phases_mismatch", 503, BodySendMode::None, grpc::body(body)),
        ("request_too_large", 413, BodySendMode::BufferedPartial, partial),
        ("body_required", 400, BodySendMode::BufferedPartial, trailers),
    ];
    for (reason, status, mode, second) in cases {
        let mut c = grpc::connect(addr).await;
        let answers = grpc::exchange(&mut c, vec![fixed(grpc::headers(&head), mode), second]).await;
        use envoy_types::pb::envoy::service::ext_proc::v3::processing_response::Response;
        let refusal = answers
            .iter()
            .find(|a| matches!(a.as_ref().map(|r| &r.response), Ok(Some(Response::ImmediateResponse(_)))))
            .unwrap_or_else(|| panic!("{reason}: no immediate answer in {answers:?}"));
        assert_eq!(immediate(refusal.as_ref().unwrap()).status.as_ref().unwrap().code, status, "{reason}");
        let encoded = tokio::time::timeout(std::time::Duration::from_secs(5), spans.recv())
            .await
            .unwrap_or_else(|_| panic!("{reason}: no span"))
            .unwrap();
        let span = Span::decode(&encoded[..]).unwrap();
        assert_eq!(otlp::i(&span.attributes, "http.response.status_code"), Some(i64::from(status)), "{reason}");
        assert_eq!(otlp::s(&span.attributes, "error.type").as_deref(), Some(reason), "{span:?}");
    }
}

/// The attack (a variant of the trailers one): on a route that reads the body whole and asks
/// Envoy for it per request (BUFFERED), a body that ends with HTTP/2 trailers. Envoy then sends
/// the body without `end_of_stream`; keyswap failed the gRPC stream (the agent got 500, the log a
/// protocol error) where the same request on fixed phases got 413. Now both are 413, and the
/// stream stays usable for the answer.
#[tokio::test]
async fn a_body_that_ends_with_trailers_where_sigv4_or_a_budget_reads_it_whole_is_413_on_every_filter() {
    use envoy_types::pb::envoy::service::ext_proc::v3::processing_request::Request;
    use envoy_types::pb::envoy::service::ext_proc::v3::processing_response::Response;
    let (s, requests, body) = budgeted_and_signed().await;
    for (what, head) in &requests {
        let mut partial = grpc::body(body);
        if let Some(Request::RequestBody(b)) = partial.request.as_mut() {
            b.end_of_stream = false;
        }
        let mut c = grpc::connect(s.addr).await;
        let answers = grpc::exchange(&mut c, vec![grpc::headers(head), partial]).await;
        let refusal = answers
            .iter()
            .find_map(|a| match a.as_ref().map(|r| &r.response) {
                Ok(Some(Response::ImmediateResponse(i))) => Some(i.clone()),
                _ => None,
            })
            .unwrap_or_else(|| panic!("{what}: no immediate answer in {answers:?}"));
        assert_eq!(refusal.status.as_ref().unwrap().code, 413, "{what}");
        assert!(answers.iter().all(|a| a.is_ok()), "{what}: the stream failed: {answers:?}");
    }
}

/// keyswap with [`budget_and_sigv4`], a request to each route by name, and a body that fits.
async fn budgeted_and_signed(
) -> (common::InProcess, [(&'static str, Vec<(&'static str, &'static str)>); 2], &'static [u8]) {
    let s = common::start_in_process_with(&[("more.yaml", &budget_and_sigv4())]).await;
    let json = [("content-type", "application/json"), ("x-api-key", PLACEHOLDER)];
    let budgeted = req("api.anthropic.com", "/v1/messages", &json);
    let signed = req("bedrock-runtime.us-east-1.amazonaws.com", "/model/m/converse", &json);
    (s, [("budgeted", budgeted), ("SigV4", signed)], br#"{"model":"claude-x","max_tokens":10,"messages":[]}"#)
}

/// A token budget on the anthropic route, and a Bedrock route signed with SigV4.
fn budget_and_sigv4() -> String {
    let budget = "apiVersion: keyswap.dev/v1alpha1\nkind: TokenBudget\nmetadata: {name: daily}\nspec:\n  parentRefs: [{name: anthropic}]\n  key: Gateway\n  window: Day\n  limits: {totalTokens: 100000}\n";
    budget.to_owned() + &bedrock_sigv4("bedrock", "bedrock-runtime.us-east-1.amazonaws.com")
}

/// For a moment after a TokenBudget or a SigV4 key is added, Envoy can still have the route's old
/// phases, which do not send the request body that reservation and signing need. A request
/// then is refused (503, retry), never forwarded unreserved past its budget or unsigned; with the
/// route's phases sending the body, the same requests go on, and one whose body is larger than
/// Envoy's buffer (it arrives partial) is refused with 413.
#[tokio::test]
async fn a_route_whose_fixed_phases_lack_the_body_a_budget_or_sigv4_needs_refuses_instead_of_forwarding() {
    use envoy_types::pb::envoy::extensions::filters::http::ext_proc::v3::processing_mode::BodySendMode;
    use envoy_types::pb::envoy::service::ext_proc::v3::processing_response::Response;
    let (s, requests, body) = budgeted_and_signed().await;
    for (what, head) in &requests {
        for mode in [BodySendMode::None, BodySendMode::Streamed] {
            let mut c = grpc::connect(s.addr).await;
            let answers = grpc::exchange(&mut c, vec![fixed(grpc::headers(head), mode), grpc::body(body)]).await;
            let first = answers[0].as_ref().expect("an answer");
            let i = immediate(first);
            assert_eq!(i.status.as_ref().unwrap().code, 503, "{what} {mode:?}");
            let reason: serde_json::Value = serde_json::from_slice(&i.body).unwrap();
            assert_eq!(reason["error"]["reason"], "phases_mismatch", "{what} {mode:?}: {reason}");
            assert!(!String::from_utf8_lossy(&i.body).contains("wJalr"), "{what}: a secret in the refusal");
        }
        // The generated phases (BUFFERED_PARTIAL) and BUFFERED both send a body that fits whole.
        for mode in [BodySendMode::BufferedPartial, BodySendMode::Buffered] {
            let mut c = grpc::connect(s.addr).await;
            let answers = grpc::exchange(&mut c, vec![fixed(grpc::headers(head), mode), grpc::body(body)]).await;
            let kinds: Vec<_> = answers
                .iter()
                .map(|a| match a.as_ref().expect("an answer").response.as_ref().unwrap() {
                    Response::RequestHeaders(_) => "request_headers",
                    Response::RequestBody(_) => "request_body",
                    _ => "other",
                })
                .collect();
            assert_eq!(kinds, ["request_headers", "request_body"], "{what} {mode:?} with the whole body: {answers:?}");
        }
        // A body larger than Envoy's buffer arrives partial (BUFFERED_PARTIAL): it cannot be
        // signed or reserved by a part, so it is refused with 413, nothing forwarded.
        let mut partial = grpc::body(body);
        if let Some(envoy_types::pb::envoy::service::ext_proc::v3::processing_request::Request::RequestBody(b)) =
            partial.request.as_mut()
        {
            b.end_of_stream = false;
        }
        let mut c = grpc::connect(s.addr).await;
        let answers =
            grpc::exchange(&mut c, vec![fixed(grpc::headers(head), BodySendMode::BufferedPartial), partial]).await;
        let last = answers.last().unwrap().as_ref().expect("an answer, not a stream error");
        let i = immediate(last);
        assert_eq!(i.status.as_ref().unwrap().code, 413, "{what} with a partial body");
        assert!(String::from_utf8_lossy(&i.body).contains("request_too_large"), "{what}");
    }
    // A body-less request on the budgeted route needs no body: it goes on.
    let mut get = requests[0].1.clone();
    get[0] = (":method", "GET");
    let mut c = grpc::connect(s.addr).await;
    let mut head = fixed(grpc::headers(&get), BodySendMode::None);
    if let Some(envoy_types::pb::envoy::service::ext_proc::v3::processing_request::Request::RequestHeaders(h)) =
        head.request.as_mut()
    {
        h.end_of_stream = true;
    }
    let answers = grpc::exchange(&mut c, vec![head]).await;
    assert!(
        matches!(answers[0].as_ref().unwrap().response, Some(Response::RequestHeaders(_))),
        "a body-less GET on a budgeted route: {answers:?}"
    );
}

/// On a route with fixed phases, Envoy sends bodies a request does not read (an unsampled span,
/// no budget, no scrubbing): each is answered with a plain continue, nothing replaced or
/// counted, and the stream stays healthy.
#[tokio::test]
async fn bodies_a_fixed_route_sends_that_a_request_does_not_read_pass_untouched() {
    use envoy_types::pb::envoy::extensions::filters::http::ext_proc::v3::processing_mode::BodySendMode;
    use envoy_types::pb::envoy::service::ext_proc::v3::processing_response::Response;
    let s = start().await;
    let mut c = grpc::connect(s.addr).await;
    let head = req("api.anthropic.com", "/v1/messages", &[("x-api-key", PLACEHOLDER)]);
    let answers = grpc::exchange(
        &mut c,
        vec![
            fixed(grpc::headers(&head), BodySendMode::Buffered),
            grpc::body(br#"{"model":"claude-x"}"#),
            grpc::response_headers(&[(":status", "200"), ("content-type", "application/json")]),
            response_body(br#"{"usage":{"input_tokens":3,"output_tokens":4}}"#),
        ],
    )
    .await;
    let answers: Vec<_> = answers.into_iter().map(|a| a.expect("an answer")).collect();
    assert_eq!(answers.len(), 4, "{answers:?}");
    let key = set_value(&mutation(&answers[0]), "x-api-key");
    assert_eq!(key.as_deref(), Some(ANTHROPIC_KEY), "the key is still written");
    let answers: Vec<Response> = answers.into_iter().map(|a| a.response.unwrap()).collect();
    match &answers[1] {
        Response::RequestBody(b) => assert!(
            b.response.as_ref().is_none_or(|c| c.header_mutation.is_none() && c.body_mutation.is_none()),
            "{b:?}"
        ),
        other => panic!("expected a request_body answer, got {other:?}"),
    }
    match &answers[3] {
        Response::ResponseBody(b) => assert!(b.response.as_ref().is_none_or(|c| c.body_mutation.is_none()), "{b:?}"),
        other => panic!("expected a response_body answer, got {other:?}"),
    }
    assert_eq!(Metrics::get(&s.shared.metrics.protocol_errors), 0);
}

/// A response whose body never reached keyswap's observing filter (the agent hung up between the
/// response headers and the body, or Envoy could not open the observing stream and, failing open,
/// let the body through unseen) leaves the deciding stream's state parked. Stopping keyswap ends
/// it: its token reservation is settled and the outcome counted, rather than the state dropped
/// with the sweeper (a Redis reservation would then stay counted all window).
#[tokio::test]
async fn state_parked_for_an_observing_stream_that_never_came_is_settled_at_shutdown() {
    use tokio_stream::StreamExt;
    let dir = config_dir();
    let budget =
        "---\napiVersion: keyswap.dev/v1alpha1\nkind: TokenBudget\nmetadata: {name: anthropic-tokens}\nspec:\n  \
                  parentRefs: [{name: anthropic}]\n  key: Gateway\n  window: Day\n  limits: {totalTokens: 1000000}\n";
    std::fs::write(dir.path().join("budget.yaml"), budget).unwrap();
    let (addr, stop_tx, server, shared) = serve_until_stopped(&dir).await;

    // The deciding stream of a route Envoy's observing filter runs on: request, its body (the
    // reservation), response headers (the hand-off); then it ends, and no observing stream comes.
    let body = br#"{"model":"claude-sonnet-4-5","max_tokens":50,"messages":[{"role":"user","content":"hi"}]}"#;
    let msgs = vec![
        grpc::headers(&req("api.anthropic.com", "/v1/messages", &[("x-api-key", PLACEHOLDER)])),
        grpc::body(body),
        grpc::response_headers(&[(":status", "200"), ("content-type", "application/json")]),
    ];
    let mut request = tonic::Request::new(tokio_stream::iter(msgs));
    request.metadata_mut().insert(keyswap::vocab::OBSERVED_METADATA, "1".parse().unwrap());
    let mut c = grpc::connect(addr).await;
    let answers: Vec<_> = c.process(request).await.expect("stream accepted").into_inner().collect().await;
    assert_eq!(answers.len(), 3, "{answers:?}");
    assert!(answers.iter().all(Result::is_ok), "{answers:?}");
    drop(c);

    let m = &shared.metrics;
    let budget = m.budgets.of(&Arc::from("default/anthropic-tokens"));
    let settled = || budget.settled_tokens.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(shared.handoffs.len(), 1, "the response's state is parked for the observing stream");
    assert_eq!(budget.admitted.load(std::sync::atomic::Ordering::Relaxed), 1);
    assert_eq!((settled(), Metrics::get(&m.observed_never_arrived)), (0, 0), "nothing settled while parked");

    stop_tx.send(()).unwrap();
    tokio::time::timeout(std::time::Duration::from_secs(15), server).await.expect("stopped").unwrap().unwrap();
    assert_eq!(shared.handoffs.len(), 0, "parked state ended at shutdown");
    assert_eq!(Metrics::get(&m.observed_never_arrived), 1);
    // The attack this guards against: the observing stream never opened, the whole answer went to
    // the agent unseen. What passed is unknown, so the reservation is kept: input and the 50
    // output tokens (a cut-off count of nothing would have let the answer go free).
    assert_eq!(settled(), body.len() as u64 + 50, "settled as reserved");
}
