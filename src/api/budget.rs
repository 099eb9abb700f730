//! `TokenBudget`: limits on the tokens and requests of the routes (or gateway) it attaches to.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::ParentRef;

/// A limit on the tokens and requests a tenant, agent, route or gateway may use per window.
#[derive(CustomResource, Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[kube(
    group = "keyswap.dev",
    version = "v1alpha1",
    kind = "TokenBudget",
    namespaced,
    shortname = "tb",
    doc = "Limits the tokens and requests per window of the routes (or gateway) it attaches to.",
    printcolumn(name = "Key", type_ = "string", json_path = ".spec.key"),
    printcolumn(name = "Window", type_ = "string", json_path = ".spec.window"),
    printcolumn(name = "Tokens", type_ = "integer", json_path = ".spec.limits.totalTokens"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TokenBudgetSpec {
    /// An `EgressGateway` (every route of it) or `AIProviderRoute`s, in the budget's namespace.
    pub parent_refs: Vec<ParentRef>,
    /// Whose use is counted: one counter per tenant, agent, route, gateway or label value.
    pub key: BudgetKey,
    /// With `key: Label`: the agent identity label whose value keys the counter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// A fixed window aligned to UTC (a calendar month for `Month`).
    pub window: BudgetWindow,
    pub limits: BudgetLimits,
    /// Tokens of matching models count this many times (first match wins; default 1).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub model_weights: Vec<ModelWeight>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reservation: Option<Reservation>,
    /// What happens when the shared store cannot be reached: `FailOpen` (default: admit, uncounted)
    /// or `FailClosed` (503).
    #[serde(default)]
    pub on_store_unavailable: StoreFailure,
    /// Requests that would spend tokens whose use keyswap never sees (a batch, a background
    /// response, an assistant run, fine-tuning, a realtime session: the provider registry lists
    /// them): `Refuse` (default: 403 `budget_unmetered_request`) or `Admit` (forwarded, counted
    /// as their reservation only). Only budgets that limit tokens refuse.
    #[serde(default)]
    pub unmetered_requests: UnmeteredRequests,
    /// Set by the file loader when the spec did not parse (the field and the error): such a
    /// budget is kept as invalid, so that its routes fail closed instead of running without it.
    #[serde(skip)]
    #[schemars(skip)]
    pub unparsed: Option<(String, String)>,
}

impl TokenBudgetSpec {
    /// A budget whose spec did not parse, attached where `spec.parentRefs` still says.
    pub fn unparsed(parent_refs: Vec<ParentRef>, field: String, message: String) -> TokenBudgetSpec {
        TokenBudgetSpec {
            parent_refs,
            key: BudgetKey::Gateway,
            label: None,
            window: BudgetWindow::Day,
            limits: BudgetLimits::default(),
            model_weights: Vec::new(),
            reservation: None,
            on_store_unavailable: StoreFailure::FailClosed,
            unmetered_requests: UnmeteredRequests::Refuse,
            unparsed: Some((field, message)),
        }
    }
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
pub enum BudgetKey {
    Tenant,
    Agent,
    Route,
    Gateway,
    Label,
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
pub enum BudgetWindow {
    Minute,
    Hour,
    Day,
    Month,
}

/// At least one limit. Tokens are the provider's counts (times the model's weight).
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct BudgetLimits {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_tokens: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_tokens: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_tokens: Option<u64>,
    /// Requests of one key in flight at once, from their headers to the end of their response;
    /// past it, 429 at once (`Retry-After: 1`), before Envoy reads the body. Counted on each
    /// gateway replica, whatever the store: what requests in flight hold is the replica's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrent_requests: Option<u64>,
}

#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ModelWeight {
    /// A model glob (`gpt-4o*`).
    pub model: String,
    pub weight: f64,
}

/// How much a request reserves before it is forwarded.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Reservation {
    /// Output tokens reserved when the request sets no `max_tokens` (or the provider's equivalent).
    /// Default 4096.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_output_tokens: Option<u64>,
    /// Request-body bytes counted as one input token when reserving. Default 1, a hard upper
    /// bound (a token is at least one byte); 4 is typical of English text but may under-reserve.
    // `maximum` in the schema: the API server refuses what a u32 cannot hold (it enforces no
    // `format`), where keyswap could not decode the object and the whole list would stop
    // syncing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 4_294_967_295u32))]
    pub bytes_per_input_token: Option<u32>,
    /// Input tokens reserved for each piece of input the body refers to instead of carrying:
    /// a stored conversation (`previous_response_id`, `conversation`), cached content
    /// (`cachedContent`), an assistant, an uploaded file (`file_id`, `fileUri`) or a URL the
    /// provider fetches (`image_url`, a `source` URL). Default 16384.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub referenced_input_tokens: Option<u64>,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
pub enum UnmeteredRequests {
    #[default]
    Refuse,
    Admit,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
pub enum StoreFailure {
    #[default]
    FailOpen,
    FailClosed,
}
