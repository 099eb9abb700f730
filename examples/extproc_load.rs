//! Drives an ext_proc server the way Envoy does (one stream per request: request headers, then
//! response headers), for profiling the sidecar alone:
//!
//! ```sh
//! valgrind --tool=callgrind --callgrind-out-file=ks.callgrind \
//!     target/release/keyswap serve --config manifests/examples --listen 127.0.0.1:50051 &
//! cargo run --release --example extproc_load -- 127.0.0.1:50051 20000 8
//! callgrind_annotate ks.callgrind | head -60
//! ```
//!
//! Arguments: ADDR REQUESTS CONCURRENCY. Prints requests/s; fails on any answer that is not a
//! header mutation for the request headers.

use std::time::Instant;

use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue};
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_client::ExternalProcessorClient;
use envoy_types::pb::envoy::service::ext_proc::v3::processing_request::Request;
use envoy_types::pb::envoy::service::ext_proc::v3::{HttpHeaders, ProcessingRequest};

fn headers(pairs: &[(&str, &str)], response: bool) -> ProcessingRequest {
    let headers = pairs
        .iter()
        .map(|(k, v)| HeaderValue { key: (*k).to_owned(), raw_value: v.as_bytes().to_vec(), ..Default::default() })
        .collect();
    let h = HttpHeaders { headers: Some(HeaderMap { headers }), ..Default::default() };
    let request = if response { Request::ResponseHeaders(h) } else { Request::RequestHeaders(h) };
    ProcessingRequest { request: Some(request), ..Default::default() }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [addr, n, conc] = args.as_slice() else {
        eprintln!("usage: extproc_load ADDR REQUESTS CONCURRENCY");
        std::process::exit(2);
    };
    let addr: std::net::SocketAddr = addr.parse().expect("ADDR host:port");
    let (n, conc): (usize, usize) = (n.parse().expect("REQUESTS"), conc.parse().expect("CONCURRENCY"));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..conc {
        let mut c = ExternalProcessorClient::connect(format!("http://{addr}")).await.expect("connect");
        tasks.push(tokio::spawn(async move {
            for _ in 0..n / conc {
                let msgs = vec![
                    headers(
                        &[
                            (":method", "POST"),
                            (":scheme", "https"),
                            (":authority", "api.anthropic.com"),
                            (":path", "/v1/messages"),
                            ("content-type", "application/json"),
                            ("x-api-key", "keyswap-injected-by-proxy"),
                        ],
                        false,
                    ),
                    headers(&[(":status", "200"), ("content-type", "application/json")], true),
                ];
                let mut stream = c.process(tokio_stream::iter(msgs)).await.expect("stream").into_inner();
                let mut answers = 0;
                while let Some(a) = stream.message().await.expect("answer") {
                    assert!(a.response.is_some());
                    answers += 1;
                }
                assert_eq!(answers, 2, "a header mutation and a response-headers answer");
            }
        }));
    }
    for t in tasks {
        t.await.expect("client task");
    }
    let secs = started.elapsed().as_secs_f64();
    println!("{} requests in {secs:.2} s: {:.0} requests/s", n / conc * conc, (n / conc * conc) as f64 / secs);
}
