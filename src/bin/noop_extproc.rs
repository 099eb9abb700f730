//! The benchmark floor: an ext_proc server that answers every phase with a plain CONTINUE.
//! It is what "the straightforward tonic implementation" costs, against which keyswap is measured.
//!
//! Usage: keyswap-noop-extproc (--uds PATH | --listen ADDR)
#![forbid(unsafe_code)]

use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_server::{
    ExternalProcessor, ExternalProcessorServer,
};
use envoy_types::pb::envoy::service::ext_proc::v3::processing_request::Request;
use envoy_types::pb::envoy::service::ext_proc::v3::processing_response::Response;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    BodyResponse, HeadersResponse, ProcessingRequest, ProcessingResponse, TrailersResponse,
};
use tokio_stream::StreamExt;
use tonic::{Request as GrpcRequest, Response as GrpcResponse, Status, Streaming};

struct Noop;

type RespStream = std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<ProcessingResponse, Status>> + Send>>;

#[tonic::async_trait]
impl ExternalProcessor for Noop {
    type ProcessStream = RespStream;

    async fn process(
        &self,
        req: GrpcRequest<Streaming<ProcessingRequest>>,
    ) -> Result<GrpcResponse<RespStream>, Status> {
        let out = req.into_inner().map(|msg| {
            let msg = msg?;
            let response = match msg.request {
                Some(Request::RequestHeaders(_)) => Response::RequestHeaders(HeadersResponse::default()),
                Some(Request::ResponseHeaders(_)) => Response::ResponseHeaders(HeadersResponse::default()),
                Some(Request::RequestBody(_)) => Response::RequestBody(BodyResponse::default()),
                Some(Request::ResponseBody(_)) => Response::ResponseBody(BodyResponse::default()),
                Some(Request::RequestTrailers(_)) => Response::RequestTrailers(TrailersResponse::default()),
                Some(Request::ResponseTrailers(_)) => Response::ResponseTrailers(TrailersResponse::default()),
                None => return Err(Status::invalid_argument("empty ProcessingRequest")),
            };
            Ok(ProcessingResponse { response: Some(response), ..Default::default() })
        });
        Ok(GrpcResponse::new(Box::pin(out)))
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: keyswap-noop-extproc (--uds PATH | --listen ADDR)";
    let (flag, value) = match args.as_slice() {
        [f, v] => (f.as_str(), v.as_str()),
        _ => anyhow::bail!(usage),
    };
    let router = tonic::transport::Server::builder().add_service(ExternalProcessorServer::new(Noop));
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    match flag {
        "--uds" => {
            let _ = std::fs::remove_file(value);
            let l = tokio::net::UnixListener::bind(value)?;
            router.serve_with_incoming_shutdown(tokio_stream::wrappers::UnixListenerStream::new(l), ctrl_c).await?
        }
        "--listen" => router.serve_with_shutdown(value.parse()?, ctrl_c).await?,
        _ => anyhow::bail!(usage),
    }
    Ok(())
}
