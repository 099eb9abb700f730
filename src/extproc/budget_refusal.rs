//! keyswap's own answers for requests a token budget refuses: 429 over a limit, 403 for a
//! request it cannot meter, 400 for a body it cannot read, 503 for an invalid budget or a store
//! it cannot reach. Each names the budget and never a secret.

use envoy_types::pb::envoy::service::ext_proc::v3::ProcessingResponse;
use serde_json::json;

use super::mutation;
use crate::budget::{Admit, Limited};

/// keyswap's own answer for a request its budgets refuse; `None` when admitted.
pub(super) fn refusal(admit: &Admit) -> Option<ProcessingResponse> {
    match admit {
        Admit::Held(..) | Admit::AdmittedUncounted(_) => None,
        Admit::Limited(l) => Some(limited(l)),
        Admit::Unmetered { budget, what } => {
            let body = json!({"error": {
                "type": "budget_unmetered_request",
                "message": format!(
                    "TokenBudget {budget} limits tokens, and this request ({what}) would spend tokens whose count never \
                     comes back through the gateway; it was not forwarded (spec.unmeteredRequests: Admit on the budget \
                     allows such requests)"
                ),
                "budget": &**budget,
                "request": what,
            }});
            Some(mutation::immediate(403, &body, "keyswap_budget_unmetered_request"))
        }
        Admit::Unreadable { budget } => {
            let body = json!({"error": {
                "type": "budget_unreadable_request",
                "message": format!(
                    "TokenBudget {budget} reads the request body to reserve what it may cost, and this body is not JSON \
                     keyswap can read to its end (bytes that are not UTF-8, nesting deeper than 128 levels, or a body \
                     cut short); it was not forwarded"
                ),
                "budget": &**budget,
            }});
            Some(mutation::immediate(400, &body, "keyswap_budget_unreadable_request"))
        }
        Admit::Invalid { budget, why } => {
            let body = json!({"error": {
                "type": "budget_invalid",
                "message": format!("{why}; requests of its routes are refused until it is fixed, never run without the limit"),
                "budget": &**budget,
            }});
            Some(mutation::immediate(503, &body, "keyswap_budget_invalid"))
        }
        Admit::Unavailable { budgets, .. } => {
            let body = json!({"error": {
                "type": "budget_store_unavailable",
                "message": "keyswap could not reach the store of this route's token budgets, which fail closed; the request was not forwarded",
                "budgets": budgets.iter().map(|b| &**b).collect::<Vec<_>>(),
            }});
            Some(mutation::immediate_with(503, &body, "keyswap_budget_store_unavailable", &[("retry-after", b"1")]))
        }
    }
}

/// 429 with `Retry-After` (the end of the window, or a second for requests in flight) and what
/// did not fit.
pub(super) fn limited(l: &Limited) -> ProcessingResponse {
    let body = json!({"error": {
        "type": "budget_exhausted",
        "message": format!(
            "this request would exceed the {} limit of TokenBudget {}; it was not forwarded", l.dimension, l.budget
        ),
        "budget": &*l.budget,
        "limit": l.dimension,
        "limit_value": l.limit,
        "used": l.used,
        "requested": l.requested,
        "retry_after_seconds": l.retry_after,
    }});
    let retry = l.retry_after.to_string();
    // The official SDKs retry a 429 after `Retry-After` when it is at most a minute away, and
    // honour `x-should-retry`: no retries when the window is longer, or the request alone is over.
    let hopeless = l.retry_after > 60 || l.requested > l.limit as i64;
    let mut headers: Vec<(&str, &[u8])> = vec![("retry-after", retry.as_bytes())];
    if hopeless {
        headers.push(("x-should-retry", b"false"));
    }
    mutation::immediate_with(429, &body, "keyswap_budget_exhausted", &headers)
}
