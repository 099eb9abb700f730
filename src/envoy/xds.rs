//! Envoy resources as xDS carries them: the generator's JSON, read against Envoy's own protobuf
//! descriptors (`proto/envoy.binpb`, the subset of envoy-types' descriptor set these resources
//! need) and encoded as `Any`. A field Envoy does not know is an error here, not in Envoy.

use std::sync::LazyLock;

use envoy_types::pb::google::protobuf::Any;
use prost::Message as _;
use prost_reflect::{DescriptorPool, DynamicMessage};
use serde_json::Value;

/// The descriptors of every message the generated resources hold (see `proto/README.md`).
pub const DESCRIPTORS: &[u8] = include_bytes!("../../proto/envoy.binpb");

/// The protobuf files whose messages the generated resources use; `proto/envoy.binpb` holds them
/// and what they import.
pub const ROOT_FILES: &[&str] = &[
    "envoy/config/listener/v3/listener.proto",
    "envoy/config/cluster/v3/cluster.proto",
    "envoy/config/route/v3/route.proto",
    "envoy/extensions/transport_sockets/tls/v3/secret.proto",
    "envoy/extensions/transport_sockets/tls/v3/tls.proto",
    "envoy/extensions/filters/network/http_connection_manager/v3/http_connection_manager.proto",
    "envoy/extensions/filters/http/ext_proc/v3/ext_proc.proto",
    "envoy/extensions/filters/http/router/v3/router.proto",
    "envoy/extensions/filters/http/dynamic_forward_proxy/v3/dynamic_forward_proxy.proto",
    "envoy/extensions/clusters/dynamic_forward_proxy/v3/cluster.proto",
    "envoy/extensions/filters/listener/tls_inspector/v3/tls_inspector.proto",
    "envoy/extensions/upstreams/http/v3/http_protocol_options.proto",
];

pub const LISTENER: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
pub const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
pub const ROUTE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
pub const SECRET: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

static POOL: LazyLock<DescriptorPool> =
    LazyLock::new(|| DescriptorPool::decode(DESCRIPTORS).expect("proto/envoy.binpb is a valid descriptor set"));

/// `value` (proto3 JSON, `@type` in nested `Any`s) as an `Any` of `type_url`.
pub fn to_any(type_url: &str, value: &Value) -> Result<Any, String> {
    let name = type_url.rsplit('/').next().unwrap_or(type_url);
    let desc = POOL.get_message_by_name(name).ok_or_else(|| format!("no descriptor for {name}"))?;
    let msg = DynamicMessage::deserialize(desc, value).map_err(|e| match type_url {
        // The message could quote the value, and a Secret's value is a private key.
        SECRET => format!("{name}: does not encode"),
        _ => format!("{name}: {e}"),
    })?;
    Ok(Any { type_url: type_url.to_owned(), value: msg.encode_to_vec() })
}
